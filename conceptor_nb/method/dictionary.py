"""The dictionary: the vocabulary tokens whose CLIP text embedding is closest to the concept's images."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import TEMPLATE
from .vocab import vocab_text_features, word_token_ids


def clean_token(text: str) -> str:
    """A token as a plain lower-case word, for comparing tokens with words: "Dog</w> " -> "dog"."""
    return text.replace("</w>", "").strip().lower()


def token_text(tokenizer, token_id: int) -> str:
    """The readable form of one vocabulary token ("obama</w>" -> "obama"); a byte-level piece of a longer
    character stays its BPE token."""
    text = tokenizer.decode([int(token_id)]).strip()
    return tokenizer.convert_ids_to_tokens(int(token_id)).replace("</w>", "") if "\ufffd" in text or not text else text


def concept_token_ids(tokenizer, word: str) -> list[int]:
    """The concept's tokens, and every token that reads the same ("dog</w>" and the word-piece "dog")."""
    ids = set(tokenizer(word, add_special_tokens=False).input_ids)
    vocab = tokenizer.get_vocab()
    ids |= {vocab[form] for piece in word.lower().split() for form in (piece, piece + "</w>") if form in vocab}
    return sorted(ids)


@dataclass
class Dictionary:
    token_ids: list[int]
    tokens: list[str]
    scores: list[float]          # CLIP cosine to the mean concept-image embedding
    excluded: list[str]          # concept tokens taken out

    def __len__(self) -> int:
        return len(self.token_ids)


def candidates(clip, vocab_features: torch.Tensor, word: str, templates=(TEMPLATE,), *, exclude_concept: bool = True,
               exclude_threshold: float | None = 0.9, null_threshold: float | None = None):
    """(mask of the vocabulary tokens a dictionary may hold, the excluded concept tokens): ``exclude_concept``
    removes the tokens of ``word`` and (``exclude_threshold``) tokens whose text embedding has a cosine above it
    with the word's; ``null_threshold`` (not in the authors' method; the toy world's CLIP reads unknown tokens as no
    word) drops tokens whose "a photo of a <token>" has a cosine above it with "a photo of a"."""
    def mean_text(texts):
        return F.normalize(clip.text_features(texts).mean(0), dim=0).cpu()

    valid, excluded = vocab_features.norm(dim=-1) > 0, []
    if exclude_concept:
        valid[concept_token_ids(clip.tokenizer, word)] = False
        if exclude_threshold is not None:
            valid &= (vocab_features @ mean_text([t.format(word) for t in templates])) <= exclude_threshold
        excluded = [token_text(clip.tokenizer, i)
                    for i in torch.nonzero(~valid & (vocab_features.norm(dim=-1) > 0)).flatten().tolist()]
    if null_threshold is not None:
        valid &= (vocab_features @ mean_text([t.format("").strip() for t in templates])) <= null_threshold
    return valid, excluded


def build_dictionary(clip, images: torch.Tensor, word: str, size: int, *, vocab_features=None,
                     templates=(TEMPLATE,), precision: str | None = "fp32", exclude_concept: bool = True,
                     exclude_threshold: float | None = 0.9, null_threshold: float | None = None, cache_dir=None,
                     verbose: bool = True) -> Dictionary:
    """The ``size`` tokens whose CLIP text embedding (:func:`vocab_text_features` of ``templates`` in
    ``precision``) is closest to the mean embedding of ``images``, among the :func:`candidates` (with the null
    filter on, fewer when fewer are left)."""
    tok = clip.tokenizer
    vocab_size = len(word_token_ids(tok))
    if not isinstance(size, int) or size <= 0 or size > vocab_size:
        raise ValueError(f"dictionary size must be between 1 and the vocabulary's {vocab_size} words, got {size!r}")
    if vocab_features is None:
        vocab_features = vocab_text_features(clip, templates, precision=precision, cache_dir=cache_dir, verbose=verbose)
    valid, excluded = candidates(clip, vocab_features, word, templates, exclude_concept=exclude_concept,
                                 exclude_threshold=exclude_threshold, null_threshold=null_threshold)
    if null_threshold is not None and 0 < int(valid.sum()) < size:
        size = int(valid.sum())  # the meaningful tokens are fewer than asked: take them all
    if int(valid.sum()) < size:
        raise ValueError(f"only {int(valid.sum())} tokens are left after excluding the concept"
                         f"{' and the null-like tokens' if null_threshold is not None else ''}, fewer than size={size}")
    sims = vocab_features @ F.normalize(clip.image_features(images).mean(0), dim=0).cpu()
    top = torch.topk(torch.where(valid, sims, torch.tensor(-float("inf"))), size)
    ids = top.indices.tolist()
    return Dictionary(ids, [token_text(tok, i) for i in ids], top.values.tolist(), excluded)
