"""The dictionary: vocabulary tokens ranked by CLIP similarity to the concept's images."""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import cache_dir as default_cache_dir
from .errors import CacheError
from .checks import concept_word  # noqa: F401  (the one concept parser lives in checks)
from .images import _writable, clip_fingerprint
from .results import load_verified, save_verified


def token_text(tokenizer, token_id: int) -> str:
    """The readable form of one vocabulary token ("obama</w>" -> "obama")."""
    text = tokenizer.decode([int(token_id)]).strip()
    if "\ufffd" in text or not text:  # a byte-level piece of a longer character: show the BPE token
        text = tokenizer.convert_ids_to_tokens(int(token_id)).replace("</w>", "")
    return text


def word_token_ids(tokenizer) -> torch.Tensor:
    """Every vocabulary id but the special tokens."""
    special = set(tokenizer.all_special_ids)
    return torch.tensor([i for i in range(len(tokenizer)) if i not in special])


def _template_parts(tokenizer, template: str) -> tuple[list[int], list[int]]:
    """(ids before the token, with BOS; ids after it, with EOS) of ``template``."""
    if template.count("{}") != 1:
        raise ValueError(f"CLIP template {template!r} must contain '{{}}' exactly once")
    before, after = template.split("{}")
    pre = tokenizer(before.strip(), add_special_tokens=False).input_ids if before.strip() else []
    post = tokenizer(after.strip(), add_special_tokens=False).input_ids if after.strip() else []
    return [tokenizer.bos_token_id] + pre, post + [tokenizer.eos_token_id]


def _template_ids(tokenizer, template: str, token_ids: torch.Tensor) -> torch.Tensor:
    """ids of ``template`` with each token in place of '{}': (len(token_ids), L), at the prompt's own
    length L (not padded to the context length: every token is one id, so all rows have one length)."""
    pre, post = _template_parts(tokenizer, template)
    n = len(token_ids)
    return torch.cat([torch.tensor(pre).expand(n, -1), token_ids[:, None], torch.tensor(post).expand(n, -1)], dim=1)


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    b, s, w = x.shape
    return x.view(b, s, n_heads, w // n_heads).transpose(1, 2)


@torch.no_grad()
def prefix_cached_text_features(model, prefix: list[int], suffixes: torch.Tensor) -> torch.Tensor:
    """CLIP text features (projected, not normalised) of the prompts ``prefix + suffixes[i]``.

    CLIP's text transformer is causal, so the prefix's hidden states (BOS and the template's words before
    the token) are the same for every token: they are computed once, and each prompt only runs its own
    positions (the token and the EOS) against the cached prefix keys and values. The same numbers as the
    full forward pass, for a fraction of the work ("a photo of a {}": 2 positions of 7). The pooled
    output is the last position's (the EOS), as in CLIP.
    """
    tm = model.text_model
    device = tm.embeddings.token_embedding.weight.device
    dtype = tm.embeddings.token_embedding.weight.dtype
    pre_ids = torch.tensor(prefix, device=device)[None]
    suf_ids = suffixes.to(device)
    n, p, s = len(suf_ids), pre_ids.shape[1], suf_ids.shape[1]
    pos = tm.embeddings.position_embedding.weight
    h_pre = tm.embeddings.token_embedding(pre_ids) + pos[:p]
    h = tm.embeddings.token_embedding(suf_ids) + pos[p : p + s]
    # suffix position i sees the whole prefix and suffix positions <= i
    mask = torch.ones(s, p + s, dtype=torch.bool, device=device)
    mask[:, p:] = torch.tril(torch.ones(s, s, dtype=torch.bool, device=device))
    for layer in tm.encoder.layers:
        att = layer.self_attn
        heads = att.num_heads
        x_pre, x = layer.layer_norm1(h_pre), layer.layer_norm1(h)
        k_pre, v_pre = _heads(att.k_proj(x_pre), heads), _heads(att.v_proj(x_pre), heads)
        out_pre = F.scaled_dot_product_attention(_heads(att.q_proj(x_pre), heads), k_pre, v_pre, is_causal=True)
        k = torch.cat([k_pre.expand(n, -1, -1, -1), _heads(att.k_proj(x), heads)], dim=2)
        v = torch.cat([v_pre.expand(n, -1, -1, -1), _heads(att.v_proj(x), heads)], dim=2)
        out = F.scaled_dot_product_attention(_heads(att.q_proj(x), heads), k, v, attn_mask=mask)
        h_pre = h_pre + att.out_proj(out_pre.transpose(1, 2).reshape(1, p, -1))
        h = h + att.out_proj(out.transpose(1, 2).reshape(n, s, -1))
        h_pre = h_pre + layer.mlp(layer.layer_norm2(h_pre))
        h = h + layer.mlp(layer.layer_norm2(h))
    pooled = tm.final_layer_norm(h[:, -1])
    return model.text_projection(pooled.to(dtype))


def _can_prefix_cache(model) -> bool:
    tm = getattr(model, "text_model", None)
    if tm is None or not hasattr(model, "text_projection"):
        return False
    layers = getattr(getattr(tm, "encoder", None), "layers", None)
    return bool(layers) and all(hasattr(layer.self_attn, n) for layer in layers for n in ("q_proj", "k_proj", "v_proj", "out_proj", "num_heads"))


def template_features(clip, template: str, token_ids: torch.Tensor, batch_size: int = 8192) -> torch.Tensor:
    """L2-normalised CLIP text features of ``template`` with each token in it: (len(token_ids), D)."""
    tok = clip.tokenizer
    if not _can_prefix_cache(clip.model):
        return clip.text_features_ids(_template_ids(tok, template, token_ids))
    pre, post = _template_parts(tok, template)
    suffixes = torch.cat([token_ids[:, None], torch.tensor(post).expand(len(token_ids), -1)], dim=1)
    out = []
    for i in range(0, len(suffixes), batch_size):
        out.append(F.normalize(prefix_cached_text_features(clip.model, pre, suffixes[i : i + batch_size]).float(), dim=-1).cpu())
    return torch.cat(out)


def vocab_text_features(clip, templates=("a photo of a {}",), *, cache_dir=None, verbose: bool = True) -> torch.Tensor:
    """CLIP text embedding of every vocabulary token, averaged over ``templates``.

    Returns (V, D), L2-normalised, rows of special tokens zero. Computed once per
    CLIP model and template list (with :func:`prefix_cached_text_features`: each
    template's words before the token are encoded once), cached as safetensors.
    """
    tok = clip.tokenizer
    file, key = None, None
    if cache_dir is not False:
        file, key = vocab_cache_entry(clip, templates, cache_dir)
        if file.exists():
            try:
                return load_verified(file)[0]["features"]
            except (CacheError, KeyError) as err:
                warnings.warn(f"ignoring a bad vocabulary-cache entry ({err}); computing it again", stacklevel=2)
    ids = word_token_ids(tok)
    total = None
    for template in tqdm(templates, desc="embedding the vocabulary", disable=not verbose, leave=False):
        f = template_features(clip, template, ids)
        total = f if total is None else total + f
    feats = torch.zeros(len(tok), total.shape[1])
    feats[ids] = F.normalize(total, dim=-1)
    if file is not None:
        save_verified(file, {"features": feats}, key)  # unique temp name + atomic rename, checksummed
    return feats


def vocab_cache_entry(clip, templates, cache_dir=None) -> tuple[Path, dict]:
    """The cache file of ``vocab_text_features(clip, templates)`` and its key (the CLIP's name and weights
    fingerprint, the templates, the vocabulary size)."""
    key = dict(clip=clip.name, weights=clip_fingerprint(clip), templates=list(templates), vocab=len(clip.tokenizer))
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return _writable(Path(cache_dir or default_cache_dir()) / "vocab") / f"{digest}.safetensors", key


@dataclass
class Dictionary:
    token_ids: list[int]
    tokens: list[str]
    scores: list[float]          # CLIP cosine to the mean concept-image embedding
    excluded: list[str]          # concept tokens taken out

    def __len__(self) -> int:
        return len(self.token_ids)


def build_dictionary(clip, images: torch.Tensor, concept: str, size: int, *, vocab_features=None,
                     templates=("a photo of a {}",), exclude_concept: bool = True,
                     exclude_threshold: float | None = 0.9, null_threshold: float | None = None, cache_dir=None,
                     verbose: bool = True) -> Dictionary:
    """The ``size`` tokens whose CLIP text embedding is closest to the mean image embedding.

    With ``exclude_concept``, the concept's own tokens are removed: its exact
    tokens, and (``exclude_threshold``) tokens whose text embedding has cosine
    above the threshold with the concept word's.

    ``null_threshold`` (not in the authors' method; off by default) also drops
    tokens that CLIP cannot tell from no word at all: cosine above the threshold
    between "a photo of a <token>" and "a photo of a" (templates averaged). The
    toy world's CLIP was trained to read unknown tokens that way, so there this
    removes the meaningless tokens that would otherwise crowd the dictionary.
    """
    tok = clip.tokenizer
    vocab_size = len(word_token_ids(tok))
    if not isinstance(size, int) or size <= 0 or size > vocab_size:
        raise ValueError(f"dictionary size must be between 1 and the vocabulary's {vocab_size} words, got {size!r}")
    if vocab_features is None:
        vocab_features = vocab_text_features(clip, templates, cache_dir=cache_dir, verbose=verbose)
    target = torch.nn.functional.normalize(clip.image_features(images).mean(0), dim=0).cpu()
    sims = vocab_features @ target
    valid = vocab_features.norm(dim=-1) > 0
    excluded = []
    if exclude_concept:
        word = concept_word(concept)
        own = concept_token_ids(tok, word)
        valid[own] = False
        if exclude_threshold is not None:
            word_feat = torch.nn.functional.normalize(clip.text_features([t.format(word) for t in templates]).mean(0), dim=0).cpu()
            valid &= (vocab_features @ word_feat) <= exclude_threshold
        excluded = [token_text(tok, i) for i in torch.nonzero(~valid & (vocab_features.norm(dim=-1) > 0)).flatten().tolist()]
    if null_threshold is not None:
        null = torch.nn.functional.normalize(clip.text_features([t.format("").strip() for t in templates]).mean(0), dim=0).cpu()
        valid &= (vocab_features @ null) <= null_threshold
    if null_threshold is not None and 0 < int(valid.sum()) < size:
        size = int(valid.sum())  # the meaningful tokens are fewer than asked: take them all
    if int(valid.sum()) < size or size == 0:
        raise ValueError(f"only {int(valid.sum())} tokens are left after excluding the concept"
                         f"{' and the null-like tokens' if null_threshold is not None else ''}, fewer than size={size}")
    sims = torch.where(valid, sims, torch.tensor(-float("inf")))
    top = torch.topk(sims, size)
    ids = top.indices.tolist()
    return Dictionary(ids, [token_text(tok, i) for i in ids], top.values.tolist(), excluded)


def concept_token_ids(tokenizer, word: str) -> list[int]:
    """The concept's tokens, and every token that reads the same ("dog</w>" and the word-piece "dog")."""
    ids = set(tokenizer(word, add_special_tokens=False).input_ids)
    vocab = tokenizer.get_vocab()
    for piece in word.lower().split():
        for form in (piece, piece + "</w>"):
            if form in vocab:
                ids.add(vocab[form])
    return sorted(ids)
