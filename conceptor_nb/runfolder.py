"""One decomposition's output folder, as ``conceptor decompose`` and ``conceptor batch`` write it.

``decomposition.json`` + ``coefficients.safetensors`` (``Decomposition.save``), ``concept.png`` (the
first training images) and ``reconstruction.png`` (the pseudo-token rendered with the same seeds).
The pictures are written first and ``decomposition.json`` last (atomically), so a folder whose
``decomposition.json`` exists is complete.
"""
from __future__ import annotations

from pathlib import Path

RUN_FILES = ("decomposition.json", "coefficients.safetensors", "concept.png", "reconstruction.png")


def write_run(dec, pipe, out, *, overwrite: bool = False, n_grid: int = 8) -> Path:
    """Write ``dec`` and its concept/reconstruction grids into ``out``; returns ``out``."""
    import io

    from .results import atomic_write
    from .viz import image_grid

    out = Path(out)
    if (out / "decomposition.json").exists() and not overwrite:
        raise FileExistsError(f"{out}/decomposition.json exists; pass --overwrite or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    n = min(n_grid, dec.settings.n_train)
    concept = dec.concept_images(pipe, n)
    upscale = max(1, 256 // concept.shape[-1])
    for name, images in (("concept", concept), ("reconstruction", dec.render(pipe, dec.seeds(n)))):
        buf = io.BytesIO()
        image_grid(images, nrow=n, upscale=upscale).save(buf, format="png")
        atomic_write(out / f"{name}.png", buf.getvalue())
    dec.save(out, overwrite=True)  # last: its presence marks the folder complete
    return out


def is_complete(out) -> bool:
    """Every file of a run folder is there (``decomposition.json`` is written last)."""
    return all((Path(out) / f).exists() for f in RUN_FILES)
