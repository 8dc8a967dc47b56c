"""Generating images: the concept's images (cached on disk) and renders of pseudo-tokens."""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checks import concept_prompt  # noqa: F401  (the one concept parser lives in checks)
from .config import cache_dir as default_cache_dir
from .errors import CacheError
from .inject import pseudo_token, tokenize
from .models import model_name

SCHEDULERS = {
    "dpm": "DPMSolverMultistepScheduler",
    "lms": "LMSDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "pndm": "PNDMScheduler",
}


@contextmanager
def scheduler(pipe, name: str | None):
    """Use the named sampler for the block, then put the pipeline's own back."""
    if name is None:
        yield pipe.scheduler
        return
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}")
    old = pipe.scheduler
    pipe.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(old.config)
    try:
        yield pipe.scheduler
    finally:
        pipe.scheduler = old


SEED_STRIDE = 1_000_003  # run seeds are this far apart: runs with different seeds share no image
VAL_OFFSET = 500_000  # a run's validation images start here, inside its own stride


def image_seeds(seed: int, n: int, split: str = "train") -> list[int]:
    """The generator seeds of a run's ``n`` concept images: ``seed * 1_000_003 + i`` (``split="val"``:
    ``+ 500_000 + i``). The one mapping from a run's seed to its images, so that runs with different
    seeds (and a run's training and validation sets) are disjoint for up to 500,000 images each."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if not 0 <= n <= VAL_OFFSET:
        raise ValueError(f"n must be in 0..{VAL_OFFSET}, got {n}")
    start = int(seed) * SEED_STRIDE + (VAL_OFFSET if split == "val" else 0)
    return list(range(start, start + n))


@torch.no_grad()
def generate(pipe, prompt: str, seeds, *, steps: int = 50, guidance: float = 7.5, sampler: str | None = "dpm",
             pseudo: torch.Tensor | None = None, template: str = "a photo of a {}", batch_size: int = 8,
             verbose: bool = True, desc: str = "generating") -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1], one per seed; image i depends only on seeds[i].

    With ``pseudo`` (a (d,) pseudo-token, or (N, d), one per seed) the prompt is
    the template with the pseudo-token in it and ``prompt`` is ignored.
    """
    seeds = [int(s) for s in seeds]
    if pseudo is None:
        tokenize(pipe.tokenizer, prompt)  # clear error on a prompt longer than the context
    out = []
    with scheduler(pipe, sampler):
        for i in tqdm(range(0, len(seeds), batch_size), desc=desc, disable=not verbose, leave=False):
            chunk = seeds[i : i + batch_size]
            gens = [torch.Generator("cpu").manual_seed(s) for s in chunk]
            if pseudo is not None:
                vec = pseudo if pseudo.dim() == 1 else pseudo[i : i + batch_size]
                ctx = pseudo_token(pipe, vec, template)
            else:
                ctx = nullcontext(prompt)
            with ctx as text:
                images = pipe([text] * len(chunk), num_inference_steps=steps, guidance_scale=guidance,
                              generator=gens, output_type="pt").images
            out.append(images.float().cpu().clamp(0, 1))
    return torch.cat(out)


def _writable(folder: Path) -> Path:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CacheError(f"cannot create the cache folder {folder}: {err}. Set CONCEPTOR_CACHE or pass cache_dir=") from err
    if not os.access(folder, os.W_OK):
        raise CacheError(f"the cache folder {folder} is not writable. Set CONCEPTOR_CACHE or pass cache_dir=")
    return folder


def _hash_modules(h, modules: dict) -> None:
    """Every parameter/buffer of each module: its name, shape, dtype and 16 evenly spaced values."""
    with torch.no_grad():
        for part, module in modules.items():
            for name, p in module.state_dict().items():
                flat = p.detach().reshape(-1)
                sample = flat[:: max(1, flat.numel() // 16)][:16].cpu().contiguous()
                h.update(f"{part}.{name}|{tuple(p.shape)}|{p.dtype}|".encode())
                h.update(sample.view(torch.uint8).numpy().tobytes())


def _memo(obj, compute) -> str:
    memo = getattr(obj, "_conceptor_fingerprint", None)
    if memo is None:
        memo = compute()
        try:
            obj._conceptor_fingerprint = memo
        except AttributeError:  # pragma: no cover - an object that takes no attributes: not memoised
            pass
    return memo


def weights_fingerprint(pipe) -> str:
    """A short hash of the pipeline's weights and of the parts that shape its images (scheduler, tokenizer).

    Every parameter tensor of the UNet, VAE and text encoder(s) contributes its name, shape, dtype and 16
    evenly spaced values; retrained or edited weights under the same path get another fingerprint.
    Computed once per pipeline object and memoised on it (change weights in place: ``del
    pipe._conceptor_fingerprint``).
    """
    def compute():
        h = hashlib.sha256()
        parts = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}
        if getattr(pipe, "text_encoder_2", None) is not None:  # SDXL
            parts["text_encoder_2"] = pipe.text_encoder_2
        _hash_modules(h, parts)
        h.update(json.dumps(dict(pipe.scheduler.config), sort_keys=True, default=str).encode())
        h.update(str(len(pipe.tokenizer)).encode())
        return h.hexdigest()[:16]

    return _memo(pipe, compute)


def clip_fingerprint(clip) -> str:
    """The same for a CLIP model (``conceptor_nb.models.Clip``): its weights and tokenizer size."""
    def compute():
        h = hashlib.sha256()
        _hash_modules(h, {"clip": clip.model})
        h.update(str(len(clip.tokenizer)).encode())
        return h.hexdigest()[:16]

    return _memo(clip, compute)


def concept_images(pipe, prompt: str, n: int, seed: int = 0, *, steps: int = 50, guidance: float = 7.5,
                   sampler: str | None = "lms", batch_size: int = 8, cache_dir: str | Path | None = None,
                   refresh: bool = False, verbose: bool = True, split: str = "train") -> torch.Tensor:
    """``n`` images of ``prompt`` with the seeds ``image_seeds(seed, n, split)``, cached on disk.

    The cache key holds a fingerprint of the weights (not only the model's name), the prompt, seeds,
    steps, guidance, sampler, image size, dtype and device type; each entry carries a checksum, and an
    entry that fails it is regenerated (with a warning). ``refresh=True`` (CLI ``--refresh``)
    regenerates; ``cache_dir=False`` turns caching off.
    """
    from .results import load_verified, save_verified

    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    seeds = image_seeds(seed, n, split)
    kw = dict(steps=steps, guidance=guidance, sampler=sampler, batch_size=batch_size, verbose=verbose)
    if cache_dir is False:
        return generate(pipe, prompt, seeds, **kw)
    key = dict(model=model_name(pipe), weights=weights_fingerprint(pipe), prompt=prompt, seeds=[seeds[0], n],
               steps=steps, guidance=guidance, sampler=sampler, size=pipe.unet.config.sample_size,
               dtype=str(pipe.unet.dtype), device=pipe.unet.device.type)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    folder = _writable(Path(cache_dir or default_cache_dir()) / "images") / digest
    file = folder / "images.safetensors"
    if file.exists() and not refresh:
        try:
            tensors, meta = load_verified(file)
            images = tensors["images"]
            if meta.get("key") != json.dumps(key, sort_keys=True) or images.shape[0] != n:
                raise CacheError(f"{file} holds another entry")
            return images.float() / 255
        except (CacheError, KeyError) as err:
            warnings.warn(f"ignoring a bad image-cache entry ({err}); generating the images again", stacklevel=2)
    images = generate(pipe, prompt, seeds, desc=f"images of {prompt!r}", **kw)
    folder.mkdir(exist_ok=True)
    save_verified(file, {"images": (images * 255).round().to(torch.uint8)}, {"key": json.dumps(key, sort_keys=True)})
    return (images * 255).round() / 255
