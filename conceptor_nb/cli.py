"""The ``conceptor`` command (also ``python -m conceptor_nb``): ``decompose``, ``batch``, ``report`` and ``export``.

Exit codes: 0 done, 2 bad input (nothing was written), 1 the run failed, 130 interrupted (resumable).
"""
from __future__ import annotations

import argparse
import shutil
import signal
import sys
import threading
import time
from dataclasses import fields
from pathlib import Path

import torch

from .batch import TOP_K, as_jobs, build_report, decompose_many
from .batch.jobs import check_out
from .checks import check_output_folder, parse_concept, validate_settings
from .method.decompose import decompose
from .method.decomposition import Decomposition
from .method.transfer import default_token
from .config import CLIP_TEMPLATES, HINTS, Profile, Settings, parse_setting, profile, resolve
from .errors import ConceptorError, InvalidInputError, OutputError
from .io import CHECKPOINT_DIR, RUN_FILES, rescue, slug, write_run
from .models import load_clip, load_pipeline

TINY_WARNING = "note: --model tiny has random weights; its decomposition is meaningless (it only shows the machinery runs)."
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def add_settings_flags(p: argparse.ArgumentParser, prof: Profile) -> None:
    """One flag per :class:`Settings` field (``n_train`` -> ``--n-train``), its help showing ``prof``'s value. A flag
    not given is absent from the namespace (argparse.SUPPRESS): only what was typed overrides the profile."""
    g = p.add_argument_group(f"method settings (default: the {prof.name} profile's, CONCEPTOR_PROFILE)")
    for f in fields(Settings):
        value = getattr(prof.settings, f.name)
        shown = "the paper's 27" if value == CLIP_TEMPLATES else repr(value)
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=f"{f.metadata['help']} ({prof.name}: {shown})")
        if HINTS[f.name] is bool:
            g.add_argument("--" + f.name.replace("_", "-"), action=argparse.BooleanOptionalAction, **kw)
        else:  # text, parsed by settings_overrides
            g.add_argument("--" + f.name.replace("_", "-"), nargs="+" if f.name == "clip_templates" else None,
                           choices=f.metadata.get("choices"), **kw)


def settings_overrides(args) -> dict:
    """The Settings fields given on the command line, parsed (:func:`~conceptor_nb.config.parse_setting`)."""
    return {f.name: v if isinstance(v := getattr(args, f.name), bool) else parse_setting(f.name, v)
            for f in fields(Settings) if hasattr(args, f.name)}


def add_run_flags(p: argparse.ArgumentParser, prof: Profile) -> None:
    """The flags ``decompose`` and ``batch`` share: the model, the run and the method settings."""
    p.add_argument("--model", help=f"'toy', 'tiny' (random weights), a folder, a hub id or a .safetensors file (default: "
                   f"{prof.model!r}); a model of another family takes its family's profile")
    p.add_argument("--clip", help=f"CLIP for the dictionary and validation (default: the model's profile's; {prof.clip!r})")
    p.add_argument("--model-config", help="for a single .safetensors checkpoint: the pipeline folder or cached hub id "
                   "whose config files go with it (default: found from its keys among cached repos)")
    p.add_argument("--device", help="cuda, mps or cpu (default: the best there is)")
    p.add_argument("--lora", help="a LoRA fused into the model: a .safetensors file, a folder holding one, or a hub id")
    p.add_argument("--lora-scale", type=float, default=1.0, help="the LoRA's scale (default: 1.0)")
    p.add_argument("--refresh", action="store_true", help="generate the concept images again instead of reading the cache")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_settings_flags(p, prof)


def _settings(args, warn: bool = True):
    """(profile, model, CLIP name, checked settings) of a command."""
    prof, model, clip = resolve(args.model, args.clip, warn=warn)
    return prof, model, clip, validate_settings(prof.settings.replace(**settings_overrides(args)))


def _load(model: str, clip: str, args, device, note: bool = True):
    if model == "tiny" and note:
        print(TINY_WARNING, file=sys.stderr)
    pipe = load_pipeline(model, device=device, config=args.model_config, lora=args.lora, lora_scale=args.lora_scale)
    return pipe, load_clip(clip, device=pipe.device)


def cmd_decompose(args) -> int:
    prof, model, clip_name, s = _settings(args)  # every check before any model is loaded
    parse_concept(args.concept, s.template)
    if args.show < 0:
        raise InvalidInputError(f"--show must be an integer >= 0, got {args.show}")
    out = Path(args.out) if args.out else Path("runs") / slug(args.concept)
    check_output_folder(out, RUN_FILES, overwrite=args.overwrite)
    args.out = str(out)  # for the interrupt message
    ckpt = out / CHECKPOINT_DIR
    if args.resume and not ckpt.exists():
        raise InvalidInputError(f"--resume: {out} holds no interrupted run ({CHECKPOINT_DIR}/ is missing); "
                                "run without --resume to start one")
    if ckpt.exists() and not args.resume:
        print(f"note: {out} holds an interrupted run; continuing it (delete {ckpt} to start over)", file=sys.stderr)
    t0 = time.perf_counter()
    pipe, clip = _load(model, clip_name, args, args.device)
    t_load = time.perf_counter() - t0
    dec = decompose(pipe, args.concept, clip=clip, settings=s, verbose=not args.quiet, refresh=args.refresh,
                    checkpoint_dir=ckpt)
    t_total = time.perf_counter() - t0
    dec.history["timings"].update(load_s=t_load, total_s=t_total)
    try:
        write_run(dec, pipe, out, overwrite=args.overwrite)
    except OSError as err:  # a full disk: the result is saved elsewhere, or printed (io.rescue)
        print(f"error: {rescue(dec, out, err)}", file=sys.stderr)
        return EXIT_FAILED
    shutil.rmtree(ckpt, ignore_errors=True)
    frame = dec.to_frame(args.show)
    print(f"\n{dec.concept!r} on {dec.model} with CLIP {dec.clip} (settings: {prof.name}): "
          f"top {len(frame)} of {len(dec.tokens)} dictionary tokens")
    print(frame[["rank", "token", "coefficient", "share"]].to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    tm = dec.history["timings"]
    print(f"\nbest validation step {dec.history.get('best_step')}; fit {tm['step_ms']:.1f} ms/step; total {t_total:.1f} s "
          f"(load {t_load:.1f}, images {tm['images_s']:.1f}, dictionary {tm['dictionary_s']:.1f}, "
          f"fit+validation {tm['fit_s']:.1f})")
    print(f"wrote {out}/" + ", ".join(RUN_FILES))
    return EXIT_OK


def cmd_batch(args) -> int:
    from accelerate import PartialState  # optional heavy dependency

    jobs = as_jobs(args.concepts)
    # CPU ranks (gloo) when asked, or when launched as several processes on a machine without CUDA
    state = PartialState(cpu=args.device == "cpu" or not torch.cuda.is_available())
    prof, model, clip_name, s = _settings(args, warn=state.is_main_process)
    for job in jobs:  # every check before any model is loaded
        try:
            validate_settings(s.replace(**job.overrides))
        except InvalidInputError as err:
            raise InvalidInputError(f"concept {job.concept!r}: {err}") from None
    check_out(args.out, jobs, s, overwrite=args.overwrite or args.recompute)  # never replaces a result unasked
    pipe, clip = _load(model, clip_name, args, args.device or state.device, note=state.is_main_process)
    df = decompose_many(pipe, jobs, args.out, clip=clip, settings=s, top=args.top, recompute=args.recompute,
                        overwrite=args.overwrite, refresh=args.refresh, verbose=not args.quiet, state=state,
                        faithfulness=args.faithfulness)
    if not state.is_main_process:
        return EXIT_OK
    n = df["status"].value_counts().to_dict()
    print(f"{len(df)} concepts: " + ", ".join(f"{v} {k}" for k, v in sorted(n.items())))
    for _, r in df[df["status"] == "failed"].iterrows():
        print(f"  failed {r['concept']!r}: {r['error']}", file=sys.stderr)
    print(f"wrote {Path(args.out) / 'summary.csv'} and summary.json")
    return EXIT_OK if n.get("done", 0) == len(df) else EXIT_FAILED


def cmd_report(args) -> int:
    if args.html and Path(args.html).exists() and not args.overwrite:  # --html names any file: never replace one
        raise OutputError(f"--html {args.html} exists: choose another file or pass --overwrite to replace it")
    print(f"wrote {build_report(args.out, args.html, top=args.top, compare=args.compare)}")
    return EXIT_OK


def cmd_export(args) -> int:
    dec, out = Decomposition.load(args.run), Path(args.embedding)
    if out.suffix != ".safetensors" or (out.exists() and not args.overwrite):  # before loading the model
        raise InvalidInputError(f"--embedding {out}: " + ("exists (pass --overwrite)" if out.suffix == ".safetensors"
                                                          else "must end in .safetensors"))
    pipe, token = load_pipeline(args.model or dec.model, device=args.device), args.token or default_token(dec)
    dec.save_embedding(out, pipe, token=token, overwrite=args.overwrite)
    print(f"wrote {out}: load it with diffusers' load_textual_inversion (README) and prompt {dec.template.format(token)!r}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    prof = profile()
    parser = argparse.ArgumentParser(prog="conceptor", description="Explain a concept of a text-to-image model.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("decompose", help="decompose a concept into weighted vocabulary tokens")
    p.add_argument("concept", help='the concept, e.g. "a dog"')
    p.add_argument("--out", help="output folder (default: runs/<concept>)")
    p.add_argument("--show", type=int, default=10, help="rows of the table to print")
    p.add_argument("--overwrite", action="store_true", help=f"replace an earlier run's {', '.join(RUN_FILES)} in --out")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out from its last checkpoint "
                   "(re-running the same command does too); the result equals an uninterrupted run's")
    add_run_flags(p, prof)
    p = sub.add_parser("batch", help="decompose every concept of a list (resumable; accelerate launch for many processes)",
                       description="Decompose every concept of a list into OUT/<slug>/ as `conceptor decompose` writes "
                       "it, then OUT/summary.csv and summary.json; a re-run skips finished concepts. Many processes: "
                       "accelerate launch -m conceptor_nb batch LIST --out OUT.")
    p.add_argument("concepts", help="a text file (one concept a line, # comments) or a CSV with a 'concept' column "
                   "and per-concept settings columns (seed, steps, ...)")
    p.add_argument("--out", default="runs", help="output folder (default: runs)")
    p.add_argument("--top", type=int, default=TOP_K, help="tokens per concept in the summary")
    p.add_argument("--recompute", action="store_true", help="decompose finished concepts again (replacing them)")
    p.add_argument("--faithfulness", type=int, default=0, metavar="N",
                   help="CLIP similarity of each result's renders to its concept images on N images, with the concept's "
                        "own other images (ceiling) and a random token's (floor), in the summary (0: not measured)")
    p.add_argument("--overwrite", action="store_true", help="replace finished results of other settings (without it "
                   "the batch refuses before any work); results of these settings are still skipped")
    add_run_flags(p, prof)
    p = sub.add_parser("report", help="a static offline HTML gallery of a batch folder")
    p.add_argument("out", help="the batch folder (conceptor batch --out)")
    p.add_argument("--html", help="the HTML file to write (default: OUT/index.html)")
    p.add_argument("--top", type=int, default=TOP_K, help="tokens per concept in the tables")
    p.add_argument("--overwrite", action="store_true", help="replace the file --html names if it exists")
    p.add_argument("--compare", metavar="OTHER", help="another run folder (OUT being one) or batch folder: the two side "
                   "by side with their comparison (default file: OUT/compare-<OTHER>.html)")
    p = sub.add_parser("export", help="write a run's pseudo-token as a textual-inversion file for diffusers",
                       description="Write the pseudo-token of a run (rescaled as the fit did) as a .safetensors file "
                       "that diffusers' load_textual_inversion reads (SDXL: clip_l and clip_g).")
    p.add_argument("run", help="a run folder (conceptor decompose --out)")
    p.add_argument("--embedding", required=True, help="the .safetensors file to write")
    p.add_argument("--token", help="the new token (default: <word>, e.g. <doctor>)")
    p.add_argument("--model", help="the model the run was fit on (default: the run's); only its vocabulary is read")
    p.add_argument("--device", default="cpu", help="where to load it (default: cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace the file --embedding names if it exists")
    for name, func in (("decompose", cmd_decompose), ("batch", cmd_batch), ("report", cmd_report),
                       ("export", cmd_export)):
        sub.choices[name].set_defaults(func=func)
    return parser


def main(argv=None) -> int:
    args = previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM: as Ctrl-C
    try:
        args = build_parser().parse_args(argv)  # build: CONCEPTOR_PROFILE may name no profile
        return args.func(args)
    except KeyboardInterrupt:
        ckpt = Path(getattr(args, "out", None) or ".") / CHECKPOINT_DIR
        print("interrupted: " + (f"its last checkpoint is in {ckpt}; run the same command again (or add --resume) to "
              "continue" if (ckpt / "fit_state.safetensors").exists() and getattr(args, "out", None)
              else "no checkpoint was reached; run the same command again to start over"), file=sys.stderr)
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
