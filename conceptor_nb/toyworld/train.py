"""Train the toy world's models from a spec: a VAE, a text-to-image UNet with its CLIP text
encoder (full 49,408-token vocabulary), and a small contrastive CLIP.

    python -m conceptor_nb.toyworld.train --spec conceptor_nb/data/toyworld/spec.json --out DIR --seed 0

writes ``DIR/pipeline`` (a diffusers StableDiffusionPipeline folder), ``DIR/clip`` (a
transformers CLIPModel folder with tokenizer and preprocessor_config.json) and
``DIR/train_log.json``. ``--quick`` runs a few steps of everything (a smoke test).

Steps: render a fixed, balanced dataset once; train the VAE on it and encode every image
(and its mirror) to latents once; train CLIP; train UNet + text encoder (EMA weights are
saved). Captions come from the spec's caption forms; 10% are dropped to "" for
classifier-free guidance, and a share gets 1-3 random vocabulary tokens inserted as
distractors the images ignore, so that every row of the token table is trained.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
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


def init_token_table(emb: torch.nn.Embedding, norm: float, gen: torch.Generator):
    """Random rows with expected norm ``norm`` (the default init gives ~0.02*sqrt(d))."""
    with torch.no_grad():
        d = emb.weight.shape[1]
        emb.weight.copy_(torch.randn(emb.weight.shape, generator=gen) * (norm / math.sqrt(d)))


def make_vae(args):
    from diffusers import AutoencoderKL

    ch = tuple(args.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(ch),
        up_block_types=("UpDecoderBlock2D",) * len(ch), block_out_channels=ch, latent_channels=4,
        layers_per_block=1, norm_num_groups=min(16, ch[0]), sample_size=args.image_size,
        mid_block_add_attention=False,
    )


def make_unet(args, latent: int):
    from diffusers import UNet2DConditionModel

    ch = tuple(args.unet_channels)
    return UNet2DConditionModel(
        sample_size=latent, in_channels=4, out_channels=4, layers_per_block=args.unet_layers,
        block_out_channels=ch, down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(ch) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(ch) - 1) + ("UpBlock2D",), cross_attention_dim=args.text_width,
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


def fit_budget(step: int, t0: float, total: int, minutes: float | None, probe: int = 15) -> int:
    """After ``probe`` steps, shrink ``total`` so the stage ends within ``minutes`` (None: no limit)."""
    if minutes and step == probe:
        per = (time.time() - t0) / probe
        total = max(probe + 1, min(total, int(minutes * 60 / per)))
        log(f"  {per:.2f}s/step: {total} steps fit in {minutes} min")
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
def train_vae(args, images: torch.Tensor, gen: torch.Generator, rng):
    vae = make_vae(args)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    t0, n = time.time(), len(images)
    total, step = args.vae_steps, 0
    while step < total:
        total = fit_budget(step, t0, total, args.vae_minutes)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, args.vae_lr, warmup=50)
        x = images[torch.from_numpy(rng.integers(0, n, args.vae_batch))].float() / 127.5 - 1
        post = vae.encode(x).latent_dist
        z = post.sample(generator=gen)
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + args.vae_kl * post.kl().mean() / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == total - 1:
            log(f"vae step {step}/{total} loss {loss.item():.5f} ({time.time() - t0:.0f}s)")
        step += 1
    args.vae_steps_done = total
    vae.eval().requires_grad_(False)
    return vae


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch: int = 512) -> torch.Tensor:
    out = []
    for i in range(0, len(images), batch):
        x = images[i : i + batch].float() / 127.5 - 1
        out.append(vae.encode(x).latent_dist.mean)
    return torch.cat(out)


def train_clip(args, spec, cap: Captioner, images: torch.Tensor, recs, rng, gen):
    from transformers import CLIPConfig, CLIPModel

    vision = dict(hidden_size=args.clip_vision_width, intermediate_size=4 * args.clip_vision_width,
                  num_hidden_layers=args.clip_vision_layers, num_attention_heads=4,
                  image_size=spec.image_size, patch_size=args.clip_patch)
    config = CLIPConfig(text_config=text_config(args.text_width, args.clip_text_layers).to_dict(),
                        vision_config=vision, projection_dim=args.clip_proj)
    torch.manual_seed(args.seed + 7)
    model = CLIPModel(config)
    init_token_table(model.text_model.embeddings.token_embedding, args.token_norm, gen)
    mean = (images[:4096].float() / 255).mean(dim=(0, 2, 3))
    std = (images[:4096].float() / 255).std(dim=(0, 2, 3))
    emb = model.text_model.embeddings.token_embedding.weight
    opt = torch.optim.AdamW(param_groups(model, 0.05, [emb]), lr=args.clip_lr)
    n, B, M = len(images), args.clip_batch, args.clip_negatives
    t0 = time.time()
    model.train()
    total, step = args.clip_steps, 0
    while step < total:
        total = fit_budget(step, t0, total, args.clip_minutes)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, args.clip_lr)
        idx = rng.integers(0, n, B)
        x = images[torch.from_numpy(idx)].float() / 255
        flip = torch.from_numpy(rng.random(B) < 0.5)
        x[flip] = x[flip].flip(-1)
        x = (x - mean[:, None, None]) / std[:, None, None]
        ids, _ = cap.batch([recs[i] for i in idx], rng, length=args.clip_len)
        if M:  # text-only negatives: "a photo of a <random token(s)>" matches no image
            pre = cap.ids_of(spec.template.format("").strip())
            nid = torch.full((M, args.clip_len), EOS, dtype=torch.long)
            for j in range(M):
                toks = [int(cap.pool[rng.integers(len(cap.pool))]) for _ in range(int(rng.integers(1, 3)))]
                row = ([BOS] + pre + toks)[: args.clip_len - 1] + [EOS]
                nid[j, : len(row)] = torch.tensor(row)
            ids = torch.cat([ids, nid])
        null = torch.full((1, args.clip_len), EOS, dtype=torch.long)
        null_row = [BOS] + cap.ids_of(spec.template.format("").strip()) + [EOS]
        null[0, : len(null_row)] = torch.tensor(null_row)
        ids = torch.cat([ids, null])
        img_f = F.normalize(_feat(model.get_image_features(pixel_values=x)), dim=-1)
        txt_all = F.normalize(_feat(model.get_text_features(input_ids=ids)), dim=-1)
        txt_f, null_f = txt_all[:-1], txt_all[-1:]
        # unknown words mean nothing: "a photo of a <random token>" should embed like "a photo of a",
        # which (as a negative column below) matches no image better than its own caption
        null_loss = (1 - txt_f[B:] @ null_f.T).mean() if M else torch.zeros(())
        txt_f = torch.cat([txt_f, null_f])
        M1 = M + 1
        scale = model.logit_scale.exp().clamp(max=100)
        logits = scale * img_f @ txt_f.T  # (B, B+M)
        # images sharing a caption's content are not negatives of each other: soft targets
        same = torch.from_numpy(np.array([[recs[i].glyph == recs[j].glyph and recs[i].colour == recs[j].colour
                                            for j in idx] for i in idx], dtype=np.float32))
        tgt_i = torch.cat([torch.eye(B), torch.zeros(B, M1)], 1)
        loss_i = F.cross_entropy(logits, tgt_i)
        loss_t = F.cross_entropy(logits[:, :B].T, same / same.sum(1, keepdim=True))
        loss = (loss_i + loss_t) / 2 + args.clip_null_weight * null_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == total - 1:
            log(f"clip step {step}/{total} loss {loss.item():.4f} scale {scale.item():.1f} ({time.time() - t0:.0f}s)")
        step += 1
    args.clip_steps_done = total
    model.eval().requires_grad_(False)
    return model, mean.tolist(), std.tolist()


def save_clip(model, tokenizer, mean, std, out: Path, size: int, fp16: bool):
    out.mkdir(parents=True, exist_ok=True)
    m = copy.deepcopy(model)
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
        vae=copy.deepcopy(vae), text_encoder=copy.deepcopy(text_encoder), tokenizer=tokenizer,
        unet=copy.deepcopy(unet), scheduler=make_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    if fp16:
        pipe.to(dtype=torch.float16)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)


def train_diffusion(args, spec, cap, latents, latents_flip, recs, rng, gen, vae, tokenizer, out: Path,
                    text=None, unet=None):
    from transformers import CLIPTextModel

    torch.manual_seed(args.seed + 11)
    if text is None:
        text = CLIPTextModel(text_config(args.text_width, args.text_layers))
        init_token_table(text.get_input_embeddings(), args.token_norm, gen)
    if unet is None:
        unet = make_unet(args, latents.shape[-1])
    text.train().requires_grad_(True)
    unet.train().requires_grad_(True)
    sched = make_scheduler()
    emb = text.get_input_embeddings().weight
    groups = param_groups(unet, 0.01) + param_groups(text, 0.01, [emb])
    opt = torch.optim.AdamW(groups, lr=args.lr)
    ema_u, ema_t = EMA(unet, args.ema), EMA(text, args.ema)
    n, B = len(latents), args.batch
    alphas = sched.alphas_cumprod
    t0 = time.time()
    hist = []
    total, step = args.steps, 0
    while step < total:
        total = fit_budget(step, t0, total, args.unet_minutes, probe=20)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, args.lr, warmup=args.warmup)
        idx = rng.integers(0, n, B)
        flip = torch.from_numpy(rng.random(B) < 0.5)[:, None, None, None]
        ii = torch.from_numpy(idx)
        x0 = torch.where(flip, latents_flip[ii], latents[ii])
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (B,), generator=gen)
        a = alphas[t].sqrt()[:, None, None, None]
        s = (1 - alphas[t]).sqrt()[:, None, None, None]
        xt = a * x0 + s * noise
        ids, _ = cap.batch([recs[i] for i in idx], rng, dropout=spec.sampling["caption_dropout"])
        enc = text(input_ids=ids).last_hidden_state
        pred = unet(xt, t, encoder_hidden_states=enc).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(unet.parameters()) + list(text.parameters()), 1.0)
        opt.step()
        ema_u.update(unet, step)
        ema_t.update(text, step)
        hist.append(loss.item())
        if step % 50 == 0 or step == total - 1:
            el = time.time() - t0
            log(f"unet step {step}/{total} loss {np.mean(hist[-50:]):.4f} ({el:.0f}s, {el / (step + 1):.2f}s/step)")
        if args.save_every and step and step % args.save_every == 0:
            save_pipeline(vae, ema_t.shadow, ema_u.shadow, tokenizer, out / "pipeline", args.fp16)
            log(f"saved pipeline at step {step}")
        step += 1
    args.steps_done = total
    return ema_u.shadow, ema_t.shadow, hist


def vocab_norms(text_model, spec, tokenizer) -> dict:
    w = text_model.get_input_embeddings().weight.detach().float()
    norms = w.norm(dim=-1)
    ids = [tokenizer(x, add_special_tokens=False).input_ids[0] for x in spec.world_words]
    return {"mean_norm_all": norms.mean().item(), "mean_norm_world": norms[ids].mean().item(),
            "ratio_all_over_world": (norms.mean() / norms[ids].mean()).item()}


@torch.no_grad()
def renormalise_vocab(text_model, spec, tokenizer) -> dict:
    """Scale every row that is not a world word by one common factor so that the non-world rows'
    mean norm equals the world words' mean norm (directions unchanged).

    Why: the world's words are trained in every batch and grow; the other ~49,400 rows are seen
    only as random distractors a few times and stay near their initial norm. Conceptor rescales
    its pseudo-token to the mean norm of the whole table (as the authors do for Stable Diffusion,
    where every row is trained), so that mean must be comparable to a real word's norm.
    The text encoder was trained to ignore distractor rows, which this does not change."""
    emb = text_model.get_input_embeddings().weight
    ids = sorted({tokenizer(x, add_special_tokens=False).input_ids[0] for x in spec.world_words})
    mask = torch.ones(emb.shape[0], dtype=torch.bool)
    mask[ids] = False
    mask[[BOS, EOS]] = False  # special tokens are in every caption: trained, leave them
    before = vocab_norms(text_model, spec, tokenizer)
    norms = emb.float().norm(dim=-1)
    factor = (norms[ids].mean() / norms[mask].mean()).item()
    emb[mask] = (emb[mask].float() * factor).to(emb.dtype)
    after = vocab_norms(text_model, spec, tokenizer)
    return {"factor": factor, "before": before, "after": after}


def renormalise_pipeline(folder: str | Path, spec, fp16: bool = True) -> dict:
    """Apply :func:`renormalise_vocab` to a saved pipeline's text encoder, in place."""
    from transformers import CLIPTextModel

    from ..tiny import clip_tokenizer

    folder = Path(folder)
    text = CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=torch.float32)
    info = renormalise_vocab(text, spec, clip_tokenizer())
    if fp16:
        text = text.half()
    text.save_pretrained(folder / "text_encoder", safe_serialization=True)
    return info


# --------------------------------------------------------------------------- main
def build_parser():
    p = argparse.ArgumentParser(prog="python -m conceptor_nb.toyworld.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", default=None, help="spec JSON (default: the shipped conceptor_nb/data/toyworld/spec.json)")
    p.add_argument("--out", required=True, help="output folder: pipeline/, clip/, train_log.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a few steps of everything (smoke test)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids OpenMP thrashing on a shared 2-core machine)")
    p.add_argument("--n-images", type=int, default=40000)
    p.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=True, help="save fp16 weights")
    p.add_argument("--skip-clip", action="store_true")
    # vae
    p.add_argument("--vae-channels", type=int, nargs="+", default=[16, 32])
    p.add_argument("--vae-steps", type=int, default=800)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-minutes", type=float, default=None, help="cap the VAE stage (steps shrink to fit)")
    p.add_argument("--clip-minutes", type=float, default=None, help="cap the CLIP stage")
    p.add_argument("--unet-minutes", type=float, default=None, help="cap the UNet stage")
    p.add_argument("--vae-kl", type=float, default=1e-4)
    # text / unet
    p.add_argument("--text-width", type=int, default=64)
    p.add_argument("--text-layers", type=int, default=3)
    p.add_argument("--token-norm", type=float, default=0.35, help="initial expected norm of token-table rows")
    p.add_argument("--unet-channels", type=int, nargs="+", default=[32, 64])
    p.add_argument("--unet-layers", type=int, default=1)
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--renorm-vocab", action=argparse.BooleanOptionalAction, default=True,
                   help="after training, rescale the non-world token rows to the world words' mean norm")
    p.add_argument("--renorm-only", default=None, metavar="PIPELINE_DIR",
                   help="only apply the vocabulary renormalisation to a saved pipeline, in place")
    p.add_argument("--resume", default=None, help="a saved pipeline folder: continue its UNet + text encoder")
    p.add_argument("--save-every", type=int, default=500)
    # clip
    p.add_argument("--clip-steps", type=int, default=1500)
    p.add_argument("--clip-batch", type=int, default=128)
    p.add_argument("--clip-negatives", type=int, default=64)
    p.add_argument("--clip-lr", type=float, default=1e-3)
    p.add_argument("--clip-null-weight", type=float, default=1.0,
                   help="pull 'a photo of a <random token>' towards 'a photo of a' (unknown words mean nothing)")
    p.add_argument("--clip-only", action="store_true", help="train and save only the CLIP (clip/, train_log_clip.json)")
    p.add_argument("--clip-len", type=int, default=16)
    p.add_argument("--clip-vision-width", type=int, default=96)
    p.add_argument("--clip-vision-layers", type=int, default=4)
    p.add_argument("--clip-patch", type=int, default=4)
    p.add_argument("--clip-text-layers", type=int, default=3)
    p.add_argument("--clip-proj", type=int, default=64)
    return p


QUICK = dict(n_images=256, vae_steps=3, vae_batch=8, steps=3, batch=8, save_every=0, clip_steps=3, clip_batch=16,
             clip_negatives=8, unet_channels=[16, 32], vae_channels=[8, 16], clip_vision_width=32,
             clip_vision_layers=1, text_layers=1, clip_text_layers=1)


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args) -> dict:
    torch.manual_seed(args.seed)
    from ..tiny import clip_tokenizer

    spec = load_spec(args.spec)
    if args.renorm_only:
        info = renormalise_pipeline(args.renorm_only, spec, args.fp16)
        log(f"vocab renormalised in {args.renorm_only}: {info}")
        return {"vocab_renorm": info}
    args.image_size = spec.image_size
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = clip_tokenizer()
    cap = Captioner(spec, tokenizer)
    gen = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    report = {"spec": spec.name, "args": {k: v for k, v in vars(args).items()}, "times_s": {}}
    T0 = time.time()

    t = time.time()
    imgs, recs = render_dataset(spec, args.n_images, args.seed, progress=True)
    images = torch.from_numpy(imgs)
    report["times_s"]["render"] = time.time() - t
    log(f"rendered {len(recs)} images in {time.time() - t:.0f}s")

    if args.clip_only:
        t = time.time()
        clip, mean, std = train_clip(args, spec, cap, images, recs, rng, gen)
        save_clip(clip, tokenizer, mean, std, out / "clip", spec.image_size, args.fp16)
        report["times_s"]["clip"] = time.time() - t
        report["args"] = {k: v for k, v in vars(args).items()}
        (out / "train_log_clip.json").write_text(json.dumps(report, indent=2, default=str))
        log(f"clip saved ({time.time() - t:.0f}s)")
        return report

    t = time.time()
    resumed = {}
    if args.resume:  # continue UNet + text encoder training from a saved pipeline (its VAE is kept)
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        src = Path(args.resume)
        vae = AutoencoderKL.from_pretrained(src / "vae", torch_dtype=torch.float32).eval().requires_grad_(False)
        resumed = {"text": CLIPTextModel.from_pretrained(src / "text_encoder", dtype=torch.float32),
                   "unet": UNet2DConditionModel.from_pretrained(src / "unet", torch_dtype=torch.float32)}
        args.skip_clip = True
        log(f"resuming from {src}")
    else:
        vae = train_vae(args, images, gen, rng)
    latents = encode_latents(vae, images)
    latents_flip = encode_latents(vae, images.flip(-1))
    sf = float(vae.config.scaling_factor) if args.resume else 1.0 / latents.std().item()
    vae.register_to_config(scaling_factor=sf)
    latents, latents_flip = latents * sf, latents_flip * sf
    with torch.no_grad():
        x = images[:256].float() / 127.5 - 1
        rec_mse = F.mse_loss(vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1), x).item()
    report["vae"] = {"scaling_factor": sf, "recon_mse_[-1,1]": rec_mse}
    report["times_s"]["vae"] = time.time() - t
    log(f"vae done: scaling_factor {sf:.4f}, recon mse {rec_mse:.5f}")

    if not args.skip_clip:
        t = time.time()
        clip, mean, std = train_clip(args, spec, cap, images, recs, rng, gen)
        save_clip(clip, tokenizer, mean, std, out / "clip", spec.image_size, args.fp16)
        report["times_s"]["clip"] = time.time() - t
        log(f"clip saved ({time.time() - t:.0f}s)")

    t = time.time()
    unet, text, hist = train_diffusion(args, spec, cap, latents, latents_flip, recs, rng, gen, vae, tokenizer, out,
                                       **resumed)
    report["times_s"]["diffusion"] = time.time() - t
    report["loss_last100"] = float(np.mean(hist[-100:]))
    report["vocab_norms"] = vocab_norms(text, spec, tokenizer)
    if args.renorm_vocab:
        report["vocab_renorm"] = renormalise_vocab(text, spec, tokenizer)
        log(f"vocab renormalised: {report['vocab_renorm']}")
    save_pipeline(vae, text, unet, tokenizer, out / "pipeline", args.fp16)
    report["args"] = {k: v for k, v in vars(args).items()}
    report["times_s"]["total"] = time.time() - T0
    (out / "train_log.json").write_text(json.dumps(report, indent=2, default=str))
    log(f"done in {report['times_s']['total']:.0f}s; vocab norms {report['vocab_norms']}")
    return report


if __name__ == "__main__":
    main()
