"""Loading diffusion pipelines and CLIP models: real checkpoints, the toy world, a tiny random one.

``load_pipeline("toy")`` loads the shipped toy world, ``load_pipeline("tiny")``
builds a small random SD-shaped pipeline from config (meaningless weights, for
tests), and anything else goes to diffusers' ``from_pretrained`` (a hub id or a
local folder of a Stable Diffusion 1.x/2.x checkpoint).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import data_dir
from .tiny import clip_tokenizer
from .errors import ModelNotFoundError

TOY_HINT = (
    "The toy world is not in {path}. Train it with "
    "`python -m conceptor_nb.toyworld.train --spec conceptor_nb/data/toyworld/spec.json --out conceptor_nb/data/toyworld`, "
    "or use --model tiny (random weights) or a Stable Diffusion checkpoint."
)


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given (checked), else cuda, then mps, then cpu."""
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device} was asked for, but torch sees no CUDA GPU here; use device='cpu'")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("device 'mps' was asked for, but it is not available here; use device='cpu'")
    return device


def _toy_path(part: str) -> Path:
    path = data_dir() / "toyworld" / part
    if not (path / ("model_index.json" if part == "pipeline" else "config.json")).exists():
        raise ModelNotFoundError(TOY_HINT.format(path=path))
    return path


def _offline_hint(name: str, err: Exception) -> ModelNotFoundError:
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    how = "HF_HUB_OFFLINE is set, so only" if offline else "Only"
    return ModelNotFoundError(
        f"could not load model {name!r}: it is not a local folder, and it could not be loaded from the hub. "
        f"{how} checkpoints already in the local Hugging Face cache can be used. Short names: 'toy' "
        f"(shipped toy world), 'tiny' (random weights). Underlying error: {type(err).__name__}: {err}"
    )


def load_pipeline(name_or_path: str = "toy", device=None, dtype: torch.dtype | None = None, *, seed: int = 0):
    """A Stable-Diffusion-family diffusers pipeline, ready for Conceptor.

    ``name_or_path``: ``"toy"``, ``"tiny"``, a local folder or a hub id. ``dtype``
    defaults to float32 on CPU and float16 on GPU. Every parameter is frozen.
    """
    from diffusers import StableDiffusionPipeline

    if not name_or_path or not str(name_or_path).strip():
        raise ValueError("model name is empty: pass 'toy', 'tiny', a folder or a hub id")
    device = pick_device(device)
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else torch.float16
    name = str(name_or_path)
    if name == "tiny":
        from .tiny import tiny_pipeline

        pipe = tiny_pipeline(seed=seed)
    else:
        path = _toy_path("pipeline") if name == "toy" else name
        extra = {"tokenizer": clip_tokenizer()} if name == "toy" else {}  # one tokenizer copy is shipped
        try:
            pipe = StableDiffusionPipeline.from_pretrained(
                path, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False, **extra
            )
        except (OSError, ValueError, EnvironmentError) as err:
            raise _offline_hint(name, err) from err
    return prepare_pipeline(pipe, name, device, dtype)


def prepare_pipeline(pipe, name: str, device, dtype: torch.dtype):
    """Name, move and freeze a pipeline (eval mode, no gradients, no progress bars) for Conceptor."""
    pipe.conceptor_model = name  # the short name or path it was loaded from ('toy', 'tiny', ...)
    if pipe.unet.dtype != dtype:
        pipe.to(dtype=dtype)
    pipe.to(device)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
        module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass
class Clip:
    """A CLIP model with the few operations Conceptor needs, on image tensors in [0, 1]."""

    model: "torch.nn.Module"
    tokenizer: object
    name: str
    image_size: int
    mean: torch.Tensor
    std: torch.Tensor

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, torch.float32)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            # generated images are square: resize == resize-shortest-side + centre crop
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", antialias=True, align_corners=False)
        dtype = next(self.model.parameters()).dtype
        return ((x - self.mean.to(x.device)[:, None, None]) / self.std.to(x.device)[:, None, None]).to(dtype)

    @torch.no_grad()
    def image_features(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """L2-normalised image embeddings of float images (N, 3, H, W) in [0, 1]."""
        out = []
        for i in range(0, len(images), batch_size):
            f = _features(self.model.get_image_features(pixel_values=self._pixels(images[i : i + batch_size])))
            out.append(F.normalize(f.float(), dim=-1))
        return torch.cat(out)

    @torch.no_grad()
    def text_features_ids(self, input_ids: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        """L2-normalised text embeddings of already tokenized, equal-length sequences."""
        out = []
        for i in range(0, len(input_ids), batch_size):
            f = _features(self.model.get_text_features(input_ids=input_ids[i : i + batch_size].to(self.device)))
            out.append(F.normalize(f.float(), dim=-1))
        return torch.cat(out)

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").input_ids
        return self.text_features_ids(ids)


def _features(out) -> torch.Tensor:
    # transformers 4.x returns a tensor, 5.x an output whose pooler_output is the projection
    if isinstance(out, torch.Tensor):
        return out
    return out.pooler_output


def load_clip(name_or_path: str = "toy", device=None, dtype: torch.dtype | None = None, *, seed: int = 0) -> Clip:
    """A CLIP model for dictionary selection and image scoring.

    ``"toy"`` (shipped with the toy world), ``"tiny"`` (random), a folder or a hub id
    such as ``openai/clip-vit-base-patch32`` (the authors' choice for SD 2.1).
    """
    from transformers import CLIPModel, CLIPTokenizer

    if not name_or_path or not str(name_or_path).strip():
        raise ValueError("CLIP model name is empty: pass 'toy', 'tiny', a folder or a hub id")
    device = pick_device(device)
    name = str(name_or_path)
    if name == "tiny":
        from .tiny import tiny_clip

        model, tokenizer = tiny_clip(seed=seed)
    else:
        path = _toy_path("clip") if name == "toy" else name
        try:
            model = CLIPModel.from_pretrained(path)
            tokenizer = clip_tokenizer() if name == "toy" else CLIPTokenizer.from_pretrained(path)
        except (OSError, ValueError, EnvironmentError) as err:
            raise _offline_hint(name, err) from err
    model.to(device=device, dtype=dtype or torch.float32).eval().requires_grad_(False)
    # the resolved folder, not the short name: the toy CLIP's own mean/std are in its preprocessor_config.json
    mean, std, size = _image_norm(_toy_path("clip") if name == "toy" else name, model)
    return Clip(model, tokenizer, name, size, torch.tensor(mean), torch.tensor(std))


def _image_norm(path, model):
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    size = model.config.vision_config.image_size
    cfg = Path(str(path)) / "preprocessor_config.json"
    if cfg.exists():
        import json

        d = json.loads(cfg.read_text())
        mean, std = d.get("image_mean", mean), d.get("image_std", std)
    return mean, std, size


def model_name(pipe) -> str:
    """The name a pipeline was loaded under ('toy', 'tiny', a folder or hub id)."""
    return str(getattr(pipe, "conceptor_model", None) or getattr(pipe, "name_or_path", None) or type(pipe).__name__)


