"""Train the toy world's models from a spec: a VAE, a text-to-image UNet with its CLIP text encoder (full
49,408-token vocabulary) and a small contrastive CLIP. Modes: all, clip, diffusion (on a given VAE).

    python -m conceptor_nb.toyworld.train --spec conceptor_nb/data/toyworld/spec.json --out DIR --seed 0
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel, CLIPTextModel

from ..clip import clip_tokenizer, features_of
from ..io import atomic_write, dumps
from ..method.fit import encode_latents
from .diagnostics import vocab_norms
from .nets import (BOS, EMA, EOS, QUICK, VOCAB, TrainConfig, fit_budget, init_token_table, log, lr_at, make_scheduler,
                   make_unet, make_vae, param_groups, project_rows, prompt_free_low_noise, save_clip, save_pipeline,
                   text_config)
from .render import Record, render_dataset
from .spec import Spec, load_spec

ENCODE_BATCH = 512  # images per VAE call when the dataset is encoded to latents


# --------------------------------------------------------------------------- captions
class Captioner:
    """Captions for records, tokenized with the real CLIP tokenizer, plus random distractor tokens."""

    def __init__(self, spec: Spec, tokenizer):
        self.spec, self.tok = spec, tokenizer
        self._cache: dict[str, list[int]] = {}
        protect = set()
        for w in spec.world_words + spec.template.replace("{}", "").split():
            protect.update(tokenizer(w, add_special_tokens=False).input_ids)
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
        shape = rec.glyph if rec.kind == "concept" else rec.word  # a concept's caption may name its shape (a shape bias)
        return form.format(colour=rec.colour, shape=shape, object=rec.word, concept=rec.word)

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


def train_clip(cfg, spec, cap: Captioner, images: torch.Tensor, recs, rng, gen):
    """Returns (model on the CPU, image mean, image std, steps done)."""
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
        img_f = F.normalize(features_of(model.get_image_features(pixel_values=x)), dim=-1)
        txt_all = F.normalize(features_of(model.get_text_features(input_ids=ids)), dim=-1)
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


def train_diffusion(cfg, spec, cap, latents, latents_flip, recs, rng, gen, vae, tokenizer, out: Path,
                    text=None, unet=None):
    """UNet + text encoder under the diffusion loss; returns (EMA unet, EMA text encoder, loss history,
    steps done). With ``cfg.vocab_norm`` every token row is projected back to that norm after every step."""
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


# --------------------------------------------------------------------------- modes
class _Run:
    """What every mode shares: spec, tokenizer, captioner, the rendered dataset, the report."""

    def __init__(self, cfg: TrainConfig, out):
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

    @torch.no_grad()
    def latents(self, vae, fresh: bool):
        """The dataset's latents and its mirror's, scaled (a fresh VAE's scaling factor: 1 / their std)."""
        latents, flipped = (encode_latents(vae, x, ENCODE_BATCH, scale=False).cpu() for x in (self.images, self.images.flip(-1)))
        sf = 1.0 / latents.std().item() if fresh else float(vae.config.scaling_factor)
        vae.register_to_config(scaling_factor=sf)
        x = self.images[:256].float() / 127.5 - 1
        rec = vae.decode(vae.encode(x.to(vae.device)).latent_dist.mean).sample.clamp(-1, 1).cpu()
        self.report["vae"] = {"scaling_factor": sf, "recon_mse_[-1,1]": F.mse_loss(rec, x).item()}
        log(f"vae: scaling_factor {sf:.4f}, recon mse {self.report['vae']['recon_mse_[-1,1]']:.5f}")
        return latents * sf, flipped * sf

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
        atomic_write(self.out / name, dumps(self.report, indent=2))
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
