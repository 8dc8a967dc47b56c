"""Single-image decomposition against the toy world's pixel oracle: do the tokens ``explain_image`` keeps name what
the image shows? One row per image, then the agreement per concept and overall, beside chance.

    python benchmarks/explain_agreement.py                                  # bass, seeds 0-15, toy profile
    python benchmarks/explain_agreement.py --concepts bass,fruit --seeds 16-23 --guidance 1.5

The measure is ``conceptor_nb.toyworld.explanation_frame``: the kept tokens name the colour, shape or object the
oracle reads (an object of one colour names that colour: "fish" names blue), and something was dropped (keeping
every token explains nothing). ``same reading``: the oracle reads the kept tokens' own image as it reads the image.
"""
from __future__ import annotations

import argparse
import time

import pandas as pd

import conceptor_nb as cn
from conceptor_nb.toyworld import Oracle, explanation_frame, toy_spec


def seeds_arg(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi) + 1)) if hi else [int(x) for x in text.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concepts", default="bass")
    ap.add_argument("--seeds", type=seeds_arg, default=list(range(16)), help="image seeds, '0-15' or '0,3,5'")
    ap.add_argument("--threshold", type=float, default=None, help="explain_image's threshold (default: its own)")
    ap.add_argument("--guidance", type=float, default=None,
                    help="explain_image's guidance (default: the profile's explain_guidance)")
    ap.add_argument("--fit-seed", type=int, default=0, help="the decomposition's seed")
    args = ap.parse_args()
    setup = cn.setup("toy")
    spec = toy_spec()
    oracle = Oracle(spec)
    kw = {k: v for k, v in (("threshold", args.threshold), ("guidance", args.guidance)) if v is not None}
    frames = []
    for concept in args.concepts.split(","):
        dec = cn.decompose(setup.pipe, f"a {concept}", clip=setup.clip, seed=args.fit_seed, verbose=False)
        t0 = time.perf_counter()
        explanations = [cn.explain_image(setup.pipe, dec, seed, clip=setup.clip, **kw) for seed in args.seeds]
        frame = explanation_frame(explanations, spec)
        frame.insert(0, "concept", concept)
        frame["same reading"] = [oracle.read(e.kept_image).words(spec) == oracle.read(e.image).words(spec)
                                 for e in explanations]
        frame["s/image"] = round((time.perf_counter() - t0) / len(explanations), 1)
        frames.append(frame)
        print(frame.to_string(index=False), flush=True)
    frame = pd.concat(frames, ignore_index=True)
    guidance = explanations[0].settings["guidance"]
    print(f"\nguidance {guidance}:")
    print(frame.groupby("concept", sort=False)[["agree", "chance", "same reading"]].mean().round(3).to_string())
    print(f"overall: agreement {frame['agree'].mean():.3f} (chance {frame['chance'].mean():.3f}) over {len(frame)} "
          f"images; nothing dropped in {(frame['dropped'] == 0).sum()}; "
          f"mean tokens kept {frame['kept'].str.split(', ').str.len().mean():.2f}")


if __name__ == "__main__":
    main()
