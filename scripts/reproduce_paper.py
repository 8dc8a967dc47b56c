"""Reproduce the paper's decompositions with the authors' settings and compare with the tokens it reports.

    python scripts/reproduce_paper.py [CONCEPT ...] [--out reproduction] [--steps 100 ...]

Decomposes the concepts the paper reports (default: all of ``PAPER``) with the ``sd`` profile (Stable
Diffusion 2.1-base, CLIP ViT-B/32, the authors' settings; every setting is a flag) and writes, under
``--out``: one run folder per concept (as ``conceptor decompose`` writes it; a concept already there is read
back unless ``--overwrite``), ``reproduction.csv`` and ``.md`` (our top-10, the reported tokens, overlap@10)
and ``reproduction.png`` (each concept's top-10 coefficients, reported tokens highlighted). Meant for a GPU.
"""
from __future__ import annotations

import argparse
import sys
import time
from io import BytesIO
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from conceptor_nb import Decomposition, decompose, load_clip, load_pipeline
from conceptor_nb.cli import add_settings_flags, settings_overrides
from conceptor_nb.config import SD_MODEL, profile, resolve
from conceptor_nb.errors import ConceptorError
from conceptor_nb.io import atomic_write, slug, write_run
from conceptor_nb.method.dictionary import clean_token

try:
    import tabulate  # noqa: F401  (pandas' to_markdown needs it)
except ImportError:
    tabulate = None

# The tokens the paper reports for Stable Diffusion 2.1 (shared/REFERENCE.md, "Reported findings").
PAPER = {
    "a president": ["obama", "lincoln", "trump", "adams", "nixon", "biden", "washington", "clinton"],
    "a composer": ["schubert", "chopin", "pianist", "wagner", "beethoven", "mozart"],
    "a dog": ["golden", "husky", "pet", "collie", "snoopy", "corgi"],
    "paris": ["eiffel", "tower", "versailles", "french"],
    "happiness": ["family", "laughter", "friendship", "emotion"],
    "a camel": ["giraffe", "cashmere"],
    "a snail": ["ladybug", "winding"],
    "a dietitian": ["pharmacist", "nutritious"],
}


def overlap(tokens: list[str], reported: list[str], k: int = 10) -> tuple[int, list[str]]:
    """How many of the ``reported`` tokens are among the first ``k`` of ``tokens``, and which."""
    top = {clean_token(t) for t in tokens[:k]}
    found = [r for r in reported if clean_token(r) in top]
    return len(found), found


def comparison_table(decompositions: dict, k: int = 10) -> pd.DataFrame:
    """One row per concept: our top-k, the reported tokens, overlap@k."""
    rows = []
    for concept, dec in decompositions.items():
        reported = PAPER.get(concept, [])
        n, found = overlap(dec.tokens, reported, k)
        rows.append({"concept": concept, f"top-{k}": ", ".join(dec.tokens[:k]), "reported": ", ".join(reported),
                     f"overlap@{k}": n, "reported_found": n / len(reported) if reported else float("nan"),
                     "found": ", ".join(found), "fit_minutes": dec.history.get("timings", {}).get("total_s", float("nan")) / 60})
    return pd.DataFrame(rows)


def plot(decompositions: dict, path: Path, k: int = 10) -> None:
    n = len(decompositions)
    cols = min(4, n)
    fig = Figure(figsize=(4 * cols, 3.2 * ((n + cols - 1) // cols)))
    axes = fig.subplots((n + cols - 1) // cols, cols, squeeze=False)
    for ax, (concept, dec) in zip(axes.flat, decompositions.items()):
        reported = {clean_token(r) for r in PAPER.get(concept, [])}
        top = dec.top(k)
        ax.barh(range(len(top))[::-1], [c for _, c in top], color=["C3" if clean_token(t) in reported else "C0" for t, _ in top])
        ax.set_yticks(range(len(top))[::-1], [t for t, _ in top], fontsize=8)
        ax.set_title(f"{concept} ({overlap(dec.tokens, list(reported), k)[0]}/{len(reported)} reported in top {k})", fontsize=9)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write(path, buf.getvalue())


def run(concepts=None, *, out="reproduction", model: str | None = None, clip: str | None = None, device=None,
        overwrite: bool = False, verbose: bool = True, **overrides):
    """Decompose ``concepts`` (default: all of :data:`PAPER`) with the settings of the model's profile (``sd`` for
    Stable Diffusion) and ``overrides``; returns ``(decompositions, table)`` and writes the files listed above."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prof, model, clip = resolve(model or SD_MODEL, clip, warn=False)
    s = prof.settings.replace(**overrides)
    t0 = time.perf_counter()
    pipe = load_pipeline(model, device=device)
    clip_model = load_clip(clip, device=pipe.device)
    load_s = time.perf_counter() - t0
    decs = {}
    for concept in concepts or list(PAPER):
        folder = out / slug(concept).replace("-", "_")
        if (folder / "decomposition.json").exists() and not overwrite:
            decs[concept] = Decomposition.load(folder)
            continue
        t1 = time.perf_counter()
        dec = decompose(pipe, concept, clip=clip_model, settings=s, verbose=verbose)
        dec.history["timings"].update(total_s=time.perf_counter() - t1, load_s=load_s)
        write_run(dec, pipe, folder, overwrite=True)
        decs[concept] = dec
        if verbose:
            print(f"{concept}: {', '.join(dec.tokens[:10])} ({dec.history['timings']['total_s'] / 60:.1f} min)", file=sys.stderr)
    table = comparison_table(decs)
    atomic_write(out / "reproduction.csv", table.to_csv(index=False))
    atomic_write(out / "reproduction.md", table.to_markdown(index=False, floatfmt=".2f") if tabulate
                 else table.to_string(index=False))
    plot(decs, out / "reproduction.png")
    return decs, table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/reproduce_paper.py", description=__doc__.splitlines()[0])
    p.add_argument("concepts", nargs="*", help=f"concepts (default: {', '.join(PAPER)})")
    p.add_argument("--out", default="reproduction", help="output folder (default: reproduction/)")
    p.add_argument("--model", help=f"default: {SD_MODEL} (the authors')")
    p.add_argument("--clip", help="default: the model's profile's (openai/clip-vit-base-patch32 for Stable Diffusion)")
    p.add_argument("--device", help="cuda, mps or cpu (default: the best there is)")
    p.add_argument("--overwrite", action="store_true", help="refit concepts already in --out")
    p.add_argument("--quiet", action="store_true")
    add_settings_flags(p, profile("sd"))
    a = p.parse_args(argv)
    try:
        _, table = run(a.concepts or None, out=a.out, model=a.model, clip=a.clip, device=a.device,
                       overwrite=a.overwrite, verbose=not a.quiet, **settings_overrides(a))
    except (ConceptorError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(table.drop(columns=["top-10"]).to_string(index=False, float_format=lambda x: f"{x:.2f}"))
    print(f"wrote {a.out}/reproduction.csv, reproduction.md, reproduction.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
