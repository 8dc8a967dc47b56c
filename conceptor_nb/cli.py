"""The ``conceptor`` command (also ``python -m conceptor_nb``)."""
from __future__ import annotations

import argparse
import re
import sys
import time
import typing
from pathlib import Path

from .config import CLIP_TEMPLATES, SD, Settings, resolve, settings_fields

TINY_WARNING = "note: --model tiny has random weights; its decomposition is meaningless (it only shows the machinery runs)."


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "concept"


def _optional_float(text: str) -> float | None:
    if text.strip().lower() in ("none", "off"):
        return None
    return float(text)


def _templates(values: list[str]) -> tuple[str, ...]:
    if values == ["authors"]:
        return CLIP_TEMPLATES
    return tuple(values)


def add_settings_flags(p: argparse.ArgumentParser) -> None:
    """One flag per :class:`Settings` field (``n_train`` -> ``--n-train``), generated from the fields.

    Flags default to "not given" (argparse.SUPPRESS), so only what the user typed overrides the profile.
    """
    hints = typing.get_type_hints(Settings)
    g = p.add_argument_group("method settings (default: the profile's; see conceptor_nb/config.py)")
    for name, _, default, meta in settings_fields():
        tp = hints[name]
        flag = "--" + name.replace("_", "-")
        sd_value = getattr(SD, name)
        shown = "the 27 of the paper" if name == "clip_templates" and sd_value == CLIP_TEMPLATES else sd_value
        kw = dict(dest=name, default=argparse.SUPPRESS, help=f"{meta['help']} (sd profile: {shown!r})")
        if "choices" in meta:
            kw["choices"] = meta["choices"]
        if tp is bool:
            g.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            continue
        args = typing.get_args(tp)
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), tp) if args else tp
        if name == "clip_templates":
            g.add_argument(flag, nargs="+", metavar="TEMPLATE", **kw)
        elif optional and base is float:
            g.add_argument(flag, type=_optional_float, metavar="FLOAT|none", **kw)
        elif base in (int, float, str):
            g.add_argument(flag, type=base, **kw)
        else:  # a new field of a type the CLI cannot parse yet: fail loudly, in tests
            raise TypeError(f"Settings.{name} has type {tp!r}, which add_settings_flags cannot parse")


def settings_overrides(args) -> dict:
    """The Settings fields given on the command line."""
    out = {}
    for name, *_ in settings_fields():
        if hasattr(args, name):
            value = getattr(args, name)
            out[name] = _templates(value) if name == "clip_templates" else value
    return out


def cmd_decompose(args) -> int:
    from . import decompose, load_pipeline
    from .models import load_clip
    from .viz import image_grid

    prof, model, clip_name = resolve(args.model, args.clip)
    s = prof.settings.replace(**settings_overrides(args))
    out = Path(args.out or Path("runs") / _slug(args.concept))
    if (out / "decomposition.json").exists() and not args.overwrite:
        print(f"error: {out}/decomposition.json exists; pass --overwrite or choose another --out", file=sys.stderr)
        return 2
    if model == "tiny":
        print(TINY_WARNING, file=sys.stderr)
    t0 = time.perf_counter()
    pipe = load_pipeline(model, device=args.device)
    clip = load_clip(clip_name, device=pipe.device)
    t_load = time.perf_counter() - t0
    dec = decompose(pipe, args.concept, clip=clip, settings=s, verbose=not args.quiet)
    t_total = time.perf_counter() - t0
    dec.history["timings"]["load_s"] = t_load
    dec.history["timings"]["total_s"] = t_total
    dec.save(out, overwrite=args.overwrite)
    n_grid = min(8, dec.settings.n_train)
    seeds = dec.seeds(n_grid)
    concept = dec.concept_images(pipe, n_grid)
    image_grid(concept, nrow=n_grid, upscale=max(1, 256 // concept.shape[-1])).save(out / "concept.png")
    image_grid(dec.render(pipe, seeds), nrow=n_grid, upscale=max(1, 256 // concept.shape[-1])).save(out / "reconstruction.png")
    frame = dec.to_frame(args.show)
    print(f"\n{dec.concept!r} on {dec.model} with CLIP {dec.clip} (settings: {prof.name}): "
          f"top {len(frame)} of {len(dec.tokens)} dictionary tokens")
    print(frame[["rank", "token", "coefficient", "share"]].to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    tm = dec.history["timings"]
    best = dec.history.get("best_step")
    print(f"\nbest validation step {best}; fit {tm['step_ms']:.1f} ms/step; total {t_total:.1f} s "
          f"(load {t_load:.1f}, images {tm['images_s']:.1f}, dictionary {tm['dictionary_s']:.1f}, fit+validation {tm['fit_s']:.1f})")
    print(f"wrote {out}/decomposition.json, coefficients.safetensors, concept.png, reconstruction.png")
    return 0


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="'toy' (default), 'tiny' (random weights), a folder or a hub id; a Stable "
                                   "Diffusion model takes the 'sd' profile's settings unless CONCEPTOR_PROFILE says otherwise")
    p.add_argument("--clip", help="CLIP for the dictionary and validation (default: the one of the model's profile: "
                                  "'toy' for the toy world, openai/clip-vit-base-patch32 for Stable Diffusion)")
    p.add_argument("--device", help="cuda, mps or cpu (default: the best there is)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="conceptor", description=__doc__.splitlines()[0] + " Explain a concept of a text-to-image model.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("decompose", help="decompose a concept into weighted vocabulary tokens")
    p.add_argument("concept", help='the concept, e.g. "a dog"')
    add_model_flags(p)
    p.add_argument("--out", help="output folder (default: runs/<concept>)")
    p.add_argument("--show", type=int, default=10, help="rows of the table to print")
    p.add_argument("--overwrite", action="store_true", help="replace an existing decomposition in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_settings_flags(p)
    p.set_defaults(func=cmd_decompose)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import ConceptorError

    try:
        return args.func(args)
    except (ConceptorError, ValueError, FileExistsError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
