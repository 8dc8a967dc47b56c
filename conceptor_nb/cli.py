"""The ``conceptor`` command (also ``python -m conceptor_nb``)."""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from .config import Settings, profile_name, settings_for_model

TINY_WARNING = "note: --model tiny has random weights; its decomposition is meaningless (it only shows the machinery runs)."


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "concept"


def _add_settings(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("method settings (default: the active profile's)")
    for name, help_ in [("n_train", "training images"), ("n_val", "validation images"),
                        ("gen_steps", "sampling steps for the concept images"), ("dict_size", "dictionary size N"),
                        ("n_tokens", "explanation tokens n"), ("steps", "fit steps"), ("batch_size", "fit batch"),
                        ("val_every", "validate every K steps (0: never)"), ("val_steps", "sampling steps in validation"),
                        ("val_patience", "stop after K validation rounds without a better score (0: never)"),
                        ("seed", "seed")]:
        g.add_argument("--" + name.replace("_", "-"), type=int, dest=name, help=help_)
    for name, help_ in [("guidance", "guidance scale"), ("lr", "learning rate"), ("sparsity", "sparsity lambda")]:
        g.add_argument("--" + name, type=float, dest=name, help=help_)
    g.add_argument("--autocast", choices=["off", "bf16", "auto"],
                   help="precision of the fit's model passes (auto: bf16 where the hardware computes it natively)")


def _overrides(args) -> dict:
    names = ["n_train", "n_val", "gen_steps", "dict_size", "n_tokens", "steps", "batch_size", "val_every",
             "val_steps", "val_patience", "seed", "guidance", "lr", "sparsity", "autocast"]
    return {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}


def cmd_decompose(args) -> int:
    from . import decompose, load_pipeline
    from .models import load_clip, default_clip_for
    from .runfolder import write_run

    model = args.model or settings_for_model(None).model
    s: Settings = settings_for_model(model)
    out = Path(args.out or Path("runs") / _slug(args.concept))
    if (out / "decomposition.json").exists() and not args.overwrite:
        print(f"error: {out}/decomposition.json exists; pass --overwrite or choose another --out", file=sys.stderr)
        return 2
    if model == "tiny":
        print(TINY_WARNING, file=sys.stderr)
    t0 = time.perf_counter()
    pipe = load_pipeline(model, device=args.device)
    clip = load_clip(args.clip or s.clip or default_clip_for(model), device=pipe.device)
    t_load = time.perf_counter() - t0
    dec = decompose(pipe, args.concept, clip=clip, settings=s, verbose=not args.quiet, **_overrides(args))
    t_total = time.perf_counter() - t0
    dec.history["timings"]["load_s"] = t_load
    dec.history["timings"]["total_s"] = t_total
    write_run(dec, pipe, out, overwrite=args.overwrite)
    frame = dec.to_frame(args.show)
    settings_name = "tiny" if model == "tiny" else profile_name()
    print(f"\n{dec.concept!r} on {dec.model} (settings: {settings_name}): top {len(frame)} of {len(dec.tokens)} dictionary tokens")
    print(frame[["rank", "token", "coefficient", "share"]].to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    tm = dec.history["timings"]
    best = dec.history.get("best_step")
    print(f"\nbest validation step {best}; fit {tm['step_ms']:.1f} ms/step; total {t_total:.1f} s "
          f"(load {t_load:.1f}, images {tm['images_s']:.1f}, dictionary {tm['dictionary_s']:.1f}, fit+validation {tm['fit_s']:.1f})")
    print(f"wrote {out}/decomposition.json, coefficients.safetensors, concept.png, reconstruction.png")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="conceptor", description=__doc__.splitlines()[0] + " Explain a concept of a text-to-image model.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("decompose", help="decompose a concept into weighted vocabulary tokens")
    p.add_argument("concept", help='the concept, e.g. "a dog"')
    p.add_argument("--model", help="'toy' (default), 'tiny' (random weights), a folder or a hub id")
    p.add_argument("--clip", help="CLIP model for the dictionary and validation (default: the model's)")
    p.add_argument("--out", help="output folder (default: runs/<concept>)")
    p.add_argument("--device", help="cuda, mps or cpu (default: the best there is)")
    p.add_argument("--show", type=int, default=10, help="rows of the table to print")
    p.add_argument("--overwrite", action="store_true", help="replace an existing decomposition in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_settings(p)
    p.set_defaults(func=cmd_decompose)
    from . import batch, report

    batch.add_parser(sub)
    report.add_parser(sub)
    args = parser.parse_args(argv)
    from .errors import ConceptorError

    try:
        return args.func(args)
    except (ConceptorError, ValueError, FileExistsError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
