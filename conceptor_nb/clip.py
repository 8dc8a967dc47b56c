"""CLIP: the package's tokenizer, the ``Clip`` wrapper (embeddings of images in [0, 1] and of texts),
``load_clip``, a tiny random CLIP for tests, and ``clip_for`` (the one "load the CLIP if none was given")."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import data_dir, default_clip_for
from .errors import InvalidInputError
from .loading import find_folder, model_name, not_found, offline, pick_device, quiet_loading, toy_path

with quiet_loading():
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTokenizer

TEXT_WIDTH = 32  # the tiny models' text width


def clip_tokenizer() -> CLIPTokenizer:
    """The CLIP tokenizer shipped in ``conceptor_nb/data/clip_tokenizer`` (used by the toy world and tiny models)."""
    return CLIPTokenizer.from_pretrained(data_dir() / "clip_tokenizer")


def tiny_text_config(width: int = TEXT_WIDTH) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407, projection_dim=width,
    )


def features_of(out) -> torch.Tensor:
    """The embedding ``get_image_features``/``get_text_features`` return: a tensor in transformers 4.x,
    an output whose ``pooler_output`` it is in 5.x."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@dataclass
class Clip:
    """A CLIP model with the few operations Conceptor needs, on image tensors in [0, 1]."""

    model: CLIPModel
    tokenizer: CLIPTokenizer
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
        return torch.cat([F.normalize(features_of(self.model.get_image_features(
            pixel_values=self._pixels(images[i: i + batch_size]))).float(), dim=-1)
            for i in range(0, len(images), batch_size)])

    @torch.no_grad()
    def text_features_ids(self, input_ids: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        """L2-normalised text embeddings of already tokenized, equal-length sequences."""
        return torch.cat([F.normalize(features_of(self.model.get_text_features(
            input_ids=input_ids[i: i + batch_size].to(self.device))).float(), dim=-1)
            for i in range(0, len(input_ids), batch_size)])

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").input_ids
        return self.text_features_ids(ids)


def tiny_clip(seed: int = 0) -> tuple[CLIPModel, CLIPTokenizer]:
    """A random CLIP (32 px images, text width 32) and the shipped tokenizer."""
    torch.manual_seed(seed)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=32, patch_size=8)
    config = CLIPConfig(text_config=tiny_text_config().to_dict(), vision_config=vision, projection_dim=16)
    return CLIPModel(config), clip_tokenizer()


def load_clip(name_or_path: str = "toy", device=None, dtype: torch.dtype | None = None, *, seed: int = 0) -> Clip:
    """A CLIP model for dictionary selection and image scoring: ``"toy"`` (shipped with the toy world),
    ``"tiny"`` (random), a folder or a hub id such as ``openai/clip-vit-base-patch32``. A folder without tokenizer
    files (the toy world's CLIP) gets the shipped CLIP tokenizer."""
    if not name_or_path or not str(name_or_path).strip():
        raise ValueError("CLIP model name is empty: pass 'toy', 'tiny', a folder or a hub id")
    device = pick_device(device)
    name = str(name_or_path)
    path = None
    if name == "tiny":
        model, tokenizer = tiny_clip(seed=seed)
    else:
        folder = Path(name)
        if name != "toy" and folder.is_dir() and not any(folder.glob("*.safetensors")):  # before any unpickling
            held = ", ".join(sorted(p.name for p in folder.iterdir())[:6]) or "nothing"
            raise InvalidInputError(f"CLIP folder {folder} holds no .safetensors weights (it holds {held}); pickled "
                                    "weights (.bin, .pt, .pkl) are never loaded, as loading them can run code. Convert "
                                    "them (model.save_pretrained(folder, safe_serialization=True)) or pass a hub id")
        path = toy_path("clip") if name == "toy" else find_folder(name, "config.json")
        if path is None and offline():
            raise not_found(name)
        try:
            with quiet_loading():
                model = CLIPModel.from_pretrained(path or name, use_safetensors=True)  # never a pickle
                own = path is None or any((Path(path) / f).exists() for f in ("vocab.json", "tokenizer.json"))
                tokenizer = CLIPTokenizer.from_pretrained(path or name) if name != "toy" and own else clip_tokenizer()
        except (OSError, ValueError) as err:
            raise not_found(name, err) from err
    model.to(device=device, dtype=dtype or torch.float32).eval().requires_grad_(False)
    # the resolved folder's preprocessor_config.json (the toy CLIP has its own mean/std), else OpenAI's
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    if path is not None and (Path(path) / "preprocessor_config.json").exists():
        d = json.loads((Path(path) / "preprocessor_config.json").read_text())
        mean, std = d.get("image_mean", mean), d.get("image_std", std)
    return Clip(model, tokenizer, name, model.config.vision_config.image_size, torch.tensor(mean), torch.tensor(std))


def clip_for(pipe, clip=None) -> Clip:
    """``clip`` itself when it is a loaded CLIP; loaded when it is a name; None: the CLIP of the pipeline's
    profile (``config.default_clip_for``). Loaded CLIPs go on the pipeline's device."""
    if clip is not None and not isinstance(clip, str):
        return clip
    return load_clip(clip or default_clip_for(model_name(pipe)), device=pipe.device)
