"""Take a decomposition elsewhere: its pseudo-token as a textual-inversion file that diffusers'
``load_textual_inversion`` reads (``export_embedding`` / ``load_embedding``), and two decompositions side by
side (``compare``: two models on one concept, or two concepts on one model)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from ..checks import parse_concept
from ..errors import InvalidInputError
from ..io import load_result, save_result, slug, write_files
from ..loading import quiet_loading
from ..viz import axes
from .dictionary import token_text
from .fit import vocab_norm
from .inject import encoders

SDXL_KEYS = ("clip_l", "clip_g")  # the two-encoder form: the first text encoder's row, the second's


def check_vocabulary(pipe, dec) -> None:
    """InvalidInputError unless ``pipe``'s vocabulary and token-embedding tables are the ones ``dec`` was fit on:
    its token ids read as its tokens, and the tables' widths and mean norm are the fit's ``norm``."""
    what = f"the decomposition of {dec.concept!r} (fit on {dec.model or 'an unnamed model'})"
    rows = min([len(pipe.tokenizer)] + [enc.get_input_embeddings().weight.shape[0] for _, enc in encoders(pipe)])
    if max(dec.token_ids) >= rows:
        raise InvalidInputError(f"{what} uses token id {max(dec.token_ids)}, this model's vocabulary has {rows}: "
                                "another tokenizer")
    for t, i in zip(dec.tokens, dec.token_ids):
        if token_text(pipe.tokenizer, i) != t:
            raise InvalidInputError(f"{what}: token id {i} is {t!r} there and {token_text(pipe.tokenizer, i)!r} in "
                                    "this model's vocabulary: another tokenizer")
    if dec.norm is None:
        return
    mine, theirs = vocab_norm(pipe), dec.norm
    widths = [[int(w) for w, _ in n] if isinstance(n, list) else None for n in (mine, theirs)]
    if widths[0] != widths[1] or not np.allclose(np.ravel(mine), np.ravel(theirs), rtol=1e-3, atol=0):
        raise InvalidInputError(f"{what}: its token embeddings (norm {theirs}) are not this model's ({mine}): "
                                "export it with the model it was fit on")


def default_token(dec) -> str:
    """``<word>`` of the concept: "a doctor" -> "<doctor>"."""
    return f"<{slug(parse_concept(dec.concept)[0])}>"


def export_embedding(dec, pipe, path, token: str | None = None, *, n_tokens: int | None = None,
                     overwrite: bool = False) -> Path:
    """Write ``dec``'s pseudo-token (``dec.vector(pipe, n_tokens)``, rescaled as the fit did) as a textual-inversion
    file: ``{token: (1, d)}`` (SD 1.x/2.x) or ``{"clip_l": (1, d1), "clip_g": (1, d2)}`` (SDXL). Its metadata
    keep the token, the prompt, the concept, the model, the vocabulary size and the widths."""
    check_vocabulary(pipe, dec)
    token = default_token(dec) if token is None else token
    if not isinstance(token, str) or not token.strip() or token != "".join(token.split()):
        raise InvalidInputError(f"token must be one word without spaces, e.g. '<doctor>'; got {token!r}")
    if any(token in tok.get_vocab() for tok, _ in encoders(pipe)):
        raise InvalidInputError(f"token {token!r} is a word of the model's vocabulary; choose a new one, e.g. '<{token}>'")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise InvalidInputError(f"the embedding file must end in .safetensors, got {path}")
    widths = [enc.get_input_embeddings().weight.shape[1] for _, enc in encoders(pipe)]
    parts = [p[None].contiguous() for p in torch.split(dec.vector(pipe, n_tokens).detach().float().cpu(), widths)]
    tensors = {token: parts[0]} if len(parts) == 1 else dict(zip(SDXL_KEYS, parts))
    meta = {"token": token, "prompt": dec.template.format(token), "concept": dec.concept, "model": dec.model,
            "vocab_size": str(pipe.tokenizer.vocab_size), "widths": json.dumps(widths), "format": "pt"}
    write_files(path.parent, {path.name: st_save(tensors, metadata=meta)}, overwrite=overwrite)
    return path


def load_embedding(pipe, path, token: str | None = None) -> str:
    """Load a file :func:`export_embedding` wrote into ``pipe`` with diffusers' ``load_textual_inversion`` (both
    encoders for SDXL) and return the prompt to use. Refuses, before changing ``pipe``, a file of another
    vocabulary size or width. SDXL: a second encoder with the legacy ``eos_token_id = 2`` in its config (the
    official base's) pools at the highest token id, i.e. the added token; it gets its tokenizer's EOS id, as
    transformers' fix does (the same pooling for every prompt without an added token)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"embedding file {path} does not exist")
    try:
        with safe_open(str(path), "pt") as f:
            meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:
        raise InvalidInputError(f"{path} is not a safetensors file ({type(err).__name__}: {err})") from err
    pairs = encoders(pipe)
    rows = [tensors[k] for k in SDXL_KEYS] if set(tensors) == set(SDXL_KEYS) else list(tensors.values())
    widths = [enc.get_input_embeddings().weight.shape[1] for _, enc in pairs]
    if [r.shape[-1] for r in rows] != widths:
        raise InvalidInputError(f"{path} holds embeddings of width {' + '.join(str(r.shape[-1]) for r in rows)}, this "
                                f"model's text encoders take {' + '.join(map(str, widths))}: another model's")
    if "vocab_size" in meta and int(meta["vocab_size"]) != pipe.tokenizer.vocab_size:
        raise InvalidInputError(f"{path} was exported from a model whose vocabulary has {meta['vocab_size']} tokens, "
                                f"this one has {pipe.tokenizer.vocab_size}: another model's")
    token = token or meta.get("token") or next(iter(tensors))
    for (tok, enc), row in zip(pairs, rows):
        with quiet_loading():
            pipe.load_textual_inversion(row, token=token, text_encoder=enc, tokenizer=tok)
        if getattr(getattr(enc, "text_model", None), "eos_token_id", None) == 2:
            enc.text_model.eos_token_id = tok.eos_token_id
    return meta["prompt"].replace(meta["token"], token) if "prompt" in meta else token


@dataclass
class Comparison:
    """Two decompositions' top tokens, each coefficient as a share of its side's top-``k`` mass (coefficients have
    no common scale: the fit rescales w*), ``b - a``, and whether that exceeds twice the combined spread of
    the fits (``spread``, only when both sides have error bars; else None: no error bars)."""

    kind = "comparison"
    label_a: str
    label_b: str
    tokens: list[str]
    token_ids: list[int]
    a: list[float]
    b: list[float]
    spread_a: list            # per token, the share's spread across fits; None: no error bars
    spread_b: list
    rank_a: list              # 1-based rank in the side's dictionary; None: not in it (coefficient 0)
    rank_b: list
    note: str = ""

    def to_frame(self) -> pd.DataFrame:
        """One row per token, by ``diff`` (= b - a), largest first; ``error`` = 2 sqrt(sa^2 + sb^2)."""
        f = pd.DataFrame({"token": self.tokens, "token_id": self.token_ids, "a": self.a, "b": self.b,
                          "rank_a": pd.array(self.rank_a, dtype="Int64"), "rank_b": pd.array(self.rank_b, dtype="Int64")})
        f["diff"] = f["b"] - f["a"]
        sa, sb = (np.array([np.nan if s is None else s for s in x], dtype=float) for x in (self.spread_a, self.spread_b))
        f["error"] = 2 * np.sqrt(sa ** 2 + sb ** 2)
        f["exceeds_spread"] = [None if math.isnan(e) else bool(abs(d) > e) for d, e in zip(f["diff"], f["error"])]
        f.attrs.update(a=self.label_a, b=self.label_b)
        return f.sort_values("diff", ascending=False, kind="stable").reset_index(drop=True)

    def plot(self, ax=None):
        """Diverging bars of b - a per token (error bars where both sides have them; faint: within the spread)."""
        f = self.to_frame()
        ax = axes(ax, (6, 0.3 * len(f) + 1.2))
        y = np.arange(len(f))[::-1]
        colors = ["C3" if d > 0 else "C0" for d in f["diff"]]
        alpha = [0.35 if s is False else 1.0 for s in f["exceeds_spread"]]
        for yi, d, c, al in zip(y, f["diff"], colors, alpha):
            ax.barh(yi, d, color=c, alpha=al)
        if f["error"].notna().any():
            ax.errorbar(f["diff"], y, xerr=f["error"].fillna(0) / 2, fmt="none", ecolor="k", lw=1, capsize=2)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(y, f["token"])
        ax.set(xlabel=f"share in {self.label_b} - share in {self.label_a}",
               title=f"{self.label_a} -> {self.label_b}" + ("" if f["error"].notna().any() else " (no error bars)"))
        return ax

    def save(self, folder, overwrite: bool = False):
        return save_result(self, folder, self.kind, overwrite)

    @classmethod
    def load(cls, folder):
        return load_result(cls, folder, cls.kind)


def _side(dec, k: int):
    """token id -> (rank, share of the top-k mass, its spread or None), and whether ``dec`` has error bars."""
    total = sum(dec.coefficients[:k]) or 1.0
    bars = len(dec.spread) == len(dec.tokens)
    return {i: (r, c / total, dec.spread[r - 1] / total if bars else None)
            for r, (i, c) in enumerate(zip(dec.token_ids, dec.coefficients), 1)}, bars


def compare(dec_a, dec_b, k: int | None = None, labels: tuple[str, str] | None = None) -> Comparison:
    """The union of the top ``k`` tokens (default: each side's ``n_tokens``) of two decompositions, matched by token
    id: each side's share, the difference and, where both have error bars, whether it exceeds them. A token
    outside a side's dictionary has 0 there (spread 0 if that side has error bars). Refuses two decompositions
    whose token ids read differently (two tokenizers: their coefficients weigh different words)."""
    for dec in (dec_a, dec_b):
        if not all(hasattr(dec, n) for n in ("tokens", "token_ids", "coefficients", "n_tokens", "spread")):
            raise InvalidInputError(f"compare takes two conceptor_nb.Decomposition, got {type(dec).__name__}")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise InvalidInputError(f"k must be a positive integer or None, got {k!r}")
    ka, kb = k or dec_a.n_tokens, k or dec_b.n_tokens
    text = {**dict(zip(dec_b.token_ids, dec_b.tokens)), **dict(zip(dec_a.token_ids, dec_a.tokens))}
    clash = [(i, text[i], u) for i, u in zip(dec_b.token_ids, dec_b.tokens) if text[i] != u]
    if clash:
        i, t, u = clash[0]
        raise InvalidInputError(f"the two decompositions come from different vocabularies: token id {i} is {t!r} in "
                                f"one and {u!r} in the other ({len(clash)} such ids); compare decompositions of "
                                "models that share a tokenizer")
    ids = list(dict.fromkeys(dec_a.token_ids[:ka] + dec_b.token_ids[:kb]))
    if labels is None:
        labels = next(((x, y) for x, y in ((dec_a.model, dec_b.model), (dec_a.concept, dec_b.concept))
                       if x and y and x != y), ("A", "B"))
    cols = []
    for side, bars in (_side(dec_a, ka), _side(dec_b, kb)):
        missing = (None, 0.0, 0.0 if bars else None)
        cols.append([[side.get(i, missing)[j] for i in ids] for j in range(3)])
    (ra, a, sa), (rb, b, sb) = cols
    common = set(dec_a.token_ids) & set(dec_b.token_ids)
    note = "" if common else "the two dictionaries share no token id: their vocabularies could not be checked"
    return Comparison(str(labels[0]), str(labels[1]), [text[i] for i in ids], ids, a, b, sa, sb, ra, rb, note)
