"""Semantic manipulation: edit one coefficient of a decomposition and render with the same seeds."""
from __future__ import annotations

import copy


def _token_id(tokenizer, token: str) -> int:
    ids = tokenizer(token, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(f"{token!r} is {len(ids)} tokens in this vocabulary; give a single-token word")
    return ids[0]


def set_coefficient(dec, token: str, value: float, *, tokenizer=None):
    """A copy of ``dec`` where ``token`` has coefficient ``value``.

    The explanation (the first ``n_tokens``) keeps its tokens; a token from
    outside it (the dictionary's tail, or a new word, which needs ``tokenizer``)
    joins it. ``value=0`` removes a token's contribution.
    """
    if value < 0:
        raise ValueError(f"coefficients are non-negative (alpha = |f(w)|), got {value}")
    token = token.strip().lower()
    new = copy.deepcopy(dec)
    n = new.n_tokens
    if token in new.tokens:
        i = new.tokens.index(token)
        tid, score = new.token_ids[i], (new.dictionary_scores[i] if new.dictionary_scores else float("nan"))
        for lst in (new.tokens, new.token_ids, new.coefficients) + ((new.dictionary_scores,) if new.dictionary_scores else ()):
            del lst[i]
        if i < n:
            n -= 1
    else:
        if tokenizer is None:
            raise ValueError(f"{token!r} is not in the decomposition's dictionary; pass tokenizer= to add it")
        tid, score = _token_id(tokenizer, token), float("nan")
    # insert at the end of the explanation, then order the explanation by coefficient
    new.tokens.insert(n, token)
    new.token_ids.insert(n, int(tid))
    new.coefficients.insert(n, float(value))
    if new.dictionary_scores:
        new.dictionary_scores.insert(n, score)
    n += 1
    order = sorted(range(n), key=lambda j: -new.coefficients[j])
    for name in ("tokens", "token_ids", "coefficients") + (("dictionary_scores",) if new.dictionary_scores else ()):
        lst = getattr(new, name)
        lst[:n] = [lst[j] for j in order]
    new.n_tokens = n
    new.history = {**new.history, "edits": new.history.get("edits", []) + [{"token": token, "value": float(value)}]}
    return new
