"""The result: a concept as a weighted set of vocabulary tokens, with its pseudo-token, renders, edits,
and its files (``coefficients.safetensors``, exact float32, and ``decomposition.json``)."""
from __future__ import annotations

import copy
import math
import numbers
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..checks import bad, check_template, check_token, validate_settings
from ..clip import clip_for
from ..config import TEMPLATE, Settings
from ..errors import InvalidInputError, ResultNotFoundError
from ..io import dumps, read_json, write_files
from ..loading import model_name
from ..viz import axes, coefficient_bars
from .dictionary import token_text
from .fit import combine
from .generate import concept_images, generate, image_seeds
from .inject import encoders, template_prompt, token_embeddings
from .transfer import export_embedding


def _finite(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


MAX_NORM = 1e3  # a pseudo-token's norm is the vocabulary's mean embedding norm: about 0.4 (SD) to 2; 1e3 is absurd


def _valid_norm(norm) -> bool:
    """A number in (0, MAX_NORM], or (SDXL) [[width, norm], ...] with positive integer widths and such norms."""
    parts = norm if isinstance(norm, (list, tuple)) else [[1, norm]]
    return len(parts) > 0 and all(isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], int)
                                  and not isinstance(p[0], bool) and p[0] > 0 and _finite(p[1])
                                  and 0 < p[1] <= MAX_NORM for p in parts)


def check_fields(dec, source: str, pipe=None):
    """``dec``, or InvalidInputError naming ``source`` when its fields disagree (types, lengths, values); with a
    ``pipe``, also when it was fitted on another model, or a token id is outside this model's vocabulary or its
    token text is not the id's (a hand edit)."""
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
    wrong = [i for i, c in enumerate(dec.coefficients) if not (_finite(c) and c >= 0)]
    if wrong:
        refuse(f"coefficients must be finite non-negative numbers; entry {wrong[0]} ({dec.tokens[wrong[0]]!r}) is "
               f"{dec.coefficients[wrong[0]]!r}")
    if isinstance(dec.n_tokens, bool) or not isinstance(dec.n_tokens, int) or not 1 <= dec.n_tokens <= n:
        refuse(f"n_tokens must be an integer between 1 and {n}, got {dec.n_tokens!r}")
    if dec.norm is not None and not _valid_norm(dec.norm):
        refuse(f"norm must be a number in (0, {MAX_NORM:g}] (token embeddings have norms near 1), null, or (two "
               f"text encoders, SDXL) [[width, norm], ...] with positive integer widths and such norms; got {dec.norm!r}")
    try:
        check_template("template", dec.template)
    except InvalidInputError as err:
        refuse(str(err))
    if not isinstance(dec.history, dict):
        refuse("history must be a JSON object")
    try:
        validate_settings(dec.settings)
    except InvalidInputError as err:
        refuse(f"settings: {err}")
    if pipe is None:
        return dec
    name, rows = model_name(pipe), min(enc.get_input_embeddings().num_embeddings for _, enc in encoders(pipe))
    if dec.model and dec.model != name:
        refuse(f"it was fitted on model {dec.model!r}, not on this pipeline's {name!r}: its tokens would be read by "
               f"another model. Load {dec.model!r}, or, for the same weights under another name, use "
               f"dataclasses.replace(dec, model={name!r})")
    if max(dec.token_ids) >= rows:
        refuse(f"token id {max(dec.token_ids)} is outside this model's vocabulary of {rows} tokens")
    wrong = next((i for i, (t, j) in enumerate(zip(dec.tokens, dec.token_ids))
                  if t.replace("</w>", "").strip().lower() != token_text(pipe.tokenizer, j).lower()), None)
    if wrong is not None:
        refuse(f"token {dec.tokens[wrong]!r} is not the token of id {dec.token_ids[wrong]} in this model's vocabulary "
               f"({token_text(pipe.tokenizer, dec.token_ids[wrong])!r}): a hand edit? Fix the token or its id")
    return dec


@dataclass
class Decomposition:
    """A concept as a weighted set of vocabulary tokens: ``tokens``/``token_ids``/``coefficients`` cover the
    whole dictionary, strongest first; the explanation is the first ``n_tokens``. ``norm``: what the
    pseudo-token is rescaled to (see :func:`~conceptor_nb.method.fit.combine`)."""

    concept: str
    tokens: list[str]
    token_ids: list[int]
    coefficients: list[float]
    n_tokens: int
    norm: float | list[list] | None  # a number; SDXL: [[width, norm], ...] (one per text encoder); None
    template: str = TEMPLATE
    prompt: str = ""
    model: str = ""
    clip: str = ""
    dictionary_scores: list[float] = field(default_factory=list)  # CLIP score of each token, same order
    excluded: list[str] = field(default_factory=list)
    settings: Settings = field(default_factory=Settings)  # the method settings the fit ran with
    history: dict = field(default_factory=dict)  # loss, validation, best_step, timings
    # error bars (fits > 1; empty for one fit), per token in the order of ``tokens``: the coefficients' standard
    # deviation across the fits, and the share of fits that keep the token in their top ``n_tokens``
    spread: list[float] = field(default_factory=list)
    kept: list[float] = field(default_factory=list)
    # the significance test (empty when not run), per tested token (the first len(delta_loss) of ``tokens``): how
    # much the held-out diffusion loss rises when the token is removed, and that rise's standard error
    delta_loss: list[float] = field(default_factory=list)
    delta_se: list[float] = field(default_factory=list)

    def __post_init__(self):
        if isinstance(self.settings, dict):  # read from JSON
            self.settings = Settings.from_dict(self.settings)

    def top(self, k: int | None = None) -> list[tuple[str, float]]:
        k = self.n_tokens if k is None else k
        return list(zip(self.tokens[:k], self.coefficients[:k]))

    def supported(self) -> list:
        """Per token: True when removing it raised the held-out loss by more than two standard errors, False when
        not, None when it was not tested (beyond the tested top, or no test was run)."""
        return [d > 2 * e for d, e in zip(self.delta_loss, self.delta_se)] + [None] * (len(self.tokens) - len(self.delta_loss))

    def to_frame(self, k: int | None = None) -> pd.DataFrame:
        """The top ``k`` tokens (default ``n_tokens``) as a table: coefficient (the mean over the fits), its share of
        the top-k mass, its error bars (``spread``: standard deviation across the fits; ``kept``: share of fits
        with the token in their top n) and its significance test (``loss_rise`` +- ``loss_rise_se``, ``supported``);
        NaN or None where not computed."""
        k = self.n_tokens if k is None else k
        coef = self.coefficients[:k]
        total, nan = sum(coef) or 1.0, [math.nan] * len(coef)
        pad = lambda values: (list(values[:k]) + nan)[:len(coef)]
        return pd.DataFrame({
            "rank": range(1, len(coef) + 1), "token": self.tokens[:k], "token_id": self.token_ids[:k],
            "coefficient": coef, "share": [c / total for c in coef], "spread": pad(self.spread), "kept": pad(self.kept),
            "loss_rise": pad(self.delta_loss), "loss_rise_se": pad(self.delta_se), "supported": self.supported()[:k],
            "clip_score": pad(self.dictionary_scores),
        })

    def plot(self, k: int = 10, ax=None, color: str = "C0"):
        """Bar chart of the top-k coefficients, with the spread across fits as error bars; tokens the
        significance test does not support are grey."""
        return coefficient_bars(self, k=k, ax=ax, color=color)

    def plot_history(self, ax=None, smooth: int = 20):
        """The fit's diffusion loss per step (a moving mean over ``smooth`` steps; several fits: one line each) and,
        on the right axis, the validation score (CLIP similarity of the renders), the kept step marked."""
        ax = axes(ax, (6, 3))
        for j, h in enumerate(self.history.get("fits") or [self.history]):
            loss = torch.tensor(h.get("reconstruction") or [math.nan])
            w = max(1, min(smooth, len(loss)))
            ax.plot(range(w, len(loss) + 1), loss.unfold(0, w, 1).mean(1), color=f"C{j}", lw=1,
                    label="diffusion loss" if j == 0 else None)
        ax.set(xlabel="fit step", ylabel=f"diffusion loss (mean of {smooth} steps)", title=f"{self.concept}: the fit")
        val = self.history.get("validation") or []
        if val:
            right = ax.twinx()
            right.plot([v["step"] for v in val], [v["score"] for v in val], "o-", color="k", ms=3, lw=1)
            right.set_ylabel("validation score (CLIP)")
        if self.history.get("best_step") is not None:
            ax.axvline(self.history["best_step"], color="k", ls=":", lw=1, label="kept step")
        ax.legend(fontsize=8, loc="upper right")
        return ax

    def vector(self, pipe, n_tokens: int | None = None, *, rescale: bool = True) -> torch.Tensor:
        """The pseudo-token of the top ``n_tokens`` (default ``self.n_tokens``; 0 or negative: all)."""
        n = self.n_tokens if n_tokens is None else n_tokens
        n = len(self.tokens) if n <= 0 else n
        check_fields(self, "dec", pipe)  # of this pipeline's model, ids and tokens agreeing with its vocabulary
        emb = token_embeddings(pipe, self.token_ids[:n])
        coef = torch.tensor(self.coefficients[:n], device=emb.device, dtype=torch.float32)
        return combine(coef, emb, self.norm if rescale else None)

    def render(self, pipe, seeds, n_tokens: int | None = None, *, steps: int | None = None,
               guidance: float | None = None, sampler: str | None = None, rescale: bool = True,
               batch_size: int = 8, verbose: bool = False) -> torch.Tensor:
        """Images (N, 3, H, W) in [0, 1] of the pseudo-token, one per seed (by default the fit's settings)."""
        s = self.settings
        return generate(pipe, template_prompt(self.template), list(seeds), pseudo=self.vector(pipe, n_tokens, rescale=rescale),
                        template=self.template, steps=steps or s.gen_steps, guidance=guidance or s.guidance,
                        sampler=sampler or s.sampler, batch_size=batch_size, verbose=verbose,
                        desc="rendering the pseudo-token")

    def save_embedding(self, path, pipe, *, token: str | None = None, n_tokens: int | None = None,
                       overwrite: bool = False) -> Path:
        """The pseudo-token as a textual-inversion ``.safetensors`` file that diffusers' ``load_textual_inversion``
        reads (default token ``<word>``); see :func:`~conceptor_nb.method.transfer.export_embedding`."""
        return export_embedding(self, pipe, path, token, n_tokens=n_tokens, overwrite=overwrite)

    def concept_images(self, pipe, n: int | None = None, *, seed: int | None = None, cache_dir=None,
                       verbose: bool = False) -> torch.Tensor:
        """The first ``n`` images the fit trained on (from the cache when there), the pairs of
        ``render(pipe, self.seeds(n))``; ``seed``: another run's images of the concept."""
        s = self.settings
        return concept_images(pipe, self.prompt, n or s.n_train, s.seed if seed is None else seed, steps=s.gen_steps,
                              guidance=s.guidance, sampler=s.sampler, cache_dir=cache_dir, verbose=verbose)

    @torch.no_grad()
    def faithfulness(self, pipe, clip=None, n: int = 16, *, cache_dir=None) -> pd.DataFrame:
        """The paper's faithfulness measures: CLIP image similarity of the first ``n`` concept images to ``n`` images
        of each of: the pseudo-token's renders (same seeds); the concept's prompt on held-out seeds (the ceiling);
        a random dictionary token in the template (the floor). ``similarity``: mean cosine over all pairs;
        ``distance``: between the two sets' mean embeddings."""
        clip, s = clip_for(pipe, clip), self.settings
        gen = dict(steps=s.gen_steps, guidance=s.guidance, sampler=s.sampler)
        target = clip.image_features(self.concept_images(pipe, n, cache_dir=cache_dir))
        other = self.tokens[torch.randint(self.n_tokens, len(self.tokens), (1,), generator=torch.Generator().manual_seed(
            s.seed)).item()] if len(self.tokens) > self.n_tokens else self.tokens[-1]
        floor = combine(torch.ones(1), token_embeddings(pipe, [self.token_ids[self.tokens.index(other)]]), self.norm)
        rows = {"pseudo-token": self.render(pipe, self.seeds(n)),
                "concept prompt, held-out seeds (ceiling)": concept_images(pipe, self.prompt, n, s.seed, split="test",
                                                                          cache_dir=cache_dir, verbose=False, **gen),
                f"random dictionary token {other!r} (floor)": generate(
                    pipe, template_prompt(self.template), self.seeds(n), pseudo=floor, template=self.template,
                    verbose=False, **gen)}
        out = []
        for name, images in rows.items():
            f = clip.image_features(images)
            out.append({"images": name, "similarity": float((f @ target.T).mean()),
                        "distance": float((f.mean(0) - target.mean(0)).norm())})
        return pd.DataFrame(out)

    def seeds(self, n: int) -> list[int]:
        """The seeds of the first ``n`` training images."""
        return image_seeds(self.settings.seed, n)

    def with_coefficient(self, token: str, value: float, *, tokenizer=None) -> "Decomposition":
        """A copy where ``token`` has coefficient ``value`` (0 removes its contribution). The explanation keeps
        its tokens; a token from outside it (the dictionary's tail, or a new word, which needs ``tokenizer``)
        joins it. The edit is recorded in ``history["edits"]``."""
        if not _finite(value) or value < 0:
            raise bad("value", value, "a finite non-negative number (coefficients are alpha = |f(w)|)")
        token = check_token("token", token)
        new = copy.deepcopy(self)
        lists = [new.tokens, new.token_ids, new.coefficients] + ([new.dictionary_scores] if new.dictionary_scores else [])
        n = new.n_tokens
        if token in new.tokens:
            i = new.tokens.index(token)
            tid, score = new.token_ids[i], new.dictionary_scores[i] if new.dictionary_scores else math.nan
            for lst in lists:
                del lst[i]
            if i < n:
                n -= 1
        elif tokenizer is None:
            raise ValueError(f"{token!r} is not in the decomposition's dictionary; pass tokenizer= to add it")
        else:
            ids = tokenizer(token, add_special_tokens=False).input_ids
            if len(ids) != 1:
                raise ValueError(f"{token!r} is {len(ids)} tokens in this vocabulary; give a single-token word")
            tid, score = ids[0], math.nan
        for lst, item in zip(lists, (token, int(tid), float(value), score)):  # at the end of the explanation,
            lst.insert(n, item)
        order = sorted(range(n + 1), key=lambda j: -new.coefficients[j])  # which is then ordered by coefficient
        for lst in lists:
            lst[: n + 1] = [lst[j] for j in order]
        new.n_tokens = n + 1
        new.history = {**new.history, "edits": new.history.get("edits", []) + [{"token": token, "value": float(value)}]}
        return new

    def save(self, folder, overwrite: bool = False) -> Path:
        """Write ``coefficients.safetensors`` and ``decomposition.json`` (strict JSON), each atomically; refuses,
        before writing anything, to overwrite either unless asked."""
        check_fields(self, "this decomposition")
        tensors = {"token_ids": torch.tensor(self.token_ids, dtype=torch.int64),
                   "coefficients": torch.tensor(self.coefficients, dtype=torch.float32)}
        return write_files(folder, {"coefficients.safetensors": st_save(tensors),
                                    "decomposition.json": dumps(asdict(self)).encode()}, overwrite=overwrite)

    @classmethod
    def load(cls, folder) -> "Decomposition":
        """Read a saved decomposition; one whose fields disagree (in length, or between the JSON and the
        safetensors) is refused here with InvalidInputError."""
        if not isinstance(folder, (str, Path)) or not str(folder).strip():
            raise InvalidInputError(f"folder must be a path to a saved decomposition, got {folder!r}")
        folder = Path(folder)
        file, st = folder / "decomposition.json", folder / "coefficients.safetensors"
        if not file.exists():
            what = "does not exist" if not folder.exists() else "is a file" if not folder.is_dir() else "holds no decomposition.json"
            raise ResultNotFoundError(f"cannot load a decomposition from {folder}: it {what}")
        meta = read_json(file)
        missing = sorted(f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
                         and f.name not in meta)
        if missing:
            raise InvalidInputError(f"{file} lacks the field(s) {', '.join(missing)}")
        try:
            dec = cls(**{f.name: meta[f.name] for f in fields(cls) if f.name in meta})
        except (TypeError, ValueError, AttributeError) as err:
            raise InvalidInputError(f"{file} is not a valid decomposition: {err}") from err
        if isinstance(dec.dictionary_scores, list):
            dec.dictionary_scores = [math.nan if v is None else v for v in dec.dictionary_scores]
        if not st.exists():
            return check_fields(dec, str(file))
        try:  # the exact float32 values
            t = st_load(st.read_bytes())
            ids, coef = t["token_ids"].tolist(), t["coefficients"]
        except Exception as err:
            raise InvalidInputError(f"{st} cannot be read ({type(err).__name__}: {err})") from err
        if ids != dec.token_ids:
            raise InvalidInputError(f"{st} does not match {file}: the token ids differ "
                                    f"({len(ids)} in the safetensors, {len(dec.token_ids)} in the JSON)")
        check_fields(dec, str(file))
        if coef.shape != (len(ids),) or not torch.allclose(torch.tensor(dec.coefficients, dtype=torch.float32), coef,
                                                           rtol=1e-6, atol=1e-9):
            raise InvalidInputError(f"the coefficients in {file} differ from those in {st}: a hand edit? Edit both, "
                                    f"or delete {st.name} to use the JSON's values")
        dec.coefficients = coef.tolist()
        return dec

    def __repr__(self) -> str:
        top = ", ".join(f"{t} {c:.3f}" for t, c in self.top(min(5, self.n_tokens)))
        return f"Decomposition({self.concept!r}: {top}, ...)"


def check_decomposition(name: str, dec) -> Decomposition:
    if not isinstance(dec, Decomposition):
        raise bad(name, dec, "a conceptor_nb.Decomposition (from decompose() or Decomposition.load(folder))")
    return dec


def decomposition_table(decompositions, k: int = 5) -> pd.DataFrame:
    """One row per decomposition: the concept and its top-k tokens with coefficients."""
    return pd.DataFrame([{"concept": d.concept, **{f"#{i}": f"{t} {c:.3f}" for i, (t, c) in enumerate(d.top(k), 1)}}
                         for d in decompositions])
