"""Train the toy world's models from a spec: a VAE, a text-to-image UNet with its CLIP text
encoder (full 49,408-token vocabulary), and a small contrastive CLIP.

    python -m conceptor_nb.toyworld.train --spec conceptor_nb/data/toyworld/spec.json --out DIR --seed 0

writes ``DIR/pipeline`` (a diffusers StableDiffusionPipeline folder), ``DIR/clip`` (a
transformers CLIPModel folder with tokenizer and preprocessor_config.json), ``DIR/train_log.json``
and ``DIR/train_config.json`` (the :class:`TrainConfig` that made them; ``--config`` reads one
back). ``--quick`` runs a few steps of everything (a smoke test).

Modes, one function each: :func:`train_all` (``--mode all``: VAE, CLIP, UNet + text encoder),
:func:`train_clip_only` (``--mode clip``), :func:`train_diffusion_only` (``--mode diffusion``:
UNet + text encoder on the VAE of ``init_from``, fresh or, with ``resume``, continuing its
UNet + text encoder).

Steps: render a fixed, balanced dataset once; train the VAE on it and encode every image
(and its mirror) to latents once; train CLIP; train UNet + text encoder (EMA weights are
saved). Captions come from the spec's caption forms; 10% are dropped to "" for
classifier-free guidance, and a share gets 1-3 random vocabulary tokens inserted as
distractors the images ignore, so that every row of the token table is trained.
With ``vocab_norm`` set (the default), every row of the text encoder's token table is kept at
that one norm throughout training (projected back after every step), so the whole table's mean
norm, to which Conceptor rescales its pseudo-token, is a norm the model was trained on.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .render import Record, render_dataset
from .spec import Spec, load_spec

VOCAB = 49408
BOS, EOS = 49406, 49407


# --------------------------------------------------------------------------- captions
class Captioner:
    """Captions for records, tokenized with the real CLIP tokenizer, plus random distractor tokens."""

    def __init__(self, spec: Spec, tokenizer):
        self.spec, self.tok = spec, tokenizer
        self._cache: dict[str, list[int]] = {}
        protect = set()
        for w in spec.world_words + spec.template.replace("{}", "").split():
            protect.update(tokenizer(w, add_special_tokens=False).input_ids)
        self.world_ids = sorted({tokenizer(w, add_special_tokens=False).input_ids[0] for w in spec.world_words})
        pool = np.ones(VOCAB, dtype=bool)
        pool[list(protect)] = False
        pool[[BOS, EOS]] = False
        self.pool = np.nonzero(pool)[0]
        self.forms = {}
        for kind, forms in spec.sampling["captions"].items():
            w = np.array([f[1] for f in forms], dtype=float)
            self.forms[kind] = ([f[0] for f in forms], w / w.sum())

    def text(self, rec: Record, rng: np.random.Generator) -> str:
        forms, p = self.forms[rec.kind]
        form = forms[rng.choice(len(forms), p=p)]
        return form.format(colour=rec.colour, shape=rec.word, object=rec.word, concept=rec.word)

    def ids_of(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tok(text, add_special_tokens=False).input_ids
        return self._cache[text]

    def encode(self, texts: list[str], rng: np.random.Generator, *, distract: bool = True, length: int = 77) -> torch.Tensor:
        s = self.spec.sampling
        out = np.full((len(texts), length), EOS, dtype=np.int64)
        for i, t in enumerate(texts):
            ids = list(self.ids_of(t))
            if distract and t and rng.random() < s["distractor_prob"]:
                for _ in range(int(rng.integers(1, int(s["distractor_max"]) + 1))):
                    ids.insert(int(rng.integers(0, len(ids) + 1)), int(self.pool[rng.integers(len(self.pool))]))
            ids = [BOS] + ids[: length - 2] + [EOS]
            out[i, : len(ids)] = ids
        return torch.from_numpy(out)

    def batch(self, recs: list[Record], rng, *, dropout: float = 0.0, distract: bool = True, length: int = 77):
        texts = ["" if rng.random() < dropout else self.text(r, rng) for r in recs]
        return self.encode(texts, rng, distract=distract, length=length), texts


# --------------------------------------------------------------------------- models
def text_config(width: int, layers: int, projection: int | None = None):
    from transformers import CLIPTextConfig

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
    from diffusers import AutoencoderKL

    ch = tuple(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(ch),
        up_block_types=("UpDecoderBlock2D",) * len(ch), block_out_channels=ch, latent_channels=4,
        layers_per_block=1, norm_num_groups=min(16, ch[0]), sample_size=image_size,
        mid_block_add_attention=False,
    )


def make_unet(cfg, latent: int):
    from diffusers import UNet2DConditionModel

    ch = tuple(cfg.unet_channels)
    return UNet2DConditionModel(
        sample_size=latent, in_channels=4, out_channels=4, layers_per_block=cfg.unet_layers,
        block_out_channels=ch, down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(ch) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(ch) - 1) + ("UpBlock2D",), cross_attention_dim=cfg.text_width,
        attention_head_dim=8, norm_num_groups=min(16, ch[0]),
    )


def make_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon", steps_offset=1,
                         clip_sample=False)


def lr_at(step: int, total: int, base: float, warmup: int = 100, final: float = 0.1) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def fit_budget(step: int, t0: float, total: int, minutes: float | None, probe: int = 15, requested: int | None = None) -> int:
    """At ``probe`` steps (and again at 10x and 50x ``probe``, when warm-up no longer weighs on the
    estimate), set ``total`` (at most ``requested``) so the stage ends within ``minutes`` (None: no limit)."""
    if minutes and step in (probe, 10 * probe, 50 * probe) and step < total:
        per = (time.time() - t0) / step
        total = max(step + 1, min(requested or total, int(minutes * 60 / per)))
        log(f"  {per:.3f}s/step: {total} steps fit in {minutes} min")
    return total


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


def _feat(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def log(msg: str):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- stages
def train_vae(cfg, images: torch.Tensor, gen: torch.Generator, rng, image_size: int):
    """Returns (vae, steps done)."""
    dev = cfg.device
    vae = make_vae(cfg, image_size).to(dev)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    t0, n = time.time(), len(images)
    total, step = cfg.vae_steps, 0
    while step < total:
        total = fit_budget(step, t0, total, cfg.vae_minutes, requested=cfg.vae_steps)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, cfg.vae_lr, warmup=50)
        x = (images[torch.from_numpy(rng.integers(0, n, cfg.vae_batch))].float() / 127.5 - 1).to(dev)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(dev)
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + cfg.vae_kl * post.kl().mean() / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == total - 1:
            log(f"vae step {step}/{total} loss {loss.item():.5f} ({time.time() - t0:.0f}s)")
        step += 1
    vae.eval().requires_grad_(False)
    return vae, total


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """Latent means of uint8 images (on the VAE's device, returned on the CPU)."""
    dev = next(vae.parameters()).device
    out = []
    for i in range(0, len(images), batch):
        x = (images[i : i + batch].float() / 127.5 - 1).to(dev)
        out.append(vae.encode(x).latent_dist.mean.cpu())
    return torch.cat(out)


def train_clip(cfg, spec, cap: Captioner, images: torch.Tensor, recs, rng, gen):
    """Returns (model on the CPU, image mean, image std, steps done)."""
    from transformers import CLIPConfig, CLIPModel

    dev = cfg.device

    vision = dict(hidden_size=cfg.clip_vision_width, intermediate_size=4 * cfg.clip_vision_width,
                  num_hidden_layers=cfg.clip_vision_layers, num_attention_heads=4,
                  image_size=spec.image_size, patch_size=cfg.clip_patch)
    config = CLIPConfig(text_config=text_config(cfg.text_width, cfg.clip_text_layers).to_dict(),
                        vision_config=vision, projection_dim=cfg.clip_proj)
    torch.manual_seed(cfg.seed + 7)
    model = CLIPModel(config)
    init_token_table(model.text_model.embeddings.token_embedding, cfg.token_norm, gen)
    model.to(dev)
    mean = (images[:4096].float() / 255).mean(dim=(0, 2, 3))
    std = (images[:4096].float() / 255).std(dim=(0, 2, 3))
    emb = model.text_model.embeddings.token_embedding.weight
    opt = torch.optim.AdamW(param_groups(model, 0.05, [emb]), lr=cfg.clip_lr)
    n, B, M = len(images), cfg.clip_batch, cfg.clip_negatives
    t0 = time.time()
    model.train()
    total, step = cfg.clip_steps, 0
    while step < total:
        total = fit_budget(step, t0, total, cfg.clip_minutes, requested=cfg.clip_steps)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, cfg.clip_lr)
        idx = rng.integers(0, n, B)
        x = images[torch.from_numpy(idx)].float() / 255
        flip = torch.from_numpy(rng.random(B) < 0.5)
        x[flip] = x[flip].flip(-1)
        x = ((x - mean[:, None, None]) / std[:, None, None]).to(dev)
        ids, _ = cap.batch([recs[i] for i in idx], rng, length=cfg.clip_len)
        if M:  # text-only negatives: "a photo of a <random token(s)>" matches no image
            pre = cap.ids_of(spec.template.format("").strip())
            nid = torch.full((M, cfg.clip_len), EOS, dtype=torch.long)
            for j in range(M):
                toks = [int(cap.pool[rng.integers(len(cap.pool))]) for _ in range(int(rng.integers(1, 3)))]
                row = ([BOS] + pre + toks)[: cfg.clip_len - 1] + [EOS]
                nid[j, : len(row)] = torch.tensor(row)
            ids = torch.cat([ids, nid])
        null = torch.full((1, cfg.clip_len), EOS, dtype=torch.long)
        null_row = [BOS] + cap.ids_of(spec.template.format("").strip()) + [EOS]
        null[0, : len(null_row)] = torch.tensor(null_row)
        ids = torch.cat([ids, null]).to(dev)
        img_f = F.normalize(_feat(model.get_image_features(pixel_values=x)), dim=-1)
        txt_all = F.normalize(_feat(model.get_text_features(input_ids=ids)), dim=-1)
        txt_f, null_f = txt_all[:-1], txt_all[-1:]
        # unknown words mean nothing: "a photo of a <random token>" should embed like "a photo of a",
        # which (as a negative column below) matches no image better than its own caption
        null_loss = (1 - txt_f[B:] @ null_f.T).mean() if M else torch.zeros((), device=dev)
        txt_f = torch.cat([txt_f, null_f])
        M1 = M + 1
        scale = model.logit_scale.exp().clamp(max=100)
        logits = scale * img_f @ txt_f.T  # (B, B+M)
        # images sharing a caption's content are not negatives of each other: soft targets
        same = torch.from_numpy(np.array([[recs[i].glyph == recs[j].glyph and recs[i].colour == recs[j].colour
                                            for j in idx] for i in idx], dtype=np.float32)).to(dev)
        tgt_i = torch.cat([torch.eye(B), torch.zeros(B, M1)], 1).to(dev)
        loss_i = F.cross_entropy(logits, tgt_i)
        loss_t = F.cross_entropy(logits[:, :B].T, same / same.sum(1, keepdim=True))
        loss = (loss_i + loss_t) / 2 + cfg.clip_null_weight * null_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == total - 1:
            log(f"clip step {step}/{total} loss {loss.item():.4f} scale {scale.item():.1f} ({time.time() - t0:.0f}s)")
        step += 1
    model.eval().requires_grad_(False).cpu()
    return model, mean.tolist(), std.tolist(), total


def save_clip(model, tokenizer, mean, std, out: Path, size: int, fp16: bool):
    out.mkdir(parents=True, exist_ok=True)
    m = copy.deepcopy(model).cpu()
    if fp16:
        m = m.half()
    m.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
        "do_center_crop": True, "crop_size": {"height": size, "width": size}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": mean, "image_std": std,
        "do_convert_rgb": True, "resample": 3,
    }, indent=2))


def save_pipeline(vae, text_encoder, unet, tokenizer, out: Path, fp16: bool):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=copy.deepcopy(vae).cpu(), text_encoder=copy.deepcopy(text_encoder).cpu(), tokenizer=tokenizer,
        unet=copy.deepcopy(unet).cpu(), scheduler=make_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    if fp16:
        pipe.to(dtype=torch.float16)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)


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


def train_diffusion(cfg, spec, cap, latents, latents_flip, recs, rng, gen, vae, tokenizer, out: Path,
                    text=None, unet=None):
    """UNet + text encoder under the diffusion loss; returns (EMA unet, EMA text encoder, loss history,
    steps done). With ``cfg.vocab_norm`` every token row is projected back to that norm after every step."""
    from transformers import CLIPTextModel

    dev = cfg.device
    torch.manual_seed(cfg.seed + 11)
    if text is None:
        text = CLIPTextModel(text_config(cfg.text_width, cfg.text_layers))
        init_token_table(text.get_input_embeddings(), cfg.vocab_norm or cfg.token_norm, gen, exact=bool(cfg.vocab_norm))
    if unet is None:
        unet = make_unet(cfg, latents.shape[-1])
    text.to(dev).train().requires_grad_(True)
    unet.to(dev).train().requires_grad_(True)
    emb = text.get_input_embeddings().weight
    if cfg.vocab_norm:
        project_rows(emb, cfg.vocab_norm)
    sched = make_scheduler()
    groups = param_groups(unet, 0.01) + param_groups(text, 0.01, [emb])
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    ema_u, ema_t = EMA(unet, cfg.ema), EMA(text, cfg.ema)
    latents, latents_flip = latents.to(dev), latents_flip.to(dev)
    n, B = len(latents), cfg.batch
    alphas = sched.alphas_cumprod.to(dev)
    dgen = torch.Generator(dev).manual_seed(cfg.seed + 13)
    pgen = torch.Generator().manual_seed(cfg.seed + 17)
    t0 = time.time()
    hist = []
    total, step = cfg.steps, 0
    while step < total:
        total = fit_budget(step, t0, total, cfg.unet_minutes, probe=20, requested=cfg.steps)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, cfg.lr, warmup=cfg.warmup)
        idx = rng.integers(0, n, B)
        flip = torch.from_numpy(rng.random(B) < 0.5)[:, None, None, None].to(dev)
        ii = torch.from_numpy(idx).to(dev)
        x0 = torch.where(flip, latents_flip[ii], latents[ii])
        noise = torch.randn(x0.shape, generator=dgen, device=dev)
        t = torch.randint(0, sched.config.num_train_timesteps, (B,), generator=dgen, device=dev)
        a = alphas[t].sqrt()[:, None, None, None]
        s = (1 - alphas[t]).sqrt()[:, None, None, None]
        xt = a * x0 + s * noise
        ids, _ = cap.batch([recs[i] for i in idx], rng, dropout=spec.sampling["caption_dropout"])
        if cfg.prompt_free_below:
            ids = prompt_free_low_noise(ids, t.cpu(), cfg.prompt_free_below, sched.config.num_train_timesteps, pgen)
        enc = text(input_ids=ids.to(dev)).last_hidden_state
        pred = unet(xt, t, encoder_hidden_states=enc).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(unet.parameters()) + list(text.parameters()), 1.0)
        opt.step()
        if cfg.vocab_norm:
            project_rows(emb, cfg.vocab_norm)
        ema_u.update(unet, step)
        ema_t.update(text, step)
        if cfg.vocab_norm:  # the EMA of unit rows is shorter than a row: put it back on the sphere too
            project_rows(ema_t.shadow.get_input_embeddings().weight, cfg.vocab_norm)
        if step % 50 == 0 or step == total - 1:
            hist.append(loss.item())
            el = time.time() - t0
            log(f"unet step {step}/{total} loss {np.mean(hist[-5:]):.4f} ({el:.0f}s, {el / (step + 1):.3f}s/step)")
        if cfg.save_every and step and step % cfg.save_every == 0:
            save_pipeline(vae, ema_t.shadow, ema_u.shadow, tokenizer, out / "pipeline", cfg.fp16)
            log(f"saved pipeline at step {step}")
        step += 1
    return ema_u.shadow, ema_t.shadow, hist, total


def vocab_norms(text_model, spec, tokenizer) -> dict:
    w = text_model.get_input_embeddings().weight.detach().float()
    norms = w.norm(dim=-1)
    ids = [tokenizer(x, add_special_tokens=False).input_ids[0] for x in spec.world_words]
    return {"mean_norm_all": norms.mean().item(), "mean_norm_world": norms[ids].mean().item(),
            "ratio_all_over_world": (norms.mean() / norms[ids].mean()).item()}


# --------------------------------------------------------------------------- configuration
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
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path) -> "TrainConfig":
        d = json.loads(Path(path).read_text())
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown TrainConfig fields {sorted(unknown)}")
        return cls(**d)


QUICK = dict(n_images=256, vae_steps=3, vae_batch=8, steps=3, batch=8, save_every=0, clip_steps=3, clip_batch=16,
             clip_negatives=8, unet_channels=[16, 32], vae_channels=[8, 16], clip_vision_width=32,
             clip_vision_layers=1, text_layers=1, clip_text_layers=1)


# --------------------------------------------------------------------------- modes
class _Run:
    """What every mode shares: spec, tokenizer, captioner, the rendered dataset, the report."""

    def __init__(self, cfg: TrainConfig, out):
        from ..tiny import clip_tokenizer

        torch.manual_seed(cfg.seed)
        self.cfg, self.out = cfg, Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.spec = load_spec(cfg.spec)
        if cfg.concept_share is not None:
            kinds = dict(self.spec.sampling["kinds"])
            rest = sum(v for k, v in kinds.items() if k != "concept")
            kinds = {k: (cfg.concept_share if k == "concept" else v * (1 - cfg.concept_share) / rest)
                     for k, v in kinds.items()}
            self.spec.sampling["kinds"] = kinds
        self.tokenizer = clip_tokenizer()
        self.cap = Captioner(self.spec, self.tokenizer)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        self.report = {"spec": self.spec.name, "config": cfg.to_dict(), "times_s": {}, "steps_done": {}}
        self.t0 = time.time()
        t = time.time()
        imgs, self.recs = render_dataset(self.spec, cfg.n_images, cfg.seed, progress=True)
        self.images = torch.from_numpy(imgs)
        self.report["times_s"]["render"] = time.time() - t
        log(f"rendered {len(self.recs)} images in {time.time() - t:.0f}s")
        cfg.save(self.out / "train_config.json")

    def clip(self):
        t = time.time()
        clip, mean, std, done = train_clip(self.cfg, self.spec, self.cap, self.images, self.recs, self.rng, self.gen)
        save_clip(clip, self.tokenizer, mean, std, self.out / "clip", self.spec.image_size, self.cfg.fp16)
        self.report["times_s"]["clip"] = time.time() - t
        self.report["steps_done"]["clip"] = done
        log(f"clip saved ({time.time() - t:.0f}s)")

    def latents(self, vae, fresh: bool):
        with torch.no_grad():
            latents = encode_latents(vae, self.images)
            latents_flip = encode_latents(vae, self.images.flip(-1))
            sf = 1.0 / latents.std().item() if fresh else float(vae.config.scaling_factor)
            vae.register_to_config(scaling_factor=sf)
            x = self.images[:256].float() / 127.5 - 1
            dev = next(vae.parameters()).device
            rec = vae.decode(vae.encode(x.to(dev)).latent_dist.mean).sample.clamp(-1, 1).cpu()
        self.report["vae"] = {"scaling_factor": sf, "recon_mse_[-1,1]": F.mse_loss(rec, x).item()}
        log(f"vae: scaling_factor {sf:.4f}, recon mse {self.report['vae']['recon_mse_[-1,1]']:.5f}")
        return latents * sf, latents_flip * sf

    def diffusion(self, vae, latents, latents_flip, **init):
        t = time.time()
        unet, text, hist, done = train_diffusion(self.cfg, self.spec, self.cap, latents, latents_flip, self.recs,
                                                 self.rng, self.gen, vae, self.tokenizer, self.out, **init)
        self.report["times_s"]["diffusion"] = time.time() - t
        self.report["steps_done"]["diffusion"] = done
        self.report["loss_last"] = float(np.mean(hist[-5:]))
        self.report["vocab_norms"] = vocab_norms(text, self.spec, self.tokenizer)
        save_pipeline(vae, text, unet, self.tokenizer, self.out / "pipeline", self.cfg.fp16)

    def finish(self, name: str = "train_log.json") -> dict:
        self.report["times_s"]["total"] = time.time() - self.t0
        (self.out / name).write_text(json.dumps(self.report, indent=2, default=str))
        log(f"done in {self.report['times_s']['total']:.0f}s; {self.report.get('vocab_norms', '')}")
        return self.report


def train_all(cfg: TrainConfig, out) -> dict:
    """VAE, CLIP, then UNet + text encoder, from scratch: ``out/pipeline``, ``out/clip``."""
    run = _Run(cfg, out)
    t = time.time()
    vae, done = train_vae(cfg, run.images, run.gen, run.rng, run.spec.image_size)
    run.report["steps_done"]["vae"] = done
    latents = run.latents(vae, fresh=True)
    run.report["times_s"]["vae"] = time.time() - t
    run.clip()
    run.diffusion(vae, *latents)
    return run.finish()


def train_clip_only(cfg: TrainConfig, out) -> dict:
    """Only the CLIP: ``out/clip`` and ``out/train_log_clip.json``."""
    run = _Run(cfg, out)
    run.clip()
    return run.finish("train_log_clip.json")


def train_diffusion_only(cfg: TrainConfig, out) -> dict:
    """UNet + text encoder on the VAE of ``cfg.init_from`` (fresh; with ``cfg.resume``, continuing
    that pipeline's UNet + text encoder): ``out/pipeline``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    if not cfg.init_from:
        raise ValueError("mode 'diffusion' needs init_from (a pipeline folder whose VAE to use)")
    src = Path(cfg.init_from)
    run = _Run(cfg, out)
    vae = AutoencoderKL.from_pretrained(src / "vae", torch_dtype=torch.float32).to(cfg.device).eval().requires_grad_(False)
    init = {}
    if cfg.resume:
        init = {"text": CLIPTextModel.from_pretrained(src / "text_encoder", dtype=torch.float32),
                "unet": UNet2DConditionModel.from_pretrained(src / "unet", torch_dtype=torch.float32)}
        log(f"resuming from {src}")
    run.diffusion(vae, *run.latents(vae, fresh=False), **init)
    return run.finish()


MODES = {"all": train_all, "clip": train_clip_only, "diffusion": train_diffusion_only}


# --------------------------------------------------------------------------- command line
def build_parser():
    """``--mode``, ``--out``, ``--config``, ``--quick`` and one flag per :class:`TrainConfig` field."""
    p = argparse.ArgumentParser(prog="python -m conceptor_nb.toyworld.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder: pipeline/, clip/, train_log.json, train_config.json")
    p.add_argument("--mode", choices=sorted(MODES), default="all")
    p.add_argument("--config", default=None, help="a train_config.json to start from (flags override it)")
    p.add_argument("--quick", action="store_true", help="a few steps of everything (smoke test)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if f.type in ("bool", bool):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS)
        elif isinstance(default, list):
            p.add_argument(flag, dest=f.name, type=int, nargs="+", default=argparse.SUPPRESS)
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
            if "None" in str(f.type):
                p.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, metavar=kind.__name__.upper() + "|none",
                              type=lambda x, k=kind: None if x.lower() == "none" else k(x))
            else:
                p.add_argument(flag, dest=f.name, type=kind, default=argparse.SUPPRESS)
    return p


def config_from_args(a) -> TrainConfig:
    cfg = TrainConfig.load(a.config) if a.config else TrainConfig()
    if a.quick:
        cfg = cfg.replace(**QUICK)
    given = {f.name: getattr(a, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(a, f.name)}
    return cfg.replace(**given)


def main(argv=None) -> dict:
    a = build_parser().parse_args(argv)
    cfg = config_from_args(a)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return MODES[a.mode](cfg, a.out)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
