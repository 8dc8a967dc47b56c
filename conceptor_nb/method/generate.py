"""Images: samplers, the seeds of a run's images, ``generate`` (a prompt, or the template with a
pseudo-token), the concept's images cached on disk, and the weight fingerprints that key the caches."""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from contextlib import nullcontext
from pathlib import Path

import diffusers
import torch
from tqdm.auto import tqdm

from ..config import SEED_STRIDE, TEMPLATE, Settings
from ..config import cache_dir as default_cache_dir
from ..errors import CacheError
from ..models import model_name
from ..io import load_verified, save_verified
from .inject import pseudo_token, tokenize

SCHEDULERS = {"dpm": diffusers.DPMSolverMultistepScheduler, "lms": diffusers.LMSDiscreteScheduler,
              "ddim": diffusers.DDIMScheduler, "euler": diffusers.EulerDiscreteScheduler,
              "pndm": diffusers.PNDMScheduler}
DEFAULT = Settings()  # the defaults of generate and concept_images: gen_steps, guidance, sampler
OFFSETS = {"train": 0, "val": 500_000, "test": 750_000}  # where a run's images of each split start in its stride


def image_seeds(seed: int, n: int, split: str = "train") -> list[int]:
    """The generator seeds of a run's ``n`` images: ``seed * 1_000_003 + OFFSETS[split] + i``, so runs with
    different seeds, and a run's training, validation and test (held-out) images, never share an image."""
    if split not in OFFSETS:
        raise ValueError(f"split must be one of {', '.join(OFFSETS)}, got {split!r}")
    if not 0 <= n <= 250_000:
        raise ValueError(f"n must be in 0..250000, got {n}")
    return list(range(int(seed) * SEED_STRIDE + OFFSETS[split], int(seed) * SEED_STRIDE + OFFSETS[split] + n))


@torch.no_grad()
def generate(pipe, prompt: str, seeds, *, steps: int = DEFAULT.gen_steps, guidance: float = DEFAULT.guidance,
             sampler: str | None = DEFAULT.sampler, pseudo: torch.Tensor | None = None, template: str = TEMPLATE,
             batch_size: int = 8, verbose: bool = True, desc: str = "generating") -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1], one per seed; image i depends only on seeds[i]. With ``pseudo`` ((d,), or
    (N, d): one per seed) the prompt is ``template`` with the pseudo-token in it and ``prompt`` is ignored."""
    seeds = [int(s) for s in seeds]
    if pseudo is None:
        tokenize(pipe.tokenizer, prompt)  # a clear error on a prompt longer than the context
    if sampler is not None and sampler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {sampler!r}; choose one of {sorted(SCHEDULERS)}")
    out, own = [], pipe.scheduler
    if sampler is not None:  # the pipeline's own sampler is put back after
        pipe.scheduler = SCHEDULERS[sampler].from_config(own.config)
    try:
        for i in tqdm(range(0, len(seeds), batch_size), desc=desc, disable=not verbose, leave=False):
            chunk = seeds[i : i + batch_size]
            gens = [torch.Generator("cpu").manual_seed(s) for s in chunk]
            if pseudo is None:
                ctx = nullcontext(prompt)
            else:
                ctx = pseudo_token(pipe, pseudo if pseudo.dim() == 1 else pseudo[i : i + batch_size], template)
            with ctx as text:
                images = pipe([text] * len(chunk), num_inference_steps=steps, guidance_scale=guidance,
                              generator=gens, output_type="pt").images
            out.append(images.float().cpu().clamp(0, 1))
    finally:
        pipe.scheduler = own
    return torch.cat(out)


def cache_entry(cache_dir, kind: str, key: dict) -> tuple[Path, str]:
    """(folder ``<cache>/<kind>``, created and writable, else CacheError; the key's digest)."""
    folder = Path(cache_dir or default_cache_dir()) / kind
    hint = "Set CONCEPTOR_CACHE or pass cache_dir="
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CacheError(f"cannot create the cache folder {folder}: {err}. {hint}") from err
    if not os.access(folder, os.W_OK):
        raise CacheError(f"the cache folder {folder} is not writable. {hint}")
    return folder, hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _fingerprint(obj, modules: dict, extra: str) -> str:
    """A short SHA-256 of every byte of each module's parameters and buffers (with names, shapes, dtypes) and of
    ``extra``. Memoised on ``obj`` until a tensor is changed in place (torch's version counters tell) or replaced
    (its memory moves), or ``extra`` changes (another scheduler, a LoRA)."""
    tensors = [(f"{part}.{name}", p) for part, module in modules.items() for name, p in module.state_dict().items()]
    versions = (tuple((p._version, p.data_ptr()) for _, p in tensors), extra)
    memo = getattr(obj, "_conceptor_fingerprint", None)
    if memo is not None and memo[0] == versions:
        return memo[1]
    h = hashlib.sha256(extra.encode())
    with torch.no_grad():
        for name, p in tensors:
            h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|".encode())
            h.update(memoryview(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
    digest = h.hexdigest()[:16]
    try:
        obj._conceptor_fingerprint = (versions, digest)
    except AttributeError:  # pragma: no cover - an object that takes no attributes: not memoised
        pass
    return digest


def weights_fingerprint(pipe) -> str:
    """The fingerprint of a pipeline: its UNet, VAE and text encoder(s), scheduler config, tokenizer size and
    fused LoRA (``load_pipeline(lora=)``: its file's SHA-256 and scale, beside the weights it changed)."""
    parts = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}
    if getattr(pipe, "text_encoder_2", None) is not None:  # SDXL
        parts["text_encoder_2"] = pipe.text_encoder_2
    # the config's private keys differ between processes, but which values are defaults is kept (sorted: it is a
    # list in set order): another sampler made ``from_config`` takes its own defaults for those (a saved and
    # reloaded pipeline has none, and samples differently with the same weights)
    config = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
    config["_use_default_values"] = sorted(pipe.scheduler.config.get("_use_default_values") or [])
    lora = getattr(pipe, "conceptor_lora", None)  # the file's content and the scale, not where it was read from
    return _fingerprint(pipe, parts, json.dumps(config, sort_keys=True, default=str) + str(len(pipe.tokenizer))
                        + (f"lora {lora['sha256']} x{lora['scale']!r}" if lora else ""))


def clip_fingerprint(clip) -> str:
    """The fingerprint of a CLIP (``conceptor_nb.clip.Clip``): its weights and tokenizer size."""
    return _fingerprint(clip, {"clip": clip.model}, str(len(clip.tokenizer)))


def concept_images(pipe, prompt: str, n: int, seed: int = 0, *, steps: int = DEFAULT.gen_steps,
                   guidance: float = DEFAULT.guidance, sampler: str | None = DEFAULT.sampler, batch_size: int = 8,
                   cache_dir=None, refresh: bool = False, verbose: bool = True, split: str = "train") -> torch.Tensor:
    """``n`` images of ``prompt`` with the seeds ``image_seeds(seed, n, split)``, cached on disk under a key of
    the weights' fingerprint, prompt, seeds, steps, guidance, sampler, size, dtype and device type. An entry
    that fails its checksum is regenerated (with a warning); ``refresh`` regenerates; ``cache_dir=False``: no cache."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    seeds = image_seeds(seed, n, split)
    kw = dict(steps=steps, guidance=guidance, sampler=sampler, batch_size=batch_size, verbose=verbose)
    if cache_dir is False:
        return generate(pipe, prompt, seeds, **kw)
    key = dict(model=model_name(pipe), weights=weights_fingerprint(pipe), prompt=prompt, seeds=[seeds[0], n],
               steps=steps, guidance=guidance, sampler=sampler, size=pipe.unet.config.sample_size,
               dtype=str(pipe.unet.dtype), device=pipe.unet.device.type)
    folder, digest = cache_entry(cache_dir, "images", key)
    file, key = folder / digest / "images.safetensors", json.dumps(key, sort_keys=True)
    if file.exists() and not refresh:
        try:
            tensors, meta = load_verified(file)
            if meta.get("key") != key or tensors["images"].shape[0] != n:
                raise CacheError(f"{file} holds another entry")
            return tensors["images"].float() / 255
        except (CacheError, KeyError) as err:
            warnings.warn(f"ignoring a bad image-cache entry ({err}); generating the images again", stacklevel=2)
    images = generate(pipe, prompt, seeds, desc=f"images of {prompt!r}", **kw)
    file.parent.mkdir(exist_ok=True)
    save_verified(file, {"images": (images * 255).round().to(torch.uint8)}, {"key": key})
    return (images * 255).round() / 255
