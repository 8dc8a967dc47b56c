"""The fit: a small MLP gives each dictionary token a coefficient, and the pseudo-token w* = sum_i alpha_i w_i,
put into the template, is trained to reconstruct the concept's images under the diffusion loss."""
from __future__ import annotations

import json
import math
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from ..config import Settings
from ..errors import CacheError, FitDivergedError
from ..io import load_verified, save_verified, tensors_digest
from .generate import generate, image_seeds, weights_fingerprint
from .inject import encode_template, encoders, template_prompt, token_embeddings, tokenize
from .vocab import autocast_dtype

CHECKPOINT_EVERY = 50  # fit steps between checkpoints when there is no validation


class CoefficientMLP(torch.nn.Module):
    """alpha_i = |f(w_i)|, f = Linear(d, hidden) -> ReLU -> Linear(hidden, 1)."""

    def __init__(self, width: int, hidden: int = 100):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.net(embeddings).squeeze(-1).abs()


def combine(coefficients: torch.Tensor, embeddings: torch.Tensor, norm) -> torch.Tensor:
    """sum_i c_i E_i rescaled to ``norm`` (None: not; SDXL ``[[width, norm], ...]``: each table's part to its own)."""
    w = coefficients.to(embeddings.dtype) @ embeddings
    if norm is None:
        return w
    if isinstance(norm, (int, float)):
        return w / w.norm().clamp_min(1e-12) * norm
    parts = torch.split(w, [int(width) for width, _ in norm], dim=-1)
    return torch.cat([p / p.norm().clamp_min(1e-12) * float(n) for p, (_, n) in zip(parts, norm)], dim=-1)


def vocab_norm(pipe):
    """Mean L2 norm of the token-embedding table's rows (the rescaling target); SDXL: ``[[width, norm], ...]``."""
    norms = [[enc.get_input_embeddings().weight.shape[1], float(enc.get_input_embeddings().weight.float().norm(dim=-1).mean())]
             for _, enc in encoders(pipe)]
    return norms[0][1] if len(norms) == 1 else norms


def autocast_to(device, dtype: torch.dtype | None):
    """``torch.autocast`` on ``device``'s type to ``dtype``; a no-op when ``dtype`` is None."""
    return nullcontext() if dtype is None else torch.autocast(torch.device(device).type, dtype=dtype)


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch_size: int = 16, *, scale: bool = True) -> torch.Tensor:
    """VAE latents (posterior means, times the VAE's scaling factor unless ``scale=False``) of images in [0, 1]
    or uint8, on the VAE's device."""
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size]
        x = x.to(vae.device).float() / 127.5 - 1 if x.dtype == torch.uint8 else x.to(vae.device, vae.dtype) * 2 - 1
        mean = vae.encode(x.to(vae.dtype)).latent_dist.mean
        out.append(mean * vae.config.scaling_factor if scale else mean)
    return torch.cat(out)


def diffusion_loss(pipe, w: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                   ids_prompt: torch.Tensor, template: str, prediction: str, alphas_cumprod: torch.Tensor,
                   amp: torch.dtype | None = None, reduction: str = "mean") -> torch.Tensor:
    """MSE of the UNet's prediction against the epsilon or v target, ``w`` in the prompt (encoded once for the
    batch; ``reduction="none"``: one value per item). ``amp``: autocast the UNet pass only (cheaper in memory)."""
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
    target = noise if prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
    cond, added = encode_template(pipe, w, template, ids_prompt)
    b = x0.shape[0]
    dtype = next(pipe.unet.parameters()).dtype  # (diffusers' unet.dtype walks every submodule: ~1 ms a call)
    extra = {} if added is None else {"added_cond_kwargs": {k: v.to(dtype).expand(b, -1) for k, v in added.items()}}
    with autocast_to(x0.device, amp):
        pred = pipe.unet(noisy.to(dtype), t, encoder_hidden_states=cond.expand(b, -1, -1).to(dtype), **extra).sample
    if reduction == "none":
        return ((pred.float() - target) ** 2).flatten(1).mean(1)
    return F.mse_loss(pred.float(), target)


def sample_batch(latents: torch.Tensor, b: int, gen: torch.Generator, n_timesteps: int, device,
                 min_timestep: float = 0.0):
    """``b`` random latents of (2, N, ...) = (original, flipped), noise, and timesteps uniform on
    ``[min_timestep * n_timesteps, n_timesteps)``, drawn from ``gen`` in a fixed order."""
    pick = torch.randint(0, latents.shape[1], (b,), generator=gen)
    side = torch.randint(0, latents.shape[0], (b,), generator=gen)
    x0 = latents[side, pick]
    noise = torch.randn(x0.shape, generator=gen).to(device)
    t = torch.randint(int(min_timestep * n_timesteps), n_timesteps, (b,), generator=gen).to(device)
    return x0, noise, t


def step_loss(pipe, mlp, embeddings, norm, n_top: int, batch, ids_prompt, template: str, prediction: str,
              alphas_cumprod, sparsity: float, amp=None):
    """One step's (total, reconstruction, sparsity) losses; sparsity = 1 - cos(w of the top ``n_top``, w of all)."""
    x0, noise, t = batch
    alpha = mlp(embeddings)
    rec = diffusion_loss(pipe, combine(alpha, embeddings, norm), x0, noise, t, ids_prompt, template, prediction,
                         alphas_cumprod, amp)
    top = torch.topk(alpha.detach(), n_top).indices
    sparse = 1 - F.cosine_similarity(alpha[top] @ embeddings[top], alpha @ embeddings, dim=0)
    return rec + sparsity * sparse, rec, sparse


def check_finite(alpha: torch.Tensor, step: int, s: Settings) -> None:
    if not torch.isfinite(alpha).all():
        raise FitDivergedError(f"the coefficients became NaN or infinite at step {step}; nothing was saved. "
                               f"Lower lr (now {s.lr})")


@contextmanager
def frozen(*modules):
    """The modules' parameters need no gradient within the block; their flags are restored after."""
    saved = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


class Checkpoint:
    """The fit's state in one checksummed safetensors file, under a key of what shapes the fit (weights, images,
    dictionary, settings): a state of another key is not resumed from."""

    FILE = "fit_state.safetensors"

    def __init__(self, folder, pipe, images, ids, s: Settings, rescale: bool):
        self.file = Path(folder) / self.FILE
        self.key = json.dumps(dict(weights=weights_fingerprint(pipe), images=tensors_digest({"images": images}),
                                   token_ids=tensors_digest({"ids": ids.cpu()}), settings=s.to_dict(),
                                   rescale=rescale), sort_keys=True)

    def save(self, step, mlp, opt, gen, history, best, step_times) -> None:
        tensors = {f"mlp.{k}": v for k, v in mlp.state_dict().items()}
        opt_state = opt.state_dict()
        tensors.update({f"opt.{i}.{k}": torch.as_tensor(v) for i, st in opt_state["state"].items() for k, v in st.items()})
        tensors["rng"] = gen.get_state()
        if best[2] is not None:
            tensors["best_alpha"] = best[2]
        state = dict(step=step, history=history, best_score=best[0] if best[2] is not None else None,
                     best_step=best[1], step_times=step_times, param_groups=opt_state["param_groups"])
        self.file.parent.mkdir(parents=True, exist_ok=True)
        save_verified(self.file, tensors, {"key": self.key, "state": state})

    def load(self, mlp, opt, gen) -> dict | None:
        """Restore a matching saved state into ``mlp``, ``opt`` and ``gen`` and return it, else None."""
        if not self.file.exists():
            return None
        try:
            tensors, meta = load_verified(self.file)
        except CacheError as err:
            warnings.warn(f"ignoring a damaged fit checkpoint ({err}); starting the fit afresh", stacklevel=3)
            return None
        if meta.get("key") != self.key:
            warnings.warn(f"the fit checkpoint in {self.file.parent} is of another run (other settings, images or "
                          "weights); starting the fit afresh", stacklevel=3)
            return None
        state = json.loads(meta["state"])
        mlp.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("mlp.")})
        opt_state = {}
        for name, v in tensors.items():
            if name.startswith("opt."):
                _, i, k = name.split(".", 2)
                opt_state.setdefault(int(i), {})[k] = v
        opt.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
        gen.set_state(tensors["rng"])
        alpha = tensors.get("best_alpha")
        state["best"] = (state["best_score"] if alpha is not None else -math.inf, state["best_step"], alpha)
        return state


@torch.no_grad()
def removal_test(pipe, images: torch.Tensor, token_ids, coefficients, norm, s: Settings, samples: int, *,
                 seed: int = 0, chunk: int = 16) -> tuple[list[float], list[float]]:
    """The significance test: per token, how much the diffusion loss on ``images`` (held out from the fit) rises
    when the token is removed from the pseudo-token (its coefficient zeroed, the rest rescaled to ``norm`` as the
    fit does), over ``samples`` draws (image, noise, t >= ``s.min_timestep``) shared by every variant, so the
    differences are paired: (mean rise, its standard error) per token. (len(token_ids) + 1) * samples UNet passes."""
    device = pipe.unet.device
    emb = token_embeddings(pipe, list(token_ids)).detach()
    coef = torch.as_tensor(coefficients, dtype=torch.float32, device=emb.device)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    n_t, ac = sched.config.num_train_timesteps, sched.alphas_cumprod.to(device)
    ids = tokenize(pipe.tokenizer, template_prompt(s.template)).to(pipe.text_encoder.device)
    lat = encode_latents(pipe.vae, images).float()
    gen = torch.Generator("cpu").manual_seed(seed)
    x0 = lat[torch.arange(samples) % len(lat)]
    noise = torch.randn(x0.shape, generator=gen).to(device)
    t = torch.randint(int(s.min_timestep * n_t), n_t, (samples,), generator=gen).to(device)
    amp = autocast_dtype(device, s.autocast, pipe.unet.dtype)

    def losses(c):
        w = combine(c, emb, norm)
        return torch.cat([diffusion_loss(pipe, w, x0[i:i + chunk], noise[i:i + chunk], t[i:i + chunk], ids, s.template,
                                         sched.config.prediction_type, ac, amp, reduction="none")
                          for i in range(0, samples, chunk)])

    full, rise, se = losses(coef), [], []
    for j in range(len(coef)):
        d = losses(coef.index_fill(0, torch.tensor([j], device=coef.device), 0.0)) - full
        rise.append(float(d.mean()))
        se.append(float(d.std() / samples ** 0.5))
    return rise, se


def fit(pipe, images: torch.Tensor, token_ids, s: Settings, *, clip=None, val_images=None, rescale: bool = True,
        verbose: bool = True, on_step=None, checkpoint=None) -> tuple[torch.Tensor, dict]:
    """Train the coefficient MLP: (coefficients of the best validation step, or the last; history).
    ``on_step(step, history)``: called with step 0 once the latents are encoded, then after each step.
    ``checkpoint``: a folder where the state is saved every ``val_every`` (or CHECKPOINT_EVERY) steps and
    resumed from. A NaN or infinite loss or coefficient raises FitDivergedError."""
    device = pipe.unet.device
    if len(token_ids) == 0:
        raise ValueError("the dictionary is empty")
    ids = torch.as_tensor(list(token_ids))
    n_top = min(s.n_tokens, len(ids))
    embeddings = token_embeddings(pipe, ids.tolist()).detach()
    norm = vocab_norm(pipe) if rescale else None

    torch.manual_seed(s.seed)
    mlp = CoefficientMLP(embeddings.shape[1], s.mlp_hidden).to(device)
    opt = torch.optim.AdamW(mlp.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction = noise_sched.config.prediction_type
    if prediction not in ("epsilon", "v_prediction"):
        raise ValueError(f"the scheduler's prediction_type {prediction!r} is not supported (epsilon or v_prediction)")
    n_train_t = noise_sched.config.num_train_timesteps
    alphas_cumprod = noise_sched.alphas_cumprod.to(device)
    amp = autocast_dtype(device, s.autocast, pipe.unet.dtype)  # the UNet pass only (see diffusion_loss)

    t0 = time.perf_counter()
    latents = encode_latents(pipe.vae, images).float()
    latents = torch.stack([latents, encode_latents(pipe.vae, images.flip(-1)).float()]) if s.flip else latents[None]
    ids_prompt = tokenize(pipe.tokenizer, template_prompt(s.template)).to(pipe.text_encoder.device)
    gen = torch.Generator("cpu").manual_seed(s.seed)
    enc_time = time.perf_counter() - t0

    val_feats = None
    if clip is not None and val_images is not None and s.val_every > 0:
        val_feats = clip.image_features(val_images)
    val_seeds = image_seeds(s.seed, len(val_images), "val") if val_images is not None else []

    def validate(alpha) -> float:  # CLIP similarity of the top-n pseudo-token's renders to the validation images
        top = torch.topk(alpha, n_top).indices
        with torch.no_grad():
            renders = generate(pipe, template_prompt(s.template), val_seeds, template=s.template, steps=s.val_steps,
                               pseudo=combine(alpha[top], embeddings[top], norm), guidance=s.guidance,
                               sampler=s.val_sampler, verbose=False)
            return float((clip.image_features(renders) * val_feats).sum(-1).mean())

    history = {"loss": [], "reconstruction": [], "sparsity": [], "validation": [], "best_step": None}
    best, step_times, start = (-math.inf, None, None), [], 1
    if checkpoint is not None:
        ckpt = Checkpoint(checkpoint, pipe, images, ids, s, rescale)
        state = ckpt.load(mlp, opt, gen)
        if state is not None:
            start, history, best, step_times = state["step"] + 1, state["history"], state["best"], state["step_times"]
            if verbose:
                print(f"resuming the fit from its checkpoint at step {state['step']} of {s.steps}")
    with frozen(pipe.unet, *[enc for _, enc in encoders(pipe)], pipe.vae):
        bar = tqdm(range(start, s.steps + 1), desc="fitting", disable=not verbose, leave=False, initial=start - 1,
                   total=s.steps)
        if on_step is not None:
            on_step(start - 1, history)
        for step in bar:
            ts = time.perf_counter()
            batch = sample_batch(latents, min(s.batch_size, latents.shape[1]), gen, n_train_t, device, s.min_timestep)
            loss, rec, sparse = step_loss(pipe, mlp, embeddings, norm, n_top, batch, ids_prompt, s.template,
                                          prediction, alphas_cumprod, s.sparsity, amp)
            if not torch.isfinite(loss):
                raise FitDivergedError(f"the fit's loss became {loss.item()} at step {step}; nothing was saved. "
                                       f"Lower lr (now {s.lr}) or sparsity (now {s.sparsity})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step_times.append(time.perf_counter() - ts)
            for name, value in (("loss", loss), ("reconstruction", rec), ("sparsity", sparse)):
                history[name].append(value.item())
            if on_step is not None:
                on_step(step, history)
            if val_feats is not None and (step % s.val_every == 0 or step == s.steps):
                with torch.no_grad():
                    alpha = mlp(embeddings)
                check_finite(alpha, step, s)
                score = validate(alpha)
                history["validation"].append({"step": step, "score": score})
                if score > best[0]:
                    best = (score, step, alpha.detach().clone())
                bar.set_postfix(loss=f"{loss.item():.4f}", val=f"{score:.3f}")
                if s.val_patience > 0 and best[1] is not None and \
                        sum(v["step"] > best[1] for v in history["validation"]) >= s.val_patience:
                    history["stopped_at"] = step  # early stop: no better score for val_patience rounds
                    break
            if checkpoint is not None and step < s.steps and step % (s.val_every or CHECKPOINT_EVERY) == 0:
                ckpt.save(step, mlp, opt, gen, history, best, step_times)
    with torch.no_grad():
        final = mlp(embeddings).detach()
    check_finite(final, s.steps, s)
    if best[2] is None:
        best = (math.nan, s.steps, final)
    fit_time = sum(step_times)
    history.update(best_step=best[1], best_score=best[0], autocast=str(amp).replace("torch.", "") if amp is not None else "off",
                   timings={"encode_s": enc_time, "fit_s": time.perf_counter() - t0,
                            "step_ms": 1000 * fit_time / max(1, len(step_times)),
                            "validation_s": time.perf_counter() - t0 - enc_time - fit_time})
    return best[2].float().cpu(), history
