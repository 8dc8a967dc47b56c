"""The toy world's evaluation from the command line, with the pixel oracle as the judge:

    python -m conceptor_nb.toyworld.evaluate               the model's quality report
    python -m conceptor_nb.toyworld.evaluate --decompose   Conceptor's decompositions scored against the spec
    python -m conceptor_nb.toyworld.evaluate --fidelity    what the model draws: a retrained model's quick check
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from ..clip import load_clip
from ..config import parse_setting, profile, resolve, toy_run_folder
from ..errors import InvalidInputError
from ..io import atomic_write, dumps
from ..models import load_pipeline
from .diagnostics import model_fidelity
from .report import decomposition_report, fidelity_markdown, full_report, report_markdown, write_readme_section
from .spec import load_spec


def load_models(model: str = "toy", device: str = "cpu"):
    """(pipeline, CLIP) in float32 for 'toy' or a folder the training script wrote; a run without its own
    ``clip/`` gives None for the CLIP (decompositions then use the profile's)."""
    _, model, clip = resolve(model, warn=False)
    pipe = load_pipeline(model, device=device, dtype=torch.float32)
    run = toy_run_folder(model)
    if run is not None and not (run / "clip" / "config.json").is_file():
        return pipe, None
    return pipe, load_clip(clip, device=device)


def provenance(argv=None) -> str:
    """The command line and the machine a report came from."""
    args = " ".join(sys.argv[1:] if argv is None else argv)
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else \
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return f"python -m conceptor_nb.toyworld.evaluate {args} on {dev}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"


def parse_overrides(items) -> dict:
    """``["val_every=0", "null_threshold=none"]`` -> ``{"val_every": 0, "null_threshold": None}``."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            if not sep:
                raise InvalidInputError("no '='")
            out[name.strip().replace("-", "_")] = parse_setting(name, value)
        except InvalidInputError as err:
            raise SystemExit(f"--set {item!r}: expected NAME=VALUE with NAME a setting ({err})") from err
    return out


def build_parser() -> argparse.ArgumentParser:
    s = resolve("toy", warn=False)[0]  # the active profile when it is the toy world's, else "toy"
    p = argparse.ArgumentParser(prog="python -m conceptor_nb.toyworld.evaluate",
                                description="Oracle report of a toy-world model; with --decompose, Conceptor's "
                                            "decompositions scored against the spec (issue 11's measurements).")
    p.add_argument("--model", default="toy", help="'toy' or a folder the training script wrote (pipeline/, clip/)")
    p.add_argument("--spec", default=None, help="spec JSON (default: the shipped one)")
    p.add_argument("--profile", default=None, help=f"settings profile (toy, ci; default: {s.name})")
    p.add_argument("--n", type=int, default=32, help="images per prompt of the quality report")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help=f"sampling steps (default: the profile's, {s.settings.gen_steps})")
    p.add_argument("--guidance", type=float, default=None, help=f"guidance (default: the profile's, {s.settings.guidance})")
    p.add_argument("--scheduler", default=None, help=f"sampler (default: the profile's, {s.settings.sampler})")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    p.add_argument("--decompose", action="store_true", help="decompose every hidden concept once per seed and score it")
    p.add_argument("--fidelity", action="store_true",
                   help="only what the model draws (guidance table, plain words) with the profile's sampler: a retrain's "
                        "quick check, minutes on a CPU")
    p.add_argument("--seeds", default="0,1,2", help="runs (each seed picks its own, disjoint concept images)")
    p.add_argument("--concepts", default=None, help="comma-separated subset of the spec's concepts")
    p.add_argument("--fit-steps", type=int, default=None, help=f"fit steps (default: the profile's, {s.settings.steps})")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="override one setting of the profile (repeatable), e.g. --set val_every=0 --set n_val=16")
    p.add_argument("--render-n", type=int, default=48, help="pseudo-token renders per run for the reconstruction table (0: none)")
    p.add_argument("--guidances", default="1,2,4,7.5", help="guidance table scales ('' for none)")
    p.add_argument("--guidance-n", type=int, default=128)
    p.add_argument("--cache", default=None, help="cache folder for concept images and dictionaries")
    p.add_argument("--diagnostic-seed", type=int, default=7,
                   help="run seed of the held-out images of the loss-by-noise-level diagnostic (-1: skip)")
    p.add_argument("--miss-repeats", type=int, default=20,
                   help="noise draws per image of the check of each missed drawn constituent (0: no check)")
    p.add_argument("--word-n", type=int, default=32,
                   help="images per plain-word prompt of the word fidelity table at guidance 1 and the profile's (0: none)")
    p.add_argument("--readme", default=None, help="write the Markdown into this README between the evaluate markers")
    return p


def main(argv=None):
    a = build_parser().parse_args(argv)
    torch.set_num_threads(a.threads)
    s = (profile(a.profile) if a.profile else resolve(a.model, warn=False)[0]).settings
    if a.fit_steps:
        s = s.replace(steps=a.fit_steps)
    s = s.replace(**parse_overrides(a.set))
    spec = load_spec(a.spec)
    pipe, clip = load_models(a.model, a.device)
    gs = tuple(float(x) for x in a.guidances.split(",") if x.strip())
    t = time.time()
    if a.fidelity:
        rep = {"settings": {"profile": s.to_dict(), "model": a.model}}
        rep.update(model_fidelity(pipe, spec, s, gs, a.guidance_n, a.word_n, log=print))
        print("\n".join(fidelity_markdown(rep, spec)))
    elif a.decompose:
        rep = decomposition_report(pipe, clip, spec, [int(x) for x in a.seeds.split(",")], settings=s,
                                   concepts=a.concepts.split(",") if a.concepts else None, render_n=a.render_n,
                                   guidances=gs, guidance_n=a.guidance_n, cache_dir=a.cache,
                                   partial_path=a.out + ".partial" if a.out else None,
                                   diagnostic_seed=None if a.diagnostic_seed < 0 else a.diagnostic_seed,
                                   miss_repeats=a.miss_repeats, word_n=a.word_n)
        md = report_markdown(rep, spec)
        print(md)
        if a.readme:
            write_readme_section(a.readme, md)
    else:
        rep = full_report(pipe, clip, spec, a.n, a.seed, steps=a.steps or s.gen_steps,
                          guidance=s.guidance if a.guidance is None else a.guidance, sampler=a.scheduler or s.sampler)
    rep["eval_seconds"] = time.time() - t
    rep["provenance"] = provenance(argv)
    if a.out:
        atomic_write(a.out, dumps(rep, indent=2))
        Path(a.out + ".partial").unlink(missing_ok=True)  # the run finished: its partial copy is not needed
    return rep


if __name__ == "__main__":
    main()
