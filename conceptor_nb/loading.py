"""What loading a pipeline and loading a CLIP share: the device, finding a model (a local folder, the
Hugging Face cache, the shipped toy world), silencing the libraries' notices, and the not-found error."""
from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import diffusers.utils.logging as dlog
import torch
import transformers.utils.logging as tlog
from huggingface_hub import constants, try_to_load_from_cache

from .config import data_dir
from .errors import ModelNotFoundError

def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given (checked), else cuda, then mps, then cpu."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device} was asked for, but torch sees no CUDA GPU here; use device='cpu'")
    if device.type == "mps" and not mps:
        raise RuntimeError("device 'mps' was asked for, but it is not available here; use device='cpu'")
    return device


def model_name(pipe) -> str:
    """The name a pipeline was loaded under ('toy', 'tiny', a folder, hub id or file)."""
    return str(getattr(pipe, "conceptor_model", None) or getattr(pipe, "name_or_path", None) or type(pipe).__name__)


@contextmanager
def quiet_loading():
    """Silence what loading prints that a user can do nothing about: progress bars, transformers'
    torchvision fallback notice, diffusers' offline-cache notes and deprecation warnings."""
    levels = (tlog.get_verbosity(), dlog.get_verbosity())
    bars = (tlog.is_progress_bar_enabled(), dlog.is_progress_bar_enabled())
    for log in (tlog, dlog):
        log.set_verbosity_error()
        log.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", message=".*(torch_dtype|deprecated|safety checker).*")
            yield
    finally:
        for log, level, bar in zip((tlog, dlog), levels, bars):
            log.set_verbosity(level)
            if bar:
                log.enable_progress_bar()


def hub_cache() -> str:
    """The hub cache folder as the environment says now (HF_HUB_CACHE, else HF_HOME/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]).expanduser() / "hub")
    return str(constants.HF_HUB_CACHE)


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")


def root_cause(err: Exception) -> str:
    """The innermost error of a chain, as text (diffusers' own message says "see the stacktrace above",
    which a caught error does not show)."""
    while err.__cause__ is not None:
        err = err.__cause__
    return f"{type(err).__name__}: " + str(err).replace(" Please check out the root cause in the stacktrace above.", "")


def not_found(name: str, err: Exception | None = None) -> ModelNotFoundError:
    how = "HF_HUB_OFFLINE is set, so only" if offline() else "Only"
    return ModelNotFoundError(
        f"could not load model {name!r}: it is not a local folder, and it is not in the local Hugging Face cache "
        f"({hub_cache()}). {how} checkpoints already in that cache can be used (set HF_HOME to where they are). "
        f"Short names: 'toy' (shipped toy world), 'tiny' (random weights); a single checkpoint file "
        f"(*.safetensors) also works." + (f" Underlying error: {root_cause(err)}" if err is not None else ""))


def find_folder(name: str, file: str = "model_index.json") -> Path | None:
    """A local folder, or the cached snapshot of hub id ``name`` that holds ``file``; else None."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if name.count("/") != 1 or path.exists():
        return None
    try:
        found = try_to_load_from_cache(name, file, cache_dir=hub_cache())
    except Exception:  # an id the hub library refuses (bad characters): not in the cache
        return None
    return Path(found).parent if isinstance(found, str) else None


def toy_path(part: str) -> Path:
    """The shipped toy world's ``pipeline`` or ``clip`` folder."""
    path = data_dir() / "toyworld" / part
    if not (path / ("model_index.json" if part == "pipeline" else "config.json")).exists():
        raise ModelNotFoundError(
            f"The toy world is not in {path}. Train it with `python -m conceptor_nb.toyworld.train --spec "
            f"conceptor_nb/data/toyworld/spec.json --out conceptor_nb/data/toyworld`, or use --model tiny (random "
            f"weights) or a Stable Diffusion checkpoint.")
    return path
