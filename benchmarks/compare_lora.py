"""Does compare() find the shipped toy LoRA's effect (doctor: blue -> red)? Issue 24, item 4, with error bars.

    python benchmarks/compare_lora.py --seeds 0,1 --fits 3

For each seed, "a doctor" is decomposed on the toy model with and without
``conceptor_nb/data/toyworld/doctor_red_lora.safetensors`` (toy profile, ``fits`` fits per side) and compared.
Prints per seed: red's and blue's change of share, the largest change of any other world word, and (with
fits > 1) which tokens' changes exceed twice their combined spread. The criterion of the issue: red rises, blue
falls, and no other world word moves more.
"""
import argparse
import time

import conceptor_nb as cn
from conceptor_nb.toyworld import shipped_lora, toy_spec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (each picks its own concept images)")
    ap.add_argument("--fits", type=int, default=3)
    args = ap.parse_args(argv)
    base, tuned = cn.load_pipeline("toy", device="cpu"), cn.load_pipeline("toy", device="cpu", lora=shipped_lora())
    clip = cn.load_clip("toy", device="cpu")
    words = set(toy_spec().world_words) - {"red", "blue"}
    for seed in (int(x) for x in args.seeds.split(",")):
        t0 = time.perf_counter()
        s = cn.settings("toy").replace(seed=seed, fits=args.fits)
        a = cn.decompose(base, "a doctor", clip=clip, settings=s, verbose=False)
        b = cn.decompose(tuned, "a doctor", clip=clip, settings=s, verbose=False)
        f = cn.compare(a, b, labels=("base", "LoRA")).to_frame()
        diff = dict(zip(f["token"], f["diff"]))
        other = max(((abs(v), k) for k, v in diff.items() if k in words), default=(0.0, "-"))
        red, blue = diff.get("red", 0.0), diff.get("blue", 0.0)
        beyond = [f"{t} {d:+.3f}" for t, d, e in zip(f["token"], f["diff"], f["exceeds_spread"]) if e]
        ok = red > 0 > blue and other[0] < min(red, -blue)
        print(f"seed {seed} fits {args.fits}: red {red:+.3f} blue {blue:+.3f}, largest other {other[1]} "
              f"{diff.get(other[1], 0):+.3f}; beyond the spread: {', '.join(beyond) or 'none'}; "
              f"criterion {'holds' if ok else 'fails'} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
