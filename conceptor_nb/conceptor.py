"""The Conceptor fit: a sparse weighted mix of vocabulary embeddings that reconstructs a concept.

``decompose(pipe, "a dog")`` generates the concept's images, builds the CLIP
dictionary, and trains a small MLP that gives each dictionary token a
coefficient, so that the pseudo-token w* = sum_i alpha_i w_i, put into
"a photo of a <>", reconstructs the images under the diffusion loss.
"""
from __future__ import annotations

import functools
import json
import math
import re
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .config import Settings, settings_for_model
from .dictionary import Dictionary, build_dictionary, concept_word
from .images import concept_images, concept_prompt, generate, image_seeds
from .inject import pseudo_token, tokenize, template_prompt
from .models import model_name


class CoefficientMLP(torch.nn.Module):
    """alpha_i = |f(w_i)|, f = Linear(d, hidden) -> ReLU -> Linear(hidden, 1)."""

    def __init__(self, width: int, hidden: int = 100):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.net(embeddings).squeeze(-1).abs()


def combine(coefficients: torch.Tensor, embeddings: torch.Tensor, norm: float | None) -> torch.Tensor:
    """sum_i c_i E_i, rescaled to ``norm`` (None: not rescaled)."""
    w = coefficients.to(embeddings.dtype) @ embeddings
    if norm is not None:
        w = w / w.norm().clamp_min(1e-12) * norm
    return w


def vocab_norm(pipe) -> float:
    """Mean L2 norm of the rows of the text encoder's token-embedding table (the authors' rescaling target)."""
    return float(pipe.text_encoder.get_input_embeddings().weight.float().norm(dim=-1).mean())


@contextmanager
def frozen(*modules):
    """Within the block the modules' parameters need no gradient; their flags are restored after."""
    saved = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


@dataclass
class Decomposition:
    """A concept as a weighted set of vocabulary tokens, strongest first.

    ``tokens``/``token_ids``/``coefficients`` cover the whole dictionary,
    sorted by coefficient; the explanation is the first ``n_tokens``.
    ``norm`` is the norm the pseudo-token is rescaled to (None: no rescaling).
    """

    concept: str
    tokens: list[str]
    token_ids: list[int]
    coefficients: list[float]
    n_tokens: int
    norm: float | None
    template: str = "a photo of a {}"
    prompt: str = ""
    model: str = ""
    clip: str = ""
    dictionary_scores: list[float] = field(default_factory=list)  # CLIP score of each token, same order
    excluded: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    history: dict = field(default_factory=dict)  # loss, validation, best_step, timings

    # -- reading -------------------------------------------------------------------------------
    def top(self, k: int | None = None) -> list[tuple[str, float]]:
        k = self.n_tokens if k is None else k
        return list(zip(self.tokens[:k], self.coefficients[:k]))

    def to_frame(self, k: int | None = None):
        """The top ``k`` tokens (default: ``n_tokens``) as a table, with each one's share of the top-k mass."""
        import pandas as pd

        k = self.n_tokens if k is None else k
        coef = self.coefficients[:k]
        total = sum(coef) or 1.0
        return pd.DataFrame({
            "rank": range(1, len(coef) + 1), "token": self.tokens[:k], "token_id": self.token_ids[:k],
            "coefficient": coef, "share": [c / total for c in coef],
            "clip_score": self.dictionary_scores[:k] if self.dictionary_scores else [float("nan")] * len(coef),
        })

    def vector(self, pipe, n_tokens: int | None = None, *, rescale: bool = True) -> torch.Tensor:
        """The pseudo-token from the top ``n_tokens`` (default ``self.n_tokens``; 0 or negative: all)."""
        n = self.n_tokens if n_tokens is None else n_tokens
        n = len(self.tokens) if n <= 0 else n
        table = pipe.text_encoder.get_input_embeddings().weight
        ids = torch.tensor(self.token_ids[:n], device=table.device)
        coef = torch.tensor(self.coefficients[:n], device=table.device, dtype=torch.float32)
        return combine(coef, table[ids].float(), self.norm if rescale else None)

    def render(self, pipe, seeds, n_tokens: int | None = None, *, steps: int | None = None,
               guidance: float | None = None, sampler: str | None = None, rescale: bool = True,
               batch_size: int = 8, verbose: bool = False) -> torch.Tensor:
        """Images (N, 3, H, W) in [0, 1] from the pseudo-token, one per seed."""
        s = self.settings
        return generate(
            pipe, template_prompt(self.template), list(seeds), pseudo=self.vector(pipe, n_tokens, rescale=rescale),
            template=self.template, steps=steps or s.get("gen_steps", 50), guidance=guidance or s.get("guidance", 7.5),
            sampler=sampler or s.get("gen_scheduler", "dpm"), batch_size=batch_size, verbose=verbose,
            desc="rendering the pseudo-token",
        )

    def concept_images(self, pipe, n: int | None = None, *, seed: int | None = None, cache_dir=None,
                       verbose: bool = False) -> torch.Tensor:
        """The first ``n`` images the decomposition was trained on (seeds ``image_seeds(seed, n)``; from
        the cache when they are there), so ``render(pipe, image_seeds(seed, n))`` pairs with them.
        ``seed``: another run's images (other images of the concept, same generation settings)."""
        s = self.settings
        seed = s.get("seed", 0) if seed is None else seed
        return concept_images(pipe, self.prompt, n or s.get("n_train", 8), seed, steps=s.get("gen_steps", 50),
                              guidance=s.get("guidance", 7.5), sampler=s.get("gen_scheduler", "dpm"),
                              cache_dir=cache_dir, verbose=verbose)

    def seeds(self, n: int) -> list[int]:
        """The seeds of the first ``n`` training images."""
        return image_seeds(self.settings.get("seed", 0), n)

    def with_coefficient(self, token: str, value: float, *, tokenizer=None) -> "Decomposition":
        """A copy with ``token``'s coefficient set to ``value`` (a new token needs ``tokenizer``)."""
        from .manipulate import set_coefficient

        return set_coefficient(self, token, value, tokenizer=tokenizer)

    # -- saving --------------------------------------------------------------------------------
    def save(self, folder, overwrite: bool = False) -> Path:
        """Write ``decomposition.json`` and ``coefficients.safetensors``; refuses to overwrite unless asked."""
        folder = Path(folder)
        target = folder / "decomposition.json"
        if target.exists() and not overwrite:
            raise FileExistsError(f"{target} exists; pass overwrite=True (or --overwrite) or choose another folder")
        folder.mkdir(parents=True, exist_ok=True)
        meta = asdict(self)
        tensors = {"token_ids": torch.tensor(self.token_ids, dtype=torch.int64),
                   "coefficients": torch.tensor(self.coefficients, dtype=torch.float32)}
        tmp = folder / "coefficients.safetensors.tmp"
        save_file(tensors, tmp)
        tmp.replace(folder / "coefficients.safetensors")
        tmp = folder / "decomposition.json.tmp"
        tmp.write_text(json.dumps(meta, indent=1, allow_nan=True))
        tmp.replace(target)
        return folder

    @classmethod
    def load(cls, folder) -> "Decomposition":
        folder = Path(folder)
        file = folder / "decomposition.json"
        if not file.exists():
            raise FileNotFoundError(f"no decomposition.json in {folder}")
        try:
            meta = json.loads(file.read_text())
            names = {f.name for f in fields(cls)}
            dec = cls(**{k: v for k, v in meta.items() if k in names})
        except (json.JSONDecodeError, TypeError) as err:
            raise ValueError(f"{file} is not a valid decomposition: {err}") from err
        st = folder / "coefficients.safetensors"
        if st.exists():  # exact float32 values
            t = load_file(st)
            if t["token_ids"].tolist() != dec.token_ids:
                raise ValueError(f"{st} does not match {file} (token ids differ)")
            dec.coefficients = t["coefficients"].tolist()
        return dec

    # -- plotting ------------------------------------------------------------------------------
    def plot(self, k: int = 10, ax=None, color: str = "C0"):
        """Bar chart of the top-k coefficients."""
        from .viz import coefficient_bars

        return coefficient_bars(self, k=k, ax=ax, color=color)

    def __repr__(self) -> str:
        top = ", ".join(f"{t} {c:.3f}" for t, c in self.top(min(5, self.n_tokens)))
        return f"Decomposition({self.concept!r}: {top}, ...)"


def _resolve(pipe, settings: Settings | None, overrides: dict) -> Settings:
    base = settings or settings_for_model(model_name(pipe))
    return base.replace(**{k: v for k, v in overrides.items() if v is not None})


@torch.no_grad()
def encode_latents(pipe, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """VAE latents (mean of the posterior, scaled) of images in [0, 1]; done once per fit."""
    vae = pipe.vae
    dev, dtype = vae.device, vae.dtype
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(dev, dtype) * 2 - 1
        out.append(vae.encode(x).latent_dist.mean * vae.config.scaling_factor)
    return torch.cat(out)


def decompose(pipe, concept: str, *, clip=None, settings: Settings | None = None, images: torch.Tensor | None = None,
              val_images: torch.Tensor | None = None, dictionary: Dictionary | None = None,
              exclude_concept: bool = True, rescale: bool = True, cache_dir=None, verbose: bool = True,
              **overrides) -> Decomposition:
    """Decompose ``concept`` into a weighted set of tokens of ``pipe``'s vocabulary.

    Every field of :class:`conceptor_nb.config.Settings` is a keyword argument
    (``n_train``, ``dict_size``, ``n_tokens``, ``steps``, ``lr``, ``sparsity``,
    ``val_every`` ...); the rest come from the active profile. ``images`` and
    ``val_images`` (in [0, 1]) replace the generated concept images;
    ``dictionary`` replaces the CLIP dictionary.
    """
    unknown = set(overrides) - {f.name for f in fields(Settings)}
    if unknown:
        raise TypeError(f"decompose() got unknown settings {sorted(unknown)}")
    s = _resolve(pipe, settings, overrides)
    prompt = concept_prompt(concept, s.template)
    tokenize(pipe.tokenizer, prompt)
    timings = {}
    t0 = time.perf_counter()
    gen = dict(steps=s.gen_steps, guidance=s.guidance, sampler=s.gen_scheduler, cache_dir=cache_dir, verbose=verbose)
    if images is None:
        images = concept_images(pipe, prompt, s.n_train, s.seed, **gen)
    if val_images is None and s.val_every > 0 and s.n_val > 0:
        val_images = concept_images(pipe, prompt, s.n_val, s.seed, split="val", **gen)
    timings["images_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if clip is None and (dictionary is None or val_images is not None):
        from .models import default_clip_for, load_clip

        clip = load_clip(s.clip or default_clip_for(s.model), device=pipe.device)
    if dictionary is None:
        dictionary = build_dictionary(clip, images, concept_word(concept), s.dict_size, templates=s.clip_templates,
                                      exclude_concept=exclude_concept, exclude_threshold=s.exclude_threshold,
                                      null_threshold=s.null_threshold,
                                      cache_dir=cache_dir, verbose=verbose)
    timings["dictionary_s"] = time.perf_counter() - t0

    coefficients, history = fit(pipe, images, dictionary.token_ids, s, clip=clip, val_images=val_images,
                                rescale=rescale, verbose=verbose)
    history["timings"] = {**timings, **history.get("timings", {})}
    order = torch.argsort(coefficients, descending=True).tolist()
    return Decomposition(
        concept=concept, tokens=[dictionary.tokens[i] for i in order],
        token_ids=[dictionary.token_ids[i] for i in order], coefficients=[float(coefficients[i]) for i in order],
        n_tokens=min(s.n_tokens, len(order)), norm=vocab_norm(pipe) if rescale else None, template=s.template,
        prompt=prompt, model=model_name(pipe), clip=getattr(clip, "name", "") or "",
        dictionary_scores=[float(dictionary.scores[i]) for i in order], excluded=list(dictionary.excluded),
        settings=s.to_dict(), history=history,
    )


def diffusion_loss(pipe, w: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                   ids_prompt: torch.Tensor, template: str, prediction: str, alphas_cumprod: torch.Tensor,
                   amp: torch.dtype | None = None) -> torch.Tensor:
    """MSE between the UNet's prediction and the epsilon or v target, with ``w`` in the prompt.

    The prompt is encoded once (not once per batch item) and shared by the batch.
    ``amp``: autocast the UNet pass to this dtype. The text encoder stays in its
    own dtype: it costs little time, and autocast's low-precision copies of its
    weights (kept for backward) would cost more memory than its activations.
    """
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
    target = noise if prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
    with pseudo_token(pipe, w, template):
        cond = pipe.text_encoder(ids_prompt)[0]
    cond = cond.expand(x0.shape[0], -1, -1)
    unet = pipe.unet
    dtype = next(unet.parameters()).dtype  # (diffusers' unet.dtype walks every submodule: ~1 ms a call)
    with autocast_to(x0.device, amp):
        pred = unet(noisy.to(dtype), t, encoder_hidden_states=cond.to(dtype)).sample
    return F.mse_loss(pred.float(), target)


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """True when this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX-BF16; Linux only)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def fit_autocast_dtype(device, mode: str | None, weight_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype the fit's UNet pass autocasts to, or None (the weights' own dtype).

    ``mode``: ``"off"``, ``"bf16"``, or ``"auto"`` (bf16 when the weights are float32 and the
    device computes bf16 natively: a CUDA GPU that supports it, or a CPU with AVX512-BF16/AMX).
    """
    mode = "off" if mode in (None, "", "fp32") else mode
    if mode not in ("off", "bf16", "auto"):
        raise ValueError(f"autocast must be 'off', 'bf16' or 'auto', got {mode!r}")
    dev = torch.device(device)
    if mode == "off":
        return None
    if dev.type not in ("cpu", "cuda"):
        if mode == "bf16":
            raise ValueError(f"bf16 autocast is supported on cpu and cuda, not on {dev.type}")
        return None
    if mode == "bf16":
        return torch.bfloat16
    if weight_dtype != torch.float32:
        return None
    native = torch.cuda.is_bf16_supported() if dev.type == "cuda" else cpu_has_native_bf16()
    return torch.bfloat16 if native else None


def autocast_to(device, dtype: torch.dtype | None):
    """``torch.autocast`` on ``device``'s type to ``dtype``; a no-op context when ``dtype`` is None."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def sample_batch(latents: torch.Tensor, b: int, gen: torch.Generator, n_timesteps: int, device):
    """A training batch from cached latents (2, N, ...) = (original, flipped): ``b`` random images, each
    original or flipped, with noise and timesteps, all drawn from ``gen`` (CPU) in a fixed order."""
    pick = torch.randint(0, latents.shape[1], (b,), generator=gen)
    side = torch.randint(0, latents.shape[0], (b,), generator=gen)
    x0 = latents[side, pick]
    noise = torch.randn(x0.shape, generator=gen).to(device)
    t = torch.randint(0, n_timesteps, (b,), generator=gen).to(device)
    return x0, noise, t


def step_loss(pipe, mlp, embeddings: torch.Tensor, norm: float | None, n_top: int, batch, ids_prompt: torch.Tensor,
              template: str, prediction: str, alphas_cumprod: torch.Tensor, sparsity: float,
              amp: torch.dtype | None = None):
    """One fit step's loss on ``batch = (x0, noise, t)``: (total, reconstruction, sparsity term).

    The sparsity term is 1 - cos(w of the top ``n_top`` tokens, w of all of them).
    """
    x0, noise, t = batch
    alpha = mlp(embeddings)
    w = combine(alpha, embeddings, norm)
    rec = diffusion_loss(pipe, w, x0, noise, t, ids_prompt, template, prediction, alphas_cumprod, amp)
    top = torch.topk(alpha.detach(), n_top).indices
    sparse = 1 - F.cosine_similarity(alpha[top] @ embeddings[top], alpha @ embeddings, dim=0)
    return rec + sparsity * sparse, rec, sparse


def fit(pipe, images: torch.Tensor, token_ids, s: Settings, *, clip=None, val_images=None, rescale: bool = True,
        verbose: bool = True) -> tuple[torch.Tensor, dict]:
    """Train the coefficient MLP; returns the coefficients of the best validation step and the history."""
    from diffusers import DDPMScheduler

    device = pipe.unet.device
    unet, text_encoder = pipe.unet, pipe.text_encoder
    table = text_encoder.get_input_embeddings().weight
    ids = torch.as_tensor(list(token_ids), device=table.device)
    if len(ids) == 0:
        raise ValueError("the dictionary is empty")
    n_top = min(s.n_tokens, len(ids))
    embeddings = table[ids].detach().float()
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
    amp = fit_autocast_dtype(device, s.autocast, unet.dtype)  # the UNet pass only (see diffusion_loss)

    t0 = time.perf_counter()
    latents = encode_latents(pipe, images).float()
    if s.flip:  # the flipped images are encoded once too
        latents = torch.stack([latents, encode_latents(pipe, images.flip(-1)).float()])
    else:
        latents = latents[None]
    ids_prompt = tokenize(pipe.tokenizer, template_prompt(s.template)).to(text_encoder.device)
    gen = torch.Generator("cpu").manual_seed(s.seed)
    enc_time = time.perf_counter() - t0

    val_feats = None
    if clip is not None and val_images is not None and s.val_every > 0:
        val_feats = clip.image_features(val_images)
    val_seeds = image_seeds(s.seed, len(val_images), "val") if val_images is not None else []

    def top_vector(alpha):
        top = torch.topk(alpha, n_top).indices
        return combine(alpha[top], embeddings[top], norm)

    def validate(alpha) -> float:
        with torch.no_grad():
            renders = generate(pipe, template_prompt(s.template), val_seeds, pseudo=top_vector(alpha), template=s.template,
                               steps=s.val_steps, guidance=s.guidance, sampler=s.val_scheduler, verbose=False)
            return float((clip.image_features(renders) * val_feats).sum(-1).mean())

    history = {"loss": [], "reconstruction": [], "sparsity": [], "validation": [], "best_step": None}
    best = (-math.inf, None, None)
    step_times = []
    with frozen(unet, text_encoder, pipe.vae):
        bar = tqdm(range(1, s.steps + 1), desc="fitting", disable=not verbose, leave=False)
        for step in bar:
            ts = time.perf_counter()
            batch = sample_batch(latents, min(s.batch_size, latents.shape[1]), gen, n_train_t, device)
            loss, rec, sparse = step_loss(pipe, mlp, embeddings, norm, n_top, batch, ids_prompt, s.template,
                                          prediction, alphas_cumprod, s.sparsity, amp)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step_times.append(time.perf_counter() - ts)
            history["loss"].append(loss.item())
            history["reconstruction"].append(rec.item())
            history["sparsity"].append(sparse.item())
            if val_feats is not None and (step % s.val_every == 0 or step == s.steps):
                with torch.no_grad():
                    alpha = mlp(embeddings)
                score = validate(alpha)
                history["validation"].append({"step": step, "score": score})
                if score > best[0]:
                    best = (score, step, alpha.detach().clone())
                bar.set_postfix(loss=f"{loss.item():.4f}", val=f"{score:.3f}")
    with torch.no_grad():
        final = mlp(embeddings).detach()
    if best[2] is None:
        best = (math.nan, s.steps, final)
    history["best_step"] = best[1]
    history["best_score"] = best[0]
    fit_time = sum(step_times)
    history["autocast"] = str(amp).replace("torch.", "") if amp is not None else "off"
    history["timings"] = {"encode_s": enc_time, "fit_s": time.perf_counter() - t0,
                          "step_ms": 1000 * fit_time / max(1, len(step_times)),
                          "validation_s": time.perf_counter() - t0 - enc_time - fit_time}
    return best[2].float().cpu(), history


def decomposition_table(decompositions, k: int = 5):
    """One row per decomposition: the concept and its top-k tokens with coefficients (pandas)."""
    import pandas as pd

    rows = []
    for d in decompositions:
        row = {"concept": d.concept}
        for i, (t, c) in enumerate(d.top(k), 1):
            row[f"#{i}"] = f"{t} {c:.3f}"
        rows.append(row)
    return pd.DataFrame(rows)
