"""The ``conceptor`` command (also ``python -m conceptor_nb``)."""
from __future__ import annotations

import argparse
import sys
import time
import typing
from pathlib import Path

from .config import CLIP_TEMPLATES, SD, Settings, resolve, settings_fields
from .runfolder import RUN_FILES as OUTPUT_FILES
from .runfolder import write_run as _write_outputs  # the one writer of a run folder; conceptor batch uses it too

TINY_WARNING = "note: --model tiny has random weights; its decomposition is meaningless (it only shows the machinery runs)."


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


CHECKPOINT_DIR = ".checkpoint"  # inside --out: the fit's state while it runs (removed when the run is saved)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a run."""


def _on_sigterm(signum, frame):
    raise Interrupted(f"signal {signum}")


def _rescue(dec, out: Path, err: Exception) -> int:
    """Writing --out failed after the fit: save the result in the cache instead, and say where."""
    from .checks import folder_name
    from .config import cache_dir

    safe = cache_dir() / "rescued" / f"{folder_name(out.name or 'run', 32)}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        dec.save(safe)
    except Exception as err2:  # noqa: BLE001 - last resort: report both failures
        print(f"error: could not write {out} ({err}), nor {safe} ({err2}); the result is lost", file=sys.stderr)
        return 1
    print(f"error: could not write {out} ({err}); the decomposition was saved to {safe} instead", file=sys.stderr)
    return 1


def cmd_decompose(args) -> int:
    import shutil

    from . import decompose, load_pipeline
    from .checks import check_output_folder, folder_name, parse_concept, validate_settings
    from .errors import InvalidInputError
    from .models import load_clip

    # every check before any model is loaded
    prof, model, clip_name = resolve(args.model, args.clip)
    s = validate_settings(prof.settings.replace(**settings_overrides(args)))
    parse_concept(args.concept, s.template)
    if args.show < 0:
        raise InvalidInputError(f"--show must be an integer >= 0, got {args.show}")
    out = Path(args.out) if args.out else Path("runs") / folder_name(args.concept)
    check_output_folder(out, OUTPUT_FILES, overwrite=args.overwrite)
    args.out = str(out)  # for the interrupt message
    ckpt = out / CHECKPOINT_DIR
    if args.resume and not ckpt.exists():
        raise InvalidInputError(f"--resume: {out} holds no interrupted run ({CHECKPOINT_DIR}/ is missing); "
                                "run without --resume to start one")
    if ckpt.exists() and not args.resume:
        print(f"note: {out} holds an interrupted run; continuing it (delete {ckpt} to start over)", file=sys.stderr)
    if model == "tiny":
        print(TINY_WARNING, file=sys.stderr)
    t0 = time.perf_counter()
    pipe = load_pipeline(model, device=args.device, config=args.model_config)
    clip = load_clip(clip_name, device=pipe.device)
    t_load = time.perf_counter() - t0
    dec = decompose(pipe, args.concept, clip=clip, settings=s, verbose=not args.quiet, refresh=args.refresh,
                    checkpoint_dir=ckpt)
    t_total = time.perf_counter() - t0
    dec.history["timings"]["load_s"] = t_load
    dec.history["timings"]["total_s"] = t_total
    try:
        _write_outputs(dec, pipe, out, overwrite=args.overwrite)
    except OSError as err:
        return _rescue(dec, out, err)
    shutil.rmtree(ckpt, ignore_errors=True)
    frame = dec.to_frame(args.show)
    print(f"\n{dec.concept!r} on {dec.model} with CLIP {dec.clip} (settings: {prof.name}): "
          f"top {len(frame)} of {len(dec.tokens)} dictionary tokens")
    print(frame[["rank", "token", "coefficient", "share"]].to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    tm = dec.history["timings"]
    best = dec.history.get("best_step")
    print(f"\nbest validation step {best}; fit {tm['step_ms']:.1f} ms/step; total {t_total:.1f} s "
          f"(load {t_load:.1f}, images {tm['images_s']:.1f}, dictionary {tm['dictionary_s']:.1f}, fit+validation {tm['fit_s']:.1f})")
    print(f"wrote {out}/" + ", ".join(OUTPUT_FILES))
    return 0


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="'toy' (default), 'tiny' (random weights), a folder or a hub id; a Stable "
                                   "Diffusion model takes the 'sd' profile's settings unless CONCEPTOR_PROFILE says otherwise")
    p.add_argument("--clip", help="CLIP for the dictionary and validation (default: the one of the model's profile: "
                                  "'toy' for the toy world, openai/clip-vit-base-patch32 for Stable Diffusion)")
    p.add_argument("--model-config", dest="model_config",
                   help="for a single .safetensors checkpoint: the pipeline folder or cached hub id whose config "
                        "files go with it (default: found from the checkpoint's keys among cached repos)")
    p.add_argument("--device", help="cuda, mps or cpu (default: the best there is)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="conceptor", description=__doc__.splitlines()[0] + " Explain a concept of a text-to-image model.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("decompose", help="decompose a concept into weighted vocabulary tokens")
    p.add_argument("concept", help='the concept, e.g. "a dog"')
    add_model_flags(p)
    p.add_argument("--out", help="output folder (default: runs/<concept>)")
    p.add_argument("--show", type=int, default=10, help="rows of the table to print")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the files of an earlier run in --out (" + ", ".join(OUTPUT_FILES) + ")")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out from its last checkpoint (re-running the same "
                        "command does too); the result equals an uninterrupted run's")
    p.add_argument("--refresh", action="store_true", help="generate the concept images again instead of reading the cache")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_settings_flags(p)
    p.set_defaults(func=cmd_decompose)
    from . import batch, report

    batch.add_parser(sub)
    report.add_parser(sub)
    return parser


EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def main(argv=None) -> int:
    """Exit codes: 0 done, 2 bad input (nothing was loaded or written), 1 the run failed (a diverged fit,
    a model that cannot be loaded, an output that cannot be written), 130 interrupted (resumable)."""
    import signal
    import threading

    args = build_parser().parse_args(argv)
    from .errors import ConceptorError, InvalidInputError, OutputError

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        out = Path(args.out) if getattr(args, "out", None) else None
        ckpt = out / CHECKPOINT_DIR / "fit_state.safetensors" if out else None
        if ckpt is not None and ckpt.exists():
            hint = f"its last checkpoint is in {ckpt.parent}; run the same command again (or add --resume) to continue"
        else:
            hint = "no checkpoint was reached; run the same command again to start over"
        print(f"interrupted: {hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (InvalidInputError, OutputError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (ConceptorError, ValueError, RuntimeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
