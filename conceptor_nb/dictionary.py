"""The dictionary: vocabulary tokens ranked by CLIP similarity to the concept's images."""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
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


def _template_ids(tokenizer, template: str, token_ids: torch.Tensor) -> torch.Tensor:
    """ids of ``template`` with each token in place of '{}': (len(token_ids), L)."""
    before, after = template.split("{}")
    pre = tokenizer(before.strip(), add_special_tokens=False).input_ids if before.strip() else []
    post = tokenizer(after.strip(), add_special_tokens=False).input_ids if after.strip() else []
    n = len(token_ids)
    cols = [torch.full((n, 1), tokenizer.bos_token_id)]
    cols += [torch.full((n, 1), t) for t in pre] + [token_ids[:, None]] + [torch.full((n, 1), t) for t in post]
    cols.append(torch.full((n, 1), tokenizer.eos_token_id))
    return torch.cat(cols, dim=1)


def vocab_text_features(clip, templates=("a photo of a {}",), *, cache_dir=None, verbose: bool = True) -> torch.Tensor:
    """CLIP text embedding of every vocabulary token, averaged over ``templates``.

    Returns (V, D), L2-normalised, rows of special tokens zero. Computed once per
    CLIP model and template list, cached as safetensors.
    """
    tok = clip.tokenizer
    key = dict(clip=clip.name, weights=clip_fingerprint(clip), templates=list(templates), vocab=len(tok))
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    file = None
    if cache_dir is not False:
        file = _writable(Path(cache_dir or default_cache_dir()) / "vocab") / f"{digest}.safetensors"
        if file.exists():
            try:
                return load_verified(file)[0]["features"]
            except (CacheError, KeyError) as err:
                warnings.warn(f"ignoring a bad vocabulary-cache entry ({err}); computing it again", stacklevel=2)
    ids = word_token_ids(tok)
    total = None
    for template in tqdm(templates, desc="embedding the vocabulary", disable=not verbose, leave=False):
        f = clip.text_features_ids(_template_ids(tok, template, ids)).cpu()
        total = f if total is None else total + f
    feats = torch.zeros(len(tok), total.shape[1])
    feats[ids] = torch.nn.functional.normalize(total, dim=-1)
    if file is not None:
        save_verified(file, {"features": feats}, key)  # unique temp name + atomic rename, checksummed
    return feats


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
