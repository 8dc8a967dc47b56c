"""The building blocks of a toy-world training run: its configuration (:class:`TrainConfig`), model builders
(VAE, UNet, CLIP text encoder), the token table's norm, the EMA, the learning-rate schedule and time budget,
the low-noise caption shuffle, and saving the trained pipeline and CLIP as diffusers / transformers folders."""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig

from ..io import atomic_write, dumps, read_json

VOCAB = 49408
BOS, EOS = 49406, 49407


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved as ``train_config.json`` next to the weights."""

    spec: str | None = None  # spec JSON (None: the shipped conceptor_nb/data/toyworld/spec.json)
    seed: int = 0  # also picks the rendered dataset: another seed, fresh data
    n_images: int = 40000
    concept_share: float | None = None  # share of hidden-concept captions (None: the spec's sampling.kinds)
    device: str = "cpu"
    threads: int = 1  # torch CPU threads (1 avoids OpenMP thrashing on a shared 2-core machine)
    fp16: bool = True  # save fp16 weights
    # mode "diffusion": the pipeline folder whose VAE is used; resume: also continue its UNet + text encoder
    init_from: str | None = None
    resume: bool = False
    # vae
    vae_channels: list = field(default_factory=lambda: [16, 32])
    vae_steps: int = 800
    vae_batch: int = 16
    vae_lr: float = 1e-3
    vae_kl: float = 1e-4
    vae_minutes: float | None = None  # cap a stage's time (its steps shrink to fit)
    # text encoder + unet
    text_width: int = 64
    text_layers: int = 3
    token_norm: float = 0.35  # initial expected row norm when vocab_norm is None (and for CLIP)
    vocab_norm: float | None = 0.5  # every token row kept at this norm throughout training (None: free)
    unet_channels: list = field(default_factory=lambda: [32, 64])
    unet_layers: int = 1
    steps: int = 2500
    batch: int = 32
    lr: float = 1e-3
    ema: float = 0.998
    warmup: int = 100
    unet_minutes: float | None = None
    save_every: int = 0  # save the EMA pipeline every this many steps (0: only at the end)
    # below this fraction of the noise schedule the captions are shuffled across the batch: there the prompt
    # says nothing about the picture, so the model learns low-noise predictions that do not depend on it
    # (0: off, every caption stays with its image)
    prompt_free_below: float = 0.0
    # clip
    clip_steps: int = 1500
    clip_batch: int = 128
    clip_negatives: int = 64
    clip_lr: float = 1e-3
    clip_null_weight: float = 1.0  # pull "a photo of a <random token>" towards "a photo of a"
    clip_len: int = 16
    clip_vision_width: int = 96
    clip_vision_layers: int = 4
    clip_patch: int = 4
    clip_text_layers: int = 3
    clip_proj: int = 64
    clip_minutes: float | None = None

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path) -> None:
        atomic_write(path, dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path) -> "TrainConfig":
        d = read_json(path)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown TrainConfig fields {sorted(unknown)}")
        return cls(**d)


QUICK = dict(n_images=256, vae_steps=3, vae_batch=8, steps=3, batch=8, save_every=0, clip_steps=3, clip_batch=16,
             clip_negatives=8, unet_channels=[16, 32], vae_channels=[8, 16], clip_vision_width=32,
             clip_vision_layers=1, text_layers=1, clip_text_layers=1)


def text_config(width: int, layers: int, projection: int | None = None):
    return CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
        num_attention_heads=max(1, width // 16), max_position_embeddings=77, bos_token_id=BOS,
        eos_token_id=EOS, pad_token_id=EOS, projection_dim=projection or width,
    )


def init_token_table(emb: torch.nn.Embedding, norm: float, gen: torch.Generator, exact: bool = False):
    """Random rows with expected norm ``norm`` (the default init gives ~0.02*sqrt(d));
    ``exact``: every row exactly at ``norm``."""
    with torch.no_grad():
        d = emb.weight.shape[1]
        w = torch.randn(emb.weight.shape, generator=gen)
        w = F.normalize(w, dim=-1) * norm if exact else w * (norm / math.sqrt(d))
        emb.weight.copy_(w.to(emb.weight.device, emb.weight.dtype))


@torch.no_grad()
def project_rows(weight: torch.Tensor, norm: float):
    """Put every row of a token table back at ``norm`` (directions kept)."""
    weight.copy_(F.normalize(weight.float(), dim=-1).mul_(norm).to(weight.dtype))


def make_vae(cfg, image_size: int):
    ch = tuple(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(ch),
        up_block_types=("UpDecoderBlock2D",) * len(ch), block_out_channels=ch, latent_channels=4,
        layers_per_block=1, norm_num_groups=min(16, ch[0]), sample_size=image_size,
        mid_block_add_attention=False,
    )


def make_unet(cfg, latent: int):
    ch = tuple(cfg.unet_channels)
    return UNet2DConditionModel(
        sample_size=latent, in_channels=4, out_channels=4, layers_per_block=cfg.unet_layers,
        block_out_channels=ch, down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(ch) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(ch) - 1) + ("UpBlock2D",), cross_attention_dim=cfg.text_width,
        attention_head_dim=8, norm_num_groups=min(16, ch[0]),
    )


def make_scheduler():
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon", steps_offset=1,
                         clip_sample=False)


def lr_at(step: int, total: int, base: float, warmup: int = 100, final: float = 0.1) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def log(msg: str):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fit_budget(step: int, t0: float, total: int, minutes: float | None, probe: int = 15, requested: int | None = None) -> int:
    """At ``probe`` steps (and again at 10x and 50x ``probe``, when warm-up no longer weighs on the
    estimate), set ``total`` (at most ``requested``) so the stage ends within ``minutes`` (None: no limit)."""
    if minutes and step in (probe, 10 * probe, 50 * probe) and step < total:
        per = (time.time() - t0) / step
        total = max(step + 1, min(requested or total, int(minutes * 60 / per)))
        log(f"  {per:.3f}s/step: {total} steps fit in {minutes} min")
    return total


def prompt_free_low_noise(ids: torch.Tensor, t: torch.Tensor, below: float, num_train_timesteps: int,
                          gen: torch.Generator) -> torch.Tensor:
    """Captions ``ids`` (B, L) where each example with ``t < below * num_train_timesteps`` gets the caption of
    another example of the batch (a random permutation): at those noise levels the prompt is independent of the
    picture, so the best prediction ignores it. The marginal distribution of captions is unchanged (the same
    captions, reassigned); the other examples keep their own."""
    low = t.to(ids.device) < below * num_train_timesteps
    if not bool(low.any()):
        return ids
    perm = torch.randperm(len(ids), generator=gen, device=gen.device).to(ids.device)
    return torch.where(low[:, None], ids[perm], ids)


def param_groups(model, wd: float, no_decay_params=()):
    nd = {id(p) for p in no_decay_params}
    dec = [p for p in model.parameters() if p.requires_grad and id(p) not in nd and p.ndim >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and (id(p) in nd or p.ndim < 2)]
    return [{"params": dec, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}]


class EMA:
    def __init__(self, model, decay: float):
        self.decay, self.shadow = decay, copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model, step: int):
        d = min(self.decay, (1 + step) / (10 + step))
        for s, p in zip(self.shadow.parameters(), model.parameters()):
            s.lerp_(p.detach(), 1 - d)


def save_clip(model, tokenizer, mean, std, out: Path, size: int, fp16: bool):
    out.mkdir(parents=True, exist_ok=True)
    m = copy.deepcopy(model).cpu()
    if fp16:
        m = m.half()
    m.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    atomic_write(out / "preprocessor_config.json", dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
        "do_center_crop": True, "crop_size": {"height": size, "width": size}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": mean, "image_std": std,
        "do_convert_rgb": True, "resample": 3,
    }, indent=2))


def save_pipeline(vae, text_encoder, unet, tokenizer, out: Path, fp16: bool):
    pipe = StableDiffusionPipeline(
        vae=copy.deepcopy(vae).cpu(), text_encoder=copy.deepcopy(text_encoder).cpu(), tokenizer=tokenizer,
        unet=copy.deepcopy(unet).cpu(), scheduler=make_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    if fp16:
        pipe.to(dtype=torch.float16)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
