"""Files: the one atomic writer, strict JSON, checksummed safetensors, saved results, run folders and slugs.

Every file is written to a unique temporary name beside its target and renamed over it (with the permissions a
plain ``open`` gives): a reader sees the old file or the new one. JSON is strict: NaN and infinities become null.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import sys
import time
import unicodedata
from dataclasses import fields
from io import BytesIO
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .config import cache_dir, figures_dir, profile_name
from .errors import CacheError, InvalidInputError, OutputError, ResultNotFoundError
from .viz import image_grid

# a run folder, as ``conceptor decompose`` and ``conceptor batch`` write it (decomposition.json last)
RUN_FILES = ("decomposition.json", "coefficients.safetensors", "concept.png", "reconstruction.png")
CHECKPOINT_DIR = ".checkpoint"  # inside a run folder: the fit's state while it runs (removed once saved)


def atomic_write(path, data: bytes | str) -> Path:
    """Write ``data`` (str: UTF-8) to ``path`` atomically; concurrent writers never share a temporary file."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # a new file, permissions as open() gives them
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def json_safe(obj):
    """``obj`` with NaN/inf floats as None, tuples as lists, numpy scalars and one-element tensors as numbers."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic) or (isinstance(obj, torch.Tensor) and obj.numel() == 1):
        return json_safe(obj.item())
    return obj


def dumps(obj, indent: int | None = 1) -> str:
    return json.dumps(json_safe(obj), indent=indent, allow_nan=False)


def read_json(file) -> dict:
    """A JSON object from ``file``; InvalidInputError when the file is not one."""
    file = Path(file)
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:  # RecursionError: nested too deep
        raise InvalidInputError(f"{file} is not valid JSON ({type(err).__name__}: {err}); restore it or save the "
                                "result again") from err
    if not isinstance(meta, dict):
        raise InvalidInputError(f"{file} must hold a JSON object, it holds a {type(meta).__name__}")
    return meta


def tensors_digest(tensors: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_verified(path, tensors: dict, metadata: dict | None = None) -> Path:
    """Safetensors with a checksum of the tensors in its header, written atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {k: (v if isinstance(v, str) else dumps(v, None)) for k, v in (metadata or {}).items()}
    meta["sha256"] = tensors_digest(tensors)
    return atomic_write(path, st_save(tensors, metadata=meta))


def load_verified(path) -> tuple[dict, dict]:
    """(tensors, metadata) of a :func:`save_verified` file; CacheError if unreadable, unchecksummed or changed."""
    path = Path(path)
    try:
        tensors = st_load(path.read_bytes())
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types
        raise CacheError(f"{path} cannot be read ({type(err).__name__}: {err})") from err
    if "sha256" not in meta:
        raise CacheError(f"{path} has no checksum (written by an older version)")
    if tensors_digest(tensors) != meta["sha256"]:
        raise CacheError(f"{path} does not match its checksum (the file was changed or damaged)")
    return tensors, meta


def write_files(folder, files: dict, *, overwrite: bool = False) -> Path:
    """Write ``{name: bytes}`` into ``folder``, each atomically, in order (make the last the one that says the
    result is complete). Refuses, before writing anything, when one exists and not ``overwrite``."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder} is a file, not a folder")
    existing = [n for n in files if (folder / n).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{folder} already holds {', '.join(existing)}; pass overwrite=True (or --overwrite) "
                              "or choose another folder")
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        atomic_write(folder / name, data)
    return folder


def save_result(obj, folder, name: str, overwrite: bool = False) -> Path:
    """A result dataclass as ``folder/name.safetensors`` (its tensor fields) and ``folder/name.json`` (the rest)."""
    tensors = {f.name: getattr(obj, f.name) for f in fields(obj) if isinstance(getattr(obj, f.name), torch.Tensor)}
    meta = {f.name: getattr(obj, f.name) for f in fields(obj) if f.name not in tensors}
    files = {f"{name}.safetensors": st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})} \
        if tensors else {}
    files[f"{name}.json"] = dumps(meta).encode()
    return write_files(folder, files, overwrite=overwrite)


def load_result(cls, folder, name: str):
    """The ``cls`` that :func:`save_result` wrote as ``name`` into ``folder``."""
    folder = Path(folder)
    file = folder / f"{name}.json"
    if not file.exists():
        raise ResultNotFoundError(f"no {name}.json in {folder}")
    meta = read_json(file)
    st = folder / f"{name}.safetensors"
    if st.exists():
        try:
            meta.update(st_load(st.read_bytes()))
        except Exception as err:
            raise InvalidInputError(f"{st} cannot be read ({err})") from err
    try:
        return cls(**{k: v for k, v in meta.items() if k in {f.name for f in fields(cls)}})
    except TypeError as err:
        raise InvalidInputError(f"{file} is not a valid {cls.__name__}: {err}") from err


def slug(text, max_len: int = 48, *, key: str | None = None) -> str:
    """A folder name for ``text``: its words in any script (NFKC, lower-case; a symbol such as an emoji by its
    Unicode name) joined by "-" ("A dog!" -> "a-dog", "日本の犬" -> "日本の犬", "🍎 🍋" -> "red-apple-lemon";
    "concept" if none). With a ``key`` (e.g. the exact text), or when longer than ``max_len`` (then cut), it ends
    with 8 hex digits of the key's (else the text's) SHA-256: two keys never share a name."""
    text = str(text)
    spelled = (c if c.isalnum() else f" {unicodedata.name(c, '')} " if unicodedata.category(c) == "So" else " "
               for c in unicodedata.normalize("NFKC", text))
    name = "-".join(re.findall(r"[^\W_]+", "".join(spelled).lower())) or "concept"
    if len(name) <= max_len and key is None:
        return name
    return name[: max_len - 9].rstrip("-") + "-" + hashlib.sha256((text if key is None else key).encode()).hexdigest()[:8]


def write_run(dec, pipe, out, *, overwrite: bool = False, n_grid: int = 8) -> Path:
    """Write ``dec`` into the run folder ``out``: ``concept.png`` (its first training images), ``reconstruction.png``
    (the pseudo-token rendered with the same seeds), then ``Decomposition.save``'s files, ``decomposition.json``
    last, so a folder that holds it is complete. If a write fails (a full disk), the files this call created are
    removed again: nothing partial is left to block a re-run."""
    out = Path(out)
    if (out / "decomposition.json").exists() and not overwrite:
        raise FileExistsError(f"{out}/decomposition.json exists; pass --overwrite or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    new = [out / f for f in RUN_FILES if not (out / f).exists()]
    try:
        n = min(n_grid, dec.settings.n_train)
        concept = dec.concept_images(pipe, n)
        upscale = max(1, 256 // concept.shape[-1])
        for name, images in (("concept", concept), ("reconstruction", dec.render(pipe, dec.seeds(n)))):
            buf = BytesIO()
            image_grid(images, nrow=n, upscale=upscale).save(buf, format="png")
            atomic_write(out / f"{name}.png", buf.getvalue())
        dec.save(out, overwrite=True)
    except BaseException:
        for f in new:
            f.unlink(missing_ok=True)
        raise
    return out


def rescue(dec, out, err: Exception) -> str:
    """Writing ``out`` failed after a fit: save ``dec`` under ``<cache>/rescued/`` instead, or, when that fails too,
    print it to stderr as the JSON of a decomposition (tokens, ids, coefficients). Returns the message to show."""
    safe = cache_dir() / "rescued" / f"{slug(Path(out).name or 'run', 32)}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        dec.save(safe)
        return f"could not write {out} ({err}); the decomposition was saved to {safe} instead"
    except Exception as err2:  # noqa: BLE001 - the last resort: the result goes to stderr
        keep = ("concept", "tokens", "token_ids", "coefficients", "n_tokens", "norm", "template", "prompt", "model", "clip")
        print(dumps({k: getattr(dec, k) for k in keep}, None), file=sys.stderr, flush=True)
        return (f"could not write {out} ({err}), nor {safe} ({err2}); the decomposition is printed above as JSON: save "
                "it as decomposition.json in a folder and Decomposition.load that folder")


def is_complete(out) -> bool:
    """Every file of a run folder is there."""
    return all((Path(out) / f).exists() for f in RUN_FILES)


def save_figure(fig, name: str, dpi: int = 120, data: dict | None = None):
    """Save ``fig`` as ``<figures_dir>/<name>.png`` (see ``config.figures_dir``), and ``data`` (what the figure
    shows, for tests to compare with a fresh run) as ``<name>.json`` beside it; returns the PNG's path."""
    folder = figures_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    if data is not None:
        atomic_write(folder / f"{name}.json", dumps({"profile": profile_name(), **data}, indent=1))
    return path
