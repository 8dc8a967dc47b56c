"""Reproduce the paper's decompositions with the authors' settings, and compare with the reported tokens.

``python -m conceptor_nb.reproduce`` decomposes the concepts the paper reports (Stable Diffusion 2.1-base,
CLIP ViT-B/32, 100/20 images, N=5000, n=50, 500 steps: the ``sd`` settings) and writes, under ``--out``:

* ``<concept>/``: each decomposition (``Decomposition.load`` reads it back), its concept and
  reconstruction images;
* ``reproduction.csv`` and ``reproduction.md``: per concept our top-10 tokens, the tokens the paper
  reports, and how many of those are in our top-10 (``overlap@10``, with the share of the reported ones);
* ``reproduction.png``: each concept's top-10 coefficients, reported tokens highlighted.

Meant for a GPU: an estimate (not yet measured on real weights) is 3-6 minutes a concept on one H100 with
the authors' settings (120 images at 50 steps, 500 fit steps of 6, 10 validations of 20 images), plus the
vocabulary embedding once per CLIP; see README.
Every setting can be overridden (``--steps 100`` ...) for a quicker look. A concept already decomposed
in ``--out`` is read back, not refitted (``--overwrite`` refits).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

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


def _norm(token: str) -> str:
    return token.lower().replace("</w>", "").strip()


def overlap(tokens: list[str], reported: list[str], k: int = 10) -> tuple[int, list[str]]:
    """How many of the ``reported`` tokens are among the first ``k`` of ``tokens``, and which."""
    top = {_norm(t) for t in tokens[:k]}
    found = [r for r in reported if _norm(r) in top]
    return len(found), found


def comparison_table(decompositions: dict, k: int = 10):
    """One row per concept: our top-k, the reported tokens, overlap@k (pandas)."""
    import pandas as pd

    rows = []
    for concept, dec in decompositions.items():
        reported = PAPER.get(concept, [])
        n, found = overlap(dec.tokens, reported, k)
        rows.append({"concept": concept, f"top-{k}": ", ".join(dec.tokens[:k]), "reported": ", ".join(reported),
                     f"overlap@{k}": n, "reported_found": n / len(reported) if reported else float("nan"),
                     "found": ", ".join(found), "fit_minutes": dec.history.get("timings", {}).get("total_s", float("nan")) / 60})
    return pd.DataFrame(rows)


def plot(decompositions: dict, path: Path, k: int = 10) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(decompositions)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, (concept, dec) in zip(axes.flat, decompositions.items()):
        reported = {_norm(r) for r in PAPER.get(concept, [])}
        top = dec.top(k)
        colors = ["C3" if _norm(t) in reported else "C0" for t, _ in top]
        ax.barh(range(len(top))[::-1], [c for _, c in top], color=colors)
        ax.set_yticks(range(len(top))[::-1], [t for t, _ in top], fontsize=8)
        ax.set_title(f"{concept} ({overlap(dec.tokens, list(reported), k)[0]}/{len(reported)} reported in top {k})", fontsize=9)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(concepts=None, *, out="reproduction", model: str | None = None, clip: str | None = None, device=None,
        overwrite: bool = False, verbose: bool = True, **overrides):
    """Decompose ``concepts`` (default: all of :data:`PAPER`) with the ``sd`` settings (``overrides`` on top);
    returns ``(decompositions, table)`` and writes the files listed in the module docstring."""
    from . import Decomposition, decompose, load_clip, load_pipeline
    from .config import SD_CLIP, SD_MODEL, settings
    from .viz import image_grid

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    s = settings("sd").replace(**{k: v for k, v in overrides.items() if v is not None})
    t0 = time.perf_counter()
    pipe = load_pipeline(model or SD_MODEL, device=device)
    clip_model = load_clip(clip or SD_CLIP, device=pipe.device)
    load_s = time.perf_counter() - t0
    decs = {}
    for concept in concepts or list(PAPER):
        folder = out / concept.replace(" ", "_")
        if (folder / "decomposition.json").exists() and not overwrite:
            decs[concept] = Decomposition.load(folder)
            continue
        t1 = time.perf_counter()
        dec = decompose(pipe, concept, clip=clip_model, settings=s, verbose=verbose)
        dec.history["timings"]["total_s"] = time.perf_counter() - t1
        dec.history["timings"]["load_s"] = load_s
        dec.save(folder, overwrite=True)
        n = min(8, s.n_train)
        image_grid(dec.concept_images(pipe, n), nrow=n).save(folder / "concept.png")
        image_grid(dec.render(pipe, dec.seeds(n)), nrow=n).save(folder / "reconstruction.png")
        decs[concept] = dec
        if verbose:
            print(f"{concept}: {', '.join(dec.tokens[:10])} ({dec.history['timings']['total_s'] / 60:.1f} min)", file=sys.stderr)
    table = comparison_table(decs)
    table.to_csv(out / "reproduction.csv", index=False)
    (out / "reproduction.md").write_text(table.to_markdown(index=False, floatfmt=".2f") if _has_tabulate()
                                         else table.to_string(index=False))
    plot(decs, out / "reproduction.png")
    return decs, table


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv=None) -> int:
    from dataclasses import fields

    from .config import Settings
    from .errors import ConceptorError

    p = argparse.ArgumentParser(prog="python -m conceptor_nb.reproduce", description=__doc__.splitlines()[0])
    p.add_argument("concepts", nargs="*", help=f"concepts (default: {', '.join(PAPER)})")
    p.add_argument("--out", default="reproduction", help="output folder (default: reproduction/)")
    p.add_argument("--model", help="default: stabilityai/stable-diffusion-2-1-base (the authors')")
    p.add_argument("--clip", help="default: openai/clip-vit-base-patch32")
    p.add_argument("--device", help="cuda, mps or cpu (default: the best there is)")
    p.add_argument("--overwrite", action="store_true", help="refit concepts already in --out")
    p.add_argument("--quiet", action="store_true")
    for f in fields(Settings):
        if f.name in ("clip_templates", "template") or f.type not in ("int", "float", "str"):
            continue
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type={"int": int, "float": float}.get(f.type, str))
    a = p.parse_args(argv)
    names = {f.name for f in fields(Settings)}
    overrides = {k: v for k, v in vars(a).items() if k in names and v is not None}
    try:
        _, table = run(a.concepts or None, out=a.out, model=a.model, clip=a.clip, device=a.device,
                       overwrite=a.overwrite, verbose=not a.quiet, **overrides)
    except (ConceptorError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(table.drop(columns=["top-10"]).to_string(index=False, float_format=lambda x: f"{x:.2f}"))
    print(f"wrote {a.out}/reproduction.csv, reproduction.md, reproduction.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
