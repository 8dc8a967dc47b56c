"""Files: the one atomic writer, strict JSON, checksummed safetensors, and saving result dataclasses.

* Every file is written to a unique temporary name beside its target, flushed, given the
  user's umask permissions, and renamed over the target (atomic on POSIX and Windows): a reader
  sees the old file or the new one, never half of one, and concurrent writers never share a temp file.
* JSON is strict: NaN and infinities are written as ``null`` (strict parsers reject bare NaN).
* Cache files carry a SHA-256 of their tensors in the safetensors header; a reader checks it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import fields
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import CacheError, InvalidInputError, OutputError


class ResultNotFoundError(InvalidInputError, FileNotFoundError):
    """The folder holds no saved result of that kind."""


def _umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it (and put it back at once)
    os.umask(mask)
    return mask


def atomic_write(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically, with the permissions a plain ``open(path, 'w')`` gives."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def json_safe(obj):
    """``obj`` with NaN/inf floats replaced by None and tuples by lists (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return json_safe(obj.item())
    return obj


def dumps(obj, indent: int | None = 1) -> str:
    return json.dumps(json_safe(obj), indent=indent, allow_nan=False)


def read_json(file) -> dict:
    """A JSON object from ``file``; a clear InvalidInputError when the file is not one."""
    file = Path(file)
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InvalidInputError(f"{file} is not valid JSON ({err}); restore it or save the result again") from err
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
    """(tensors, metadata) of a file written by :func:`save_verified`; CacheError if it is unreadable,
    has no checksum, or its tensors do not match the checksum."""
    path = Path(path)
    try:
        data = path.read_bytes()
        tensors = st_load(data)
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types
        raise CacheError(f"{path} cannot be read ({type(err).__name__}: {err})") from err
    want = meta.get("sha256")
    if want is None:
        raise CacheError(f"{path} has no checksum (written by an older version)")
    if tensors_digest(tensors) != want:
        raise CacheError(f"{path} does not match its checksum (the file was changed or damaged)")
    return tensors, meta


def write_files(folder, files: dict, *, overwrite: bool = False) -> Path:
    """Write ``{name: bytes}`` into ``folder`` atomically, the last one last (make it the file that says the
    result is complete). Refuses, before writing anything, when any of them exists and not ``overwrite``."""
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
    """``folder/name.json`` (every non-tensor field) and ``folder/name.safetensors`` (tensor fields)."""
    tensors, meta = {}, {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, torch.Tensor):
            tensors[f.name] = value.detach().cpu().contiguous()
        else:
            meta[f.name] = value
    files = {f"{name}.safetensors": st_save(tensors)} if tensors else {}
    files[f"{name}.json"] = dumps(meta).encode()
    return write_files(folder, files, overwrite=overwrite)


def load_result(cls, folder, name: str):
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
    names = {f.name for f in fields(cls)}
    try:
        return cls(**{k: v for k, v in meta.items() if k in names})
    except TypeError as err:
        raise InvalidInputError(f"{file} is not a valid {cls.__name__}: {err}") from err
