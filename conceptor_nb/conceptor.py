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
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .checks import as_images, pipeline_resolution
from .config import Settings, resolve
from .dictionary import Dictionary, build_dictionary
from .errors import FitDivergedError
from .images import concept_images, generate, image_seeds
from .inject import encode_template, encoders, token_embeddings, tokenize, template_prompt
from .models import model_name


class CoefficientMLP(torch.nn.Module):
    """alpha_i = |f(w_i)|, f = Linear(d, hidden) -> ReLU -> Linear(hidden, 1)."""

    def __init__(self, width: int, hidden: int = 100):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.net(embeddings).squeeze(-1).abs()


def combine(coefficients: torch.Tensor, embeddings: torch.Tensor, norm) -> torch.Tensor:
    """sum_i c_i E_i, rescaled to ``norm`` (None: not rescaled). With two embedding tables (SDXL) ``norm``
    is ``[[width1, norm1], [width2, norm2]]`` and each table's part is rescaled to its own norm."""
    w = coefficients.to(embeddings.dtype) @ embeddings
    if norm is None:
        return w
    if isinstance(norm, (int, float)):
        return w / w.norm().clamp_min(1e-12) * norm
    parts = torch.split(w, [int(width) for width, _ in norm], dim=-1)
    return torch.cat([p / p.norm().clamp_min(1e-12) * float(n) for p, (_, n) in zip(parts, norm)], dim=-1)


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _valid_norm(norm) -> bool:
    """A number, or [[width, norm], ...] (one per embedding table, SDXL)."""
    if not isinstance(norm, (list, tuple)):
        return _positive(norm)
    return len(norm) > 0 and all(isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], int)
                                 and not isinstance(p[0], bool) and p[0] > 0 and _positive(p[1]) for p in norm)


def vocab_norm(pipe):
    """Mean L2 norm of the rows of the text encoder's token-embedding table (the authors' rescaling target);
    with two text encoders (SDXL) ``[[width, norm], ...]``, one per table."""
    norms = [[enc.get_input_embeddings().weight.shape[1], float(enc.get_input_embeddings().weight.float().norm(dim=-1).mean())]
             for _, enc in encoders(pipe)]
    return norms[0][1] if len(norms) == 1 else norms


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


def check_fields(dec, source: str):
    """Refuse a decomposition whose fields disagree (lengths, types, non-finite or negative coefficients)."""
    from .errors import InvalidInputError

    def refuse(msg):
        raise InvalidInputError(f"{source}: {msg}")

    if not isinstance(dec.concept, str):
        refuse(f"concept must be a string, got {dec.concept!r}")
    for name in ("tokens", "token_ids", "coefficients"):
        if not isinstance(getattr(dec, name), list):
            refuse(f"{name} must be a list, got {type(getattr(dec, name)).__name__}")
    n = len(dec.tokens)
    if n == 0:
        refuse("the decomposition has no tokens")
    if len(dec.token_ids) != n or len(dec.coefficients) != n:
        refuse(f"tokens, token_ids and coefficients must have one entry per token; they have {n}, "
               f"{len(dec.token_ids)} and {len(dec.coefficients)}")
    if dec.dictionary_scores and len(dec.dictionary_scores) != n:
        refuse(f"dictionary_scores has {len(dec.dictionary_scores)} entries for {n} tokens")
    if not all(isinstance(t, str) for t in dec.tokens):
        refuse("tokens must be strings")
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in dec.token_ids):
        refuse("token_ids must be non-negative integers")
    bad = [i for i, c in enumerate(dec.coefficients)
           if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c < 0]
    if bad:
        refuse(f"coefficients must be finite non-negative numbers; entry {bad[0]} ({dec.tokens[bad[0]]!r}) is "
               f"{dec.coefficients[bad[0]]!r}")
    if isinstance(dec.n_tokens, bool) or not isinstance(dec.n_tokens, int) or not 1 <= dec.n_tokens <= n:
        refuse(f"n_tokens must be an integer between 1 and {n}, got {dec.n_tokens!r}")
    if dec.norm is not None and not _valid_norm(dec.norm):
        refuse(f"norm must be a positive number, null, or (two text encoders, SDXL) [[width, norm], ...] with "
               f"positive integer widths and positive norms; got {dec.norm!r}")
    if not isinstance(dec.template, str) or dec.template.count("{}") != 1:
        refuse(f"template must contain exactly one '{{}}', got {dec.template!r}")
    if not isinstance(dec.history, dict):
        refuse("history must be a JSON object")
    if not isinstance(dec.settings, Settings):
        refuse("settings must be a Settings (a JSON object in the file)")
    from .checks import validate_settings

    try:
        validate_settings(dec.settings)
    except InvalidInputError as err:
        refuse(f"settings: {err}")
    return dec


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
    settings: Settings = field(default_factory=Settings)  # the method settings the fit ran with
    history: dict = field(default_factory=dict)  # loss, validation, best_step, timings

    def __post_init__(self):
        if isinstance(self.settings, dict):  # read from JSON
            self.settings = Settings.from_dict(self.settings)

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
        emb = token_embeddings(pipe, self.token_ids[:n])
        coef = torch.tensor(self.coefficients[:n], device=emb.device, dtype=torch.float32)
        return combine(coef, emb, self.norm if rescale else None)

    def render(self, pipe, seeds, n_tokens: int | None = None, *, steps: int | None = None,
               guidance: float | None = None, sampler: str | None = None, rescale: bool = True,
               batch_size: int = 8, verbose: bool = False) -> torch.Tensor:
        """Images (N, 3, H, W) in [0, 1] from the pseudo-token, one per seed."""
        s = self.settings
        return generate(
            pipe, template_prompt(self.template), list(seeds), pseudo=self.vector(pipe, n_tokens, rescale=rescale),
            template=self.template, steps=steps or s.gen_steps, guidance=guidance or s.guidance,
            sampler=sampler or s.sampler, batch_size=batch_size, verbose=verbose,
            desc="rendering the pseudo-token",
        )

    def concept_images(self, pipe, n: int | None = None, *, seed: int | None = None, cache_dir=None,
                       verbose: bool = False) -> torch.Tensor:
        """The first ``n`` images the decomposition was trained on (seeds ``image_seeds(seed, n)``; from
        the cache when they are there), so ``render(pipe, image_seeds(seed, n))`` pairs with them.
        ``seed``: another run's images (other images of the concept, same generation settings)."""
        s = self.settings
        seed = s.seed if seed is None else seed
        return concept_images(pipe, self.prompt, n or s.n_train, seed, steps=s.gen_steps, guidance=s.guidance,
                              sampler=s.sampler, cache_dir=cache_dir, verbose=verbose)

    def seeds(self, n: int) -> list[int]:
        """The seeds of the first ``n`` training images."""
        return image_seeds(self.settings.seed, n)

    def with_coefficient(self, token: str, value: float, *, tokenizer=None) -> "Decomposition":
        """A copy with ``token``'s coefficient set to ``value`` (a new token needs ``tokenizer``)."""
        from .manipulate import set_coefficient

        return set_coefficient(self, token, value, tokenizer=tokenizer)

    # -- saving --------------------------------------------------------------------------------
    def save(self, folder, overwrite: bool = False) -> Path:
        """Write ``coefficients.safetensors`` and ``decomposition.json`` (strict JSON: NaN as null), each
        atomically; refuses, before writing anything, to overwrite either unless asked."""
        from safetensors.torch import save as st_save

        from .results import dumps, write_files

        check_fields(self, "this decomposition")
        tensors = {"token_ids": torch.tensor(self.token_ids, dtype=torch.int64),
                   "coefficients": torch.tensor(self.coefficients, dtype=torch.float32)}
        return write_files(folder, {"coefficients.safetensors": st_save(tensors),
                                    "decomposition.json": dumps(asdict(self)).encode()}, overwrite=overwrite)

    @classmethod
    def load(cls, folder) -> "Decomposition":
        """Read a saved decomposition; a file whose tokens, ids and coefficients disagree (in length, or
        between the JSON and the safetensors) is refused here with InvalidInputError, not later."""
        from safetensors.torch import load as st_load

        from .errors import InvalidInputError
        from .results import ResultNotFoundError, read_json

        if not isinstance(folder, (str, Path)) or not str(folder).strip():
            raise InvalidInputError(f"folder must be a path to a saved decomposition, got {folder!r}")
        folder = Path(folder)
        file = folder / "decomposition.json"
        if not file.exists():
            what = "does not exist" if not folder.exists() else "is a file" if not folder.is_dir() else "holds no decomposition.json"
            raise ResultNotFoundError(f"cannot load a decomposition from {folder}: it {what}")
        meta = read_json(file)
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        missing = sorted(required - set(meta))
        if missing:
            raise InvalidInputError(f"{file} lacks the field(s) {', '.join(missing)}")
        try:
            dec = cls(**{k: v for k, v in meta.items() if k in names})
        except (TypeError, ValueError, AttributeError) as err:
            raise InvalidInputError(f"{file} is not a valid decomposition: {err}") from err
        st = folder / "coefficients.safetensors"
        if st.exists():  # exact float32 values
            try:
                t = st_load(st.read_bytes())
                ids, coef = t["token_ids"].tolist(), t["coefficients"]
            except Exception as err:
                raise InvalidInputError(f"{st} cannot be read ({type(err).__name__}: {err})") from err
            if ids != dec.token_ids:
                raise InvalidInputError(f"{st} does not match {file}: the token ids differ "
                                        f"({len(ids)} in the safetensors, {len(dec.token_ids)} in the JSON)")
            try:
                js = torch.tensor([math.nan if c is None else float(c) for c in dec.coefficients], dtype=torch.float32)
            except (TypeError, ValueError) as err:
                raise InvalidInputError(f"{file}: coefficients must be numbers ({err})") from err
            if js.shape != coef.shape or not torch.allclose(js, coef, rtol=1e-6, atol=1e-9, equal_nan=False):
                raise InvalidInputError(
                    f"the coefficients in {file} differ from those in {st}: a hand edit? Edit both, or delete "
                    f"{st.name} to use the JSON's values")
            dec.coefficients = coef.tolist()
        dec.dictionary_scores = [math.nan if v is None else v for v in dec.dictionary_scores] \
            if isinstance(dec.dictionary_scores, list) else dec.dictionary_scores
        return check_fields(dec, str(file))

    # -- plotting ------------------------------------------------------------------------------
    def plot(self, k: int = 10, ax=None, color: str = "C0"):
        """Bar chart of the top-k coefficients."""
        from .viz import coefficient_bars

        return coefficient_bars(self, k=k, ax=ax, color=color)

    def __repr__(self) -> str:
        top = ", ".join(f"{t} {c:.3f}" for t, c in self.top(min(5, self.n_tokens)))
        return f"Decomposition({self.concept!r}: {top}, ...)"


def run_settings(pipe, settings: Settings | None = None, **overrides) -> Settings:
    """The settings a run on ``pipe`` uses: ``settings`` (default: the profile of the pipeline's model,
    see :func:`conceptor_nb.config.resolve`) with ``overrides`` applied, None included (``exclude_threshold=None``
    turns that filter off)."""
    base = settings or resolve(model_name(pipe), warn=False)[0].settings
    return base.replace(**overrides)


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


def check_decompose_inputs(pipe, concept, settings, overrides: dict, dictionary=None):
    """decompose()'s checks, before any work: (settings, concept word, prompt)."""
    from .checks import check_pipe, check_setting_names, parse_concept, validate_settings
    from .errors import InvalidInputError

    check_pipe(pipe)
    check_setting_names(overrides)
    if settings is not None and not isinstance(settings, Settings):
        raise InvalidInputError(f"settings must be a conceptor_nb.Settings or None, got {type(settings).__name__}")
    s = validate_settings(run_settings(pipe, settings, **overrides))
    word, prompt = parse_concept(concept, s.template)
    tokenize(pipe.tokenizer, prompt)
    if dictionary is None:
        vocab = len(pipe.tokenizer) - len(set(pipe.tokenizer.all_special_ids))
        if s.dict_size > vocab:
            raise InvalidInputError(f"dict_size must be an integer between 1 and the vocabulary's {vocab} words, "
                                    f"got {s.dict_size}")
    elif not isinstance(dictionary, Dictionary) or len(dictionary) == 0:
        raise InvalidInputError(f"dictionary must be a non-empty conceptor_nb.Dictionary or None, got {dictionary!r:.80}")
    return s, word, prompt


def decompose(pipe, concept: str, *, clip=None, settings: Settings | None = None, images: torch.Tensor | None = None,
              val_images: torch.Tensor | None = None, dictionary: Dictionary | None = None,
              exclude_concept: bool = True, rescale: bool = True, cache_dir=None, verbose: bool = True,
              checkpoint_dir=None, refresh: bool = False, **overrides) -> Decomposition:
    """Decompose ``concept`` into a weighted set of tokens of ``pipe``'s vocabulary.

    Every field of :class:`conceptor_nb.config.Settings` is a keyword argument
    (``n_train``, ``dict_size``, ``n_tokens``, ``steps``, ``lr``, ``sparsity``,
    ``val_every`` ...); the rest come from the active profile. ``images`` and
    ``val_images`` (in [0, 1]) replace the generated concept images;
    ``dictionary`` replaces the CLIP dictionary. Every input is checked before any work
    (InvalidInputError). ``checkpoint_dir``: the fit saves its state there at each validation and, when
    it finds a matching state there, resumes from it (same coefficients as an uninterrupted run).
    ``refresh``: generate the concept images again instead of reading them from the cache.
    """
    s, word, prompt = check_decompose_inputs(pipe, concept, settings, overrides, dictionary)
    if images is not None:
        images = as_images(images, "images", pipeline_resolution(pipe))
    if val_images is not None:
        val_images = as_images(val_images, "val_images", pipeline_resolution(pipe))
    timings = {}
    t0 = time.perf_counter()
    gen = dict(steps=s.gen_steps, guidance=s.guidance, sampler=s.sampler, cache_dir=cache_dir, refresh=refresh,
               verbose=verbose)
    if images is None:
        images = concept_images(pipe, prompt, s.n_train, s.seed, **gen)
    if val_images is None and s.val_every > 0 and s.n_val > 0:
        val_images = concept_images(pipe, prompt, s.n_val, s.seed, split="val", **gen)
    timings["images_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if isinstance(clip, str) or (clip is None and (dictionary is None or val_images is not None)):
        from .models import load_clip

        clip = load_clip(clip or resolve(model_name(pipe), warn=False)[2], device=pipe.device)
    if dictionary is None:
        dictionary = build_dictionary(clip, images, word, s.dict_size, templates=s.clip_templates,
                                      precision=s.vocab_precision,
                                      exclude_concept=exclude_concept, exclude_threshold=s.exclude_threshold,
                                      null_threshold=s.null_threshold,
                                      cache_dir=cache_dir, verbose=verbose)
    timings["dictionary_s"] = time.perf_counter() - t0

    coefficients, history = fit(pipe, images, dictionary.token_ids, s, clip=clip, val_images=val_images,
                                rescale=rescale, verbose=verbose, checkpoint=checkpoint_dir)
    history["timings"] = {**timings, **history.get("timings", {})}
    order = torch.argsort(coefficients, descending=True).tolist()
    return Decomposition(
        concept=concept, tokens=[dictionary.tokens[i] for i in order],
        token_ids=[dictionary.token_ids[i] for i in order], coefficients=[float(coefficients[i]) for i in order],
        n_tokens=min(s.n_tokens, len(order)), norm=vocab_norm(pipe) if rescale else None, template=s.template,
        prompt=prompt, model=model_name(pipe), clip=getattr(clip, "name", "") or "",
        dictionary_scores=[float(dictionary.scores[i]) for i in order], excluded=list(dictionary.excluded),
        settings=s, history=history,
    )


def diffusion_loss(pipe, w: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                   ids_prompt: torch.Tensor, template: str, prediction: str, alphas_cumprod: torch.Tensor,
                   amp: torch.dtype | None = None, reduction: str = "mean") -> torch.Tensor:
    """MSE between the UNet's prediction and the epsilon or v target, with ``w`` in the prompt
    (``reduction="none"``: one value per batch item).

    The prompt is encoded once (not once per batch item) and shared by the batch.
    ``amp``: autocast the UNet pass to this dtype. The text encoder stays in its
    own dtype: it costs little time, and autocast's low-precision copies of its
    weights (kept for backward) would cost more memory than its activations.
    """
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
    target = noise if prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
    cond, added = encode_template(pipe, w, template, ids_prompt)
    b = x0.shape[0]
    cond = cond.expand(b, -1, -1)
    unet = pipe.unet
    dtype = next(unet.parameters()).dtype  # (diffusers' unet.dtype walks every submodule: ~1 ms a call)
    extra = {}
    if added is not None:  # SDXL: pooled text embedding and size/crop ids, shared by the batch
        extra["added_cond_kwargs"] = {k: v.to(dtype).expand(b, -1) for k, v in added.items()}
    with autocast_to(x0.device, amp):
        pred = unet(noisy.to(dtype), t, encoder_hidden_states=cond.to(dtype), **extra).sample
    if reduction == "none":
        return ((pred.float() - target) ** 2).flatten(1).mean(1)
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


def sample_batch(latents: torch.Tensor, b: int, gen: torch.Generator, n_timesteps: int, device,
                 min_timestep: float = 0.0):
    """A training batch from cached latents (2, N, ...) = (original, flipped): ``b`` random images, each
    original or flipped, with noise and timesteps (uniform on ``[min_timestep * n_timesteps, n_timesteps)``),
    all drawn from ``gen`` (CPU) in a fixed order."""
    pick = torch.randint(0, latents.shape[1], (b,), generator=gen)
    side = torch.randint(0, latents.shape[0], (b,), generator=gen)
    x0 = latents[side, pick]
    noise = torch.randn(x0.shape, generator=gen).to(device)
    t = torch.randint(int(min_timestep * n_timesteps), n_timesteps, (b,), generator=gen).to(device)
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


CHECKPOINT_EVERY = 50  # fit steps between checkpoints when there is no validation


def check_finite(alpha: torch.Tensor, step: int, s: Settings) -> None:
    if not torch.isfinite(alpha).all():
        raise FitDivergedError(f"the coefficients became NaN or infinite at step {step}; nothing was saved. "
                               f"Lower lr (now {s.lr})")


class Checkpoint:
    """The fit's state in one safetensors file (MLP, optimiser, sampling RNG; history as JSON in its
    header), written atomically. It holds a key of everything that shapes the fit (weights, images,
    dictionary, settings); a state with another key is not resumed from."""

    FILE = "fit_state.safetensors"

    def __init__(self, folder, pipe, images, ids, s: Settings, rescale: bool):
        from .images import weights_fingerprint
        from .results import tensors_digest

        self.file = Path(folder) / self.FILE
        key = dict(weights=weights_fingerprint(pipe), images=tensors_digest({"images": images}),
                   token_ids=tensors_digest({"ids": ids.cpu()}), settings=s.to_dict(), rescale=rescale)
        self.key = json.dumps(key, sort_keys=True)

    def save(self, step, mlp, opt, gen, history, best, step_times) -> None:
        from .results import dumps, save_verified

        tensors = {f"mlp.{k}": v for k, v in mlp.state_dict().items()}
        opt_state = opt.state_dict()
        for i, st in opt_state["state"].items():
            for k, v in st.items():
                tensors[f"opt.{i}.{k}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
        tensors["rng"] = gen.get_state()
        if best[2] is not None:
            tensors["best_alpha"] = best[2]
        state = dict(step=step, history=history, best_score=best[0] if best[2] is not None else None,
                     best_step=best[1], step_times=step_times, param_groups=opt_state["param_groups"])
        self.file.parent.mkdir(parents=True, exist_ok=True)
        save_verified(self.file, tensors, {"key": self.key, "state": dumps(state, None)})

    def load(self, mlp, opt, gen) -> dict | None:
        """Restore the saved state into ``mlp``, ``opt`` and ``gen``; None when there is none that matches."""
        import warnings

        from .errors import CacheError
        from .results import load_verified

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
        score = state["best_score"] if alpha is not None else -math.inf
        state["best"] = (score, state["best_step"], alpha)
        return state


def fit(pipe, images: torch.Tensor, token_ids, s: Settings, *, clip=None, val_images=None, rescale: bool = True,
        verbose: bool = True, on_step=None, checkpoint=None) -> tuple[torch.Tensor, dict]:
    """Train the coefficient MLP; returns the coefficients of the best validation step and the history.

    ``on_step(step, history)``: called with step 0 when the step loop starts (the latents are encoded),
    then after each optimiser step (before any validation of that step); for progress and timing.
    ``checkpoint``: a folder; the state is saved there after each validation (every ``val_every`` steps,
    or every CHECKPOINT_EVERY without validation), and a matching saved state is resumed from.
    A NaN or infinite loss or coefficient stops the fit with FitDivergedError.
    """
    from diffusers import DDPMScheduler

    device = pipe.unet.device
    unet, text_encoder = pipe.unet, pipe.text_encoder
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
                               steps=s.val_steps, guidance=s.guidance, sampler=s.val_sampler, verbose=False)
            return float((clip.image_features(renders) * val_feats).sum(-1).mean())

    history = {"loss": [], "reconstruction": [], "sparsity": [], "validation": [], "best_step": None}
    best = (-math.inf, None, None)
    step_times = []
    start = 1
    if checkpoint is not None:
        ckpt = Checkpoint(checkpoint, pipe, images, ids, s, rescale)
        state = ckpt.load(mlp, opt, gen)
        if state is not None:
            start, history, best, step_times = state["step"] + 1, state["history"], state["best"], state["step_times"]
            if verbose:
                print(f"resuming the fit from its checkpoint at step {state['step']} of {s.steps}")
    with frozen(unet, *[enc for _, enc in encoders(pipe)], pipe.vae):
        bar = tqdm(range(start, s.steps + 1), desc="fitting", disable=not verbose, leave=False,
                   initial=start - 1, total=s.steps)
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
            history["loss"].append(loss.item())
            history["reconstruction"].append(rec.item())
            history["sparsity"].append(sparse.item())
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
