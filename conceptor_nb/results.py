"""Saving result dataclasses: JSON for the fields, safetensors for the tensors."""
from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def save_result(obj, folder, name: str, overwrite: bool = False) -> Path:
    """``folder/name.json`` (every non-tensor field) and ``folder/name.safetensors`` (tensor fields)."""
    folder = Path(folder)
    target = folder / f"{name}.json"
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True or choose another folder")
    folder.mkdir(parents=True, exist_ok=True)
    tensors, meta = {}, {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, torch.Tensor):
            tensors[f.name] = value.detach().cpu().contiguous()
        else:
            meta[f.name] = value
    if tensors:
        tmp = folder / f"{name}.safetensors.tmp"
        save_file(tensors, tmp)
        tmp.replace(folder / f"{name}.safetensors")
    tmp = folder / f"{name}.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(target)
    return folder


def load_result(cls, folder, name: str):
    folder = Path(folder)
    file = folder / f"{name}.json"
    if not file.exists():
        raise FileNotFoundError(f"no {name}.json in {folder}")
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from err
    st = folder / f"{name}.safetensors"
    if st.exists():
        meta.update(load_file(st))
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in meta.items() if k in names})
