"""The dictionary: vocabulary tokens ranked by CLIP similarity to the concept's images."""
from __future__ import annotations

import hashlib
import json
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import VOCAB_PRECISIONS
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


def _layer_weights(layer, dtype: torch.dtype) -> dict:
    """One encoder layer's matrices for the token positions, in ``dtype``: q, k, v as one matrix (one product
    instead of three). In float32 the weights are the layer's own and the activation its own; in bf16,
    CLIP's quick_gelu(x) = x sigmoid(1.702 x) is computed as silu(1.702 x) / 1.702, with 1.702 folded into
    the first MLP matrix and 1 / 1.702 into the second (one fused elementwise pass instead of three)."""
    att, mlp = layer.self_attn, layer.mlp
    w = dict(qkv=torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]),
             qkv_b=torch.cat([att.q_proj.bias, att.k_proj.bias, att.v_proj.bias]),
             out=att.out_proj.weight, out_b=att.out_proj.bias, fc1=mlp.fc1.weight, fc1_b=mlp.fc1.bias,
             fc2=mlp.fc2.weight, fc2_b=mlp.fc2.bias)
    act = mlp.activation_fn
    if dtype != w["fc1"].dtype and type(act).__name__ == "QuickGELUActivation":
        w["fc1"], w["fc1_b"], w["fc2"] = w["fc1"] * 1.702, w["fc1_b"] * 1.702, w["fc2"] / 1.702
        act = F.silu
    w = {k: v.to(dtype) for k, v in w.items()}
    w["act"] = act
    return w


@torch.no_grad()
def layer_weights(model, dtype: torch.dtype) -> list[dict]:
    """:func:`_layer_weights` of every layer of ``model``'s text encoder (the copies cost about a second)."""
    return [_layer_weights(layer, dtype) for layer in model.text_model.encoder.layers]


@contextmanager
def _one_cpu_thread(device):
    """One intra-op thread on a CPU: the prefix's products have a handful of rows, and with several
    threads their synchronisation costs more than the products (0.3-0.8 s against 0.04 s per template on a
    busy 2-core machine)."""
    if torch.device(device).type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@torch.no_grad()
def prefix_keys_values(model, prefix: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's attention keys and values (1, heads, P, head width) of the prefix ``prefix`` (BOS and
    the template's words before the token): the same for every prompt of the template (causal attention)."""
    tm = model.text_model
    pre_ids = torch.tensor(prefix, device=tm.embeddings.token_embedding.weight.device)[None]
    p = pre_ids.shape[1]
    h_pre = tm.embeddings.token_embedding(pre_ids) + tm.embeddings.position_embedding.weight[:p]
    out = []
    for layer in tm.encoder.layers:
        att = layer.self_attn
        heads = att.num_heads
        x_pre = layer.layer_norm1(h_pre)
        k_pre, v_pre = _heads(att.k_proj(x_pre), heads), _heads(att.v_proj(x_pre), heads)
        out.append((k_pre, v_pre))
        out_pre = F.scaled_dot_product_attention(_heads(att.q_proj(x_pre), heads), k_pre, v_pre, is_causal=True)
        h_pre = h_pre + att.out_proj(out_pre.transpose(1, 2).reshape(1, p, -1))
        h_pre = h_pre + layer.mlp(layer.layer_norm2(h_pre))
    return out


def _block_diagonal(x: torch.Tensor) -> torch.Tensor:
    """(heads, P, hd) -> (heads * hd, heads * P): head h's (hd, P) transposed block on the diagonal."""
    heads, p, hd = x.shape
    out = x.new_zeros(heads * hd, heads * p)
    for j in range(heads):
        out[j * hd : (j + 1) * hd, j * p : (j + 1) * p] = x[j].T
    return out


def _prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pre: torch.Tensor, v_pre: torch.Tensor,
                      *, causal: bool) -> torch.Tensor:
    """Multi-head attention of the prompts' own positions against the shared prefix and themselves.

    ``q`` (n, Sq, D): queries of the last Sq of the S own positions; ``k``, ``v`` (n, S, D): the own positions'
    keys and values; ``k_pre``, ``v_pre`` (1, heads, P, hd): the prefix's, the same for every prompt. With
    ``causal``, own query i sees own keys <= i (Sq == S); otherwise every key. Returns (n, Sq, D).

    The same function as ``scaled_dot_product_attention`` on the keys concatenated with the prefix's, but the
    prefix part runs as two dense products against block-diagonal matrices made from the P prefix keys and
    values (one row of scores per query and head, no copy of the prefix per prompt). A fused attention call
    over thousands of prompts x heads with 2 queries and ~7 keys is dominated by per-problem overhead: on a
    2-core CPU it cost as much as all the layers' matrix products together.
    """
    n, sq, d = q.shape
    s = k.shape[1]
    heads, p, hd = k_pre.shape[1], k_pre.shape[2], k_pre.shape[3]
    dt = q.dtype
    scale = hd ** -0.5
    k_bd = _block_diagonal(k_pre[0].to(dt))                      # (D, heads*P)
    v_bd = _block_diagonal(v_pre[0].transpose(1, 2).to(dt))      # (heads*P, D)
    q2 = q.reshape(n * sq, d)
    s_pre = (q2 @ k_bd).view(n, sq, heads, p).float()
    qh, kh = q.reshape(n, sq, heads, hd), k.reshape(n, s, heads, hd)
    s_own = torch.einsum("nqhd,nkhd->nqhk", qh, kh).float()      # (n, Sq, heads, S)
    if causal:
        allowed = torch.tril(torch.ones(sq, s, dtype=torch.bool, device=q.device), diagonal=s - sq)
        s_own = s_own.masked_fill(~allowed[None, :, None, :], float("-inf"))
    probs = torch.softmax(torch.cat([s_pre, s_own], dim=-1) * scale, dim=-1).to(dt)
    out = probs[..., :p].reshape(n * sq, heads * p) @ v_bd
    own = torch.einsum("nqhk,nkhd->nqhd", probs[..., p:], v.reshape(n, s, heads, hd))
    return out.view(n, sq, d) + own.reshape(n, sq, d)


@torch.no_grad()
def prefix_cached_text_features(model, prefix: list[int], suffixes: torch.Tensor, *, eos_only_last: bool = True,
                                compute_dtype: torch.dtype | None = None, weights: list[dict] | None = None,
                                prefix_kv: list | None = None) -> torch.Tensor:
    """CLIP text features (projected, not normalised) of the prompts ``prefix + suffixes[i]``.

    CLIP's text transformer is causal, so the prefix's hidden states (BOS and the template's words before
    the token) are the same for every token: they are computed once, and each prompt only runs its own
    positions (the token and the EOS) against the cached prefix keys and values. The same numbers as the
    full forward pass, for a fraction of the work ("a photo of a {}": 2 positions of 7). The pooled
    output is the last position's (the EOS), as in CLIP.

    ``eos_only_last``: in the last layer only the EOS position's output is read, so the other positions
    (prefix and token) compute only their keys and values there: no query, attention output or MLP
    (exact: the same numbers; ``False`` runs the whole last layer, as before).

    ``compute_dtype`` (e.g. ``torch.bfloat16``): the token positions' matrix products and attention run in
    it; the residual stream, layer norms, the prefix and the projection stay in the weights' dtype.
    ``weights``: :func:`layer_weights` of the model in ``compute_dtype``, made once for many calls;
    ``prefix_kv``: :func:`prefix_keys_values` of ``prefix``, made once per template.
    """
    tm = model.text_model
    device = tm.embeddings.token_embedding.weight.device
    dtype = tm.embeddings.token_embedding.weight.dtype
    cdt = compute_dtype or dtype
    suf_ids = suffixes.to(device)
    p, s = len(prefix), suf_ids.shape[1]
    pos = tm.embeddings.position_embedding.weight
    prefix_kv = prefix_kv if prefix_kv is not None else prefix_keys_values(model, prefix)
    h = tm.embeddings.token_embedding(suf_ids) + pos[p : p + s]
    layers = list(tm.encoder.layers)
    weights = weights if weights is not None else layer_weights(model, cdt)
    for i, layer in enumerate(layers):
        d = h.shape[-1]
        w = weights[i]
        last = eos_only_last and i == len(layers) - 1
        x = layer.layer_norm1(h).to(cdt)
        if last:  # keys and values of every position, the query of the EOS only (it sees every position)
            kv = F.linear(x, w["qkv"][d:], w["qkv_b"][d:])
            q = F.linear(x[:, -1], w["qkv"][:d], w["qkv_b"][:d])[:, None]  # (2-D: 3-D strided input takes bmm)
        else:
            qkv = F.linear(x, w["qkv"], w["qkv_b"])
            q, kv = qkv[..., :d], qkv[..., d:]
        out = _prefix_attention(q, kv[..., :d], kv[..., d:], *prefix_kv[i], causal=not last)
        if last:
            h = h[:, -1:]
        h = h + F.linear(out, w["out"], w["out_b"])
        a = w["act"](F.linear(layer.layer_norm2(h).to(cdt), w["fc1"], w["fc1_b"]))
        h = h + F.linear(a, w["fc2"], w["fc2_b"])
        if last:
            break
    pooled = tm.final_layer_norm(h[:, -1])
    return model.text_projection(pooled.to(dtype))


def _can_prefix_cache(model) -> bool:
    tm = getattr(model, "text_model", None)
    if tm is None or not hasattr(model, "text_projection"):
        return False
    layers = getattr(getattr(tm, "encoder", None), "layers", None)
    return bool(layers) and all(hasattr(layer.self_attn, n) for layer in layers for n in ("q_proj", "k_proj", "v_proj", "out_proj", "num_heads"))


def vocab_autocast_dtype(device, precision: str | None, weight_dtype: torch.dtype = torch.float32) -> torch.dtype | None:
    """The dtype the vocabulary embedding computes CLIP's text encoder in, or None (the weights' dtype).

    ``precision``: ``"fp32"`` (the weights' own dtype), ``"bf16"`` (the token positions' matrix products
    and attention in bf16; layer norms, the residual stream, the template's prefix and the projection in
    float32; a CLIP that cannot be prefix-cached runs under bf16 autocast), or ``"auto"`` (bf16 where the
    device computes it natively: a CUDA GPU with bf16, or a CPU with AVX512-BF16/AMX; float32 weights only).
    """
    from .conceptor import fit_autocast_dtype  # (conceptor imports this module)

    precision = "fp32" if precision in (None, "", "off") else precision
    if precision not in VOCAB_PRECISIONS:
        raise ValueError(f"vocabulary precision must be one of {VOCAB_PRECISIONS}, got {precision!r}")
    return fit_autocast_dtype(device, "off" if precision == "fp32" else precision, weight_dtype)


def _compute_label(clip, precision) -> str:
    """What the vocabulary embedding computes in: "float32", or e.g. "bfloat16-mixed" (the cache key's)."""
    w = next(clip.model.parameters()).dtype
    amp = vocab_autocast_dtype(clip.device, precision, w)
    return str(w).replace("torch.", "") if amp is None else str(amp).replace("torch.", "") + "-mixed"


def default_vocab_batch(device, dtype: torch.dtype) -> int:
    """Prompts per pass of the vocabulary embedding: 8192 on a GPU; on a CPU small enough for a pass's
    activations to stay in cache (measured on a 2-core Xeon, 4 MiB L2, 8192 tokens of ViT-B/32: bf16
    2.4 / 1.7 / 1.8 s at 8192 / 2048 / 1024 prompts, fp32 6.9 / 5.9 / 5.3 s)."""
    if torch.device(device).type != "cpu":
        return 8192
    return 1024 if dtype == torch.float32 else 2048


def template_features(clip, template: str, token_ids: torch.Tensor, batch_size: int | None = None, *,
                      precision: str | None = "fp32", eos_only_last: bool = True, weights=None) -> torch.Tensor:
    """L2-normalised CLIP text features of ``template`` with each token in it: (len(token_ids), D).
    ``precision``: see :func:`vocab_autocast_dtype`; ``weights``: :func:`layer_weights` in that precision
    (made here when not given)."""
    from .conceptor import autocast_to

    tok = clip.tokenizer
    w = next(clip.model.parameters())
    amp = vocab_autocast_dtype(w.device, precision, w.dtype)
    if not _can_prefix_cache(clip.model):
        with autocast_to(w.device, amp):
            return clip.text_features_ids(_template_ids(tok, template, token_ids)).float()
    pre, post = _template_parts(tok, template)
    weights = weights if weights is not None else layer_weights(clip.model, amp or w.dtype)
    with _one_cpu_thread(w.device):
        prefix_kv = [(k.to(amp or w.dtype), v.to(amp or w.dtype)) for k, v in prefix_keys_values(clip.model, pre)]
    suffixes = torch.cat([token_ids[:, None], torch.tensor(post).expand(len(token_ids), -1)], dim=1)
    batch_size = batch_size or default_vocab_batch(w.device, amp or w.dtype)
    out = []
    n_batches = max(1, -(-len(suffixes) // batch_size))
    batch_size = max(1, -(-len(suffixes) // n_batches))  # even batches: no small last one (its fixed costs)
    for i in range(0, len(suffixes), batch_size):
        f = prefix_cached_text_features(clip.model, pre, suffixes[i : i + batch_size], eos_only_last=eos_only_last,
                                        compute_dtype=amp, weights=weights, prefix_kv=prefix_kv)
        out.append(F.normalize(f.float(), dim=-1).cpu())
    return torch.cat(out)


def vocab_text_features(clip, templates=("a photo of a {}",), *, precision: str | None = "fp32", cache_dir=None,
                        verbose: bool = True) -> torch.Tensor:
    """CLIP text embedding of every vocabulary token, averaged over ``templates``.

    Returns (V, D), L2-normalised, rows of special tokens zero. Computed once per
    CLIP model, template list and precision (``"fp32"``, ``"bf16"``, ``"auto"``: see
    :func:`vocab_autocast_dtype`), with :func:`prefix_cached_text_features` (each
    template's words before the token are encoded once), cached as safetensors.
    """
    tok = clip.tokenizer
    file, key = None, None
    if cache_dir is not False:
        file, key = vocab_cache_entry(clip, templates, cache_dir, precision=precision)
        if file.exists():
            try:
                return load_verified(file)[0]["features"]
            except (CacheError, KeyError) as err:
                warnings.warn(f"ignoring a bad vocabulary-cache entry ({err}); computing it again", stacklevel=2)
    ids = word_token_ids(tok)
    total, weights = None, None
    if _can_prefix_cache(clip.model):
        w = next(clip.model.parameters())
        weights = layer_weights(clip.model, vocab_autocast_dtype(w.device, precision, w.dtype) or w.dtype)
    for template in tqdm(templates, desc="embedding the vocabulary", disable=not verbose, leave=False):
        f = template_features(clip, template, ids, precision=precision, weights=weights)
        total = f if total is None else total + f
    feats = torch.zeros(len(tok), total.shape[1])
    feats[ids] = F.normalize(total, dim=-1)
    if file is not None:
        save_verified(file, {"features": feats}, key)  # unique temp name + atomic rename, checksummed
    return feats


def vocab_cache_entry(clip, templates, cache_dir=None, *, precision: str | None = "fp32") -> tuple[Path, dict]:
    """The cache file of ``vocab_text_features(clip, templates, precision=precision)`` and its key (the
    CLIP's name and weights fingerprint, the templates, the vocabulary size, and the precision it computes
    in: "float32" or "bfloat16-mixed", so that entries of different precisions never mix)."""
    key = dict(clip=clip.name, weights=clip_fingerprint(clip), templates=list(templates), vocab=len(clip.tokenizer),
               precision=_compute_label(clip, precision))
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
                     templates=("a photo of a {}",), precision: str | None = "fp32", exclude_concept: bool = True,
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

    ``precision`` (``"fp32"``, ``"bf16"``, ``"auto"``): of the vocabulary embedding, when it is computed here
    (see :func:`vocab_text_features`).
    """
    tok = clip.tokenizer
    vocab_size = len(word_token_ids(tok))
    if not isinstance(size, int) or size <= 0 or size > vocab_size:
        raise ValueError(f"dictionary size must be between 1 and the vocabulary's {vocab_size} words, got {size!r}")
    if vocab_features is None:
        vocab_features = vocab_text_features(clip, templates, precision=precision, cache_dir=cache_dir, verbose=verbose)
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
