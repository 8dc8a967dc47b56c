"""Generating images: the concept's images (cached on disk) and renders of pseudo-tokens."""
from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

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


def concept_prompt(concept: str, template: str = "a photo of a {}") -> str:
    """"a dog", "dog" -> "a photo of a dog"; a full prompt ("a photo of ...") is kept."""
    text = " ".join(str(concept).split())
    if not text:
        raise ValueError("the concept is empty: give a word or a short phrase, e.g. 'a president'")
    low = text.lower()
    if low.startswith("a photo of") or "{}" in text:
        return text
    for article in ("a ", "an ", "the "):
        if low.startswith(article) and len(text) > len(article):
            text = text[len(article):]
            break
    return template.format(text)


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


def concept_images(pipe, prompt: str, n: int, seed: int = 0, *, steps: int = 50, guidance: float = 7.5,
                   sampler: str | None = "lms", batch_size: int = 8, cache_dir: str | Path | None = None,
                   refresh: bool = False, verbose: bool = True, split: str = "train") -> torch.Tensor:
    """``n`` images of ``prompt`` with the seeds ``image_seeds(seed, n, split)``, cached on disk.

    The cache key holds the model, prompt, seeds, steps, guidance, sampler and
    image size; a hit skips generation. ``cache_dir=False`` turns caching off.
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    seeds = image_seeds(seed, n, split)
    kw = dict(steps=steps, guidance=guidance, sampler=sampler, batch_size=batch_size, verbose=verbose)
    if cache_dir is False:
        return generate(pipe, prompt, seeds, **kw)
    key = dict(model=model_name(pipe), prompt=prompt, seeds=[seeds[0], n],
               steps=steps, guidance=guidance, sampler=sampler, size=pipe.unet.config.sample_size,
               dtype=str(pipe.unet.dtype))
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    folder = _writable(Path(cache_dir or default_cache_dir()) / "images") / digest
    file = folder / "images.safetensors"
    if file.exists() and not refresh:
        try:
            images = load_file(file)["images"]
        except Exception as err:  # safetensors raises its own error types
            raise CacheError(f"the cached images in {file} cannot be read ({err}). Delete that folder or pass refresh=True") from err
        if images.shape[0] != n:
            raise CacheError(f"the cache entry {file} holds {images.shape[0]} images, expected {n}. Delete it or pass refresh=True")
        return images.float() / 255
    images = generate(pipe, prompt, seeds, desc=f"images of {prompt!r}", **kw)
    folder.mkdir(exist_ok=True)
    tmp = folder / "images.safetensors.tmp"
    save_file({"images": (images * 255).round().to(torch.uint8).contiguous()}, tmp)
    (folder / "meta.json").write_text(json.dumps(key, indent=1))
    tmp.replace(file)
    return (images * 255).round() / 255
