"""CLIP's text embedding of every vocabulary token in templates (the dictionary's candidates), and the bf16
autocast choice it shares with the fit. CLIP's text transformer is causal: a template's words before the token
are encoded once, and each prompt runs only its own positions (token, EOS) against them, exactly."""
from __future__ import annotations

import functools
import re
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..config import TEMPLATE
from ..errors import CacheError
from ..io import load_verified, save_verified
from .generate import cache_entry, clip_fingerprint


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """True when this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX-BF16; Linux only)."""
    try:
        return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", Path("/proc/cpuinfo").read_text()))
    except OSError:
        return False


def autocast_dtype(device, mode: str | None, weight_dtype: torch.dtype = torch.float32,
                   what: str = "autocast") -> torch.dtype | None:
    """The dtype to compute in, or None (the weights' own): ``mode`` "off" (or "fp32"), "bf16", or "auto" (bf16
    for float32 weights where the device computes it natively: a CUDA GPU with bf16, a CPU with AVX512-BF16/AMX)."""
    mode = "off" if mode in (None, "", "fp32") else mode
    if mode not in ("off", "bf16", "auto"):
        raise ValueError(f"{what} must be 'off' (or 'fp32'), 'bf16' or 'auto', got {mode!r}")
    dev = torch.device(device).type
    if mode == "bf16" and dev not in ("cpu", "cuda"):
        raise ValueError(f"bf16 autocast is supported on cpu and cuda, not on {dev}")
    if mode == "bf16":
        return torch.bfloat16
    native = mode == "auto" and weight_dtype == torch.float32 and (
        torch.cuda.is_bf16_supported() if dev == "cuda" else dev == "cpu" and cpu_has_native_bf16())
    return torch.bfloat16 if native else None


def word_token_ids(tokenizer) -> torch.Tensor:
    """Every vocabulary id but the special tokens."""
    special = set(tokenizer.all_special_ids)
    return torch.tensor([i for i in range(len(tokenizer)) if i not in special])


def _template_parts(tokenizer, template: str) -> tuple[list[int], list[int]]:
    """(ids before the token, with BOS; ids after it, with EOS) of ``template``."""
    if template.count("{}") != 1:
        raise ValueError(f"CLIP template {template!r} must contain '{{}}' exactly once")
    before, after = (tokenizer(part.strip(), add_special_tokens=False).input_ids if part.strip() else []
                     for part in template.split("{}"))
    return [tokenizer.bos_token_id] + before, after + [tokenizer.eos_token_id]


def _template_ids(tokenizer, template: str, token_ids: torch.Tensor) -> torch.Tensor:
    """(len(token_ids), L) ids of ``template`` with each token in it, unpadded."""
    pre, post = _template_parts(tokenizer, template)
    n = len(token_ids)
    return torch.cat([torch.tensor(pre).expand(n, -1), token_ids[:, None], torch.tensor(post).expand(n, -1)], dim=1)


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    b, s, w = x.shape
    return x.view(b, s, n_heads, w // n_heads).transpose(1, 2)


def _layer_weights(layer, dtype: torch.dtype) -> dict:
    """One layer's matrices in ``dtype``, q, k and v as one; in bf16 quick_gelu(x) = x sigmoid(1.702 x) runs as
    silu(1.702 x) / 1.702, the factors folded into the MLP's matrices (one fused pass instead of three)."""
    att, mlp = layer.self_attn, layer.mlp
    w = dict(qkv=torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]),
             qkv_b=torch.cat([att.q_proj.bias, att.k_proj.bias, att.v_proj.bias]),
             out=att.out_proj.weight, out_b=att.out_proj.bias, fc1=mlp.fc1.weight, fc1_b=mlp.fc1.bias,
             fc2=mlp.fc2.weight, fc2_b=mlp.fc2.bias)
    act = mlp.activation_fn
    if dtype != w["fc1"].dtype and type(act).__name__ == "QuickGELUActivation":
        w["fc1"], w["fc1_b"], w["fc2"] = w["fc1"] * 1.702, w["fc1_b"] * 1.702, w["fc2"] / 1.702
        act = F.silu
    return {**{k: v.to(dtype) for k, v in w.items()}, "act": act}


@torch.no_grad()
def layer_weights(model, dtype: torch.dtype) -> list[dict]:
    """:func:`_layer_weights` of every layer of ``model``'s text encoder (made once for many calls)."""
    return [_layer_weights(layer, dtype) for layer in model.text_model.encoder.layers]


@contextmanager
def _one_cpu_thread(device):
    """One intra-op thread on a CPU: the prefix's products are too small to pay for threads' synchronisation."""
    cpu, n = torch.device(device).type == "cpu", torch.get_num_threads()
    if cpu:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if cpu:
            torch.set_num_threads(n)


@torch.no_grad()
def prefix_keys_values(model, prefix: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's attention keys and values (1, heads, P, head width) of the ids ``prefix``."""
    tm = model.text_model
    h = tm.embeddings.token_embedding(torch.tensor(prefix, device=tm.embeddings.token_embedding.weight.device)[None])
    p = len(prefix)
    h = h + tm.embeddings.position_embedding.weight[:p]
    out = []
    for layer in tm.encoder.layers:
        att, heads = layer.self_attn, layer.self_attn.num_heads
        x = layer.layer_norm1(h)
        k, v = _heads(att.k_proj(x), heads), _heads(att.v_proj(x), heads)
        out.append((k, v))
        o = F.scaled_dot_product_attention(_heads(att.q_proj(x), heads), k, v, is_causal=True)
        h = h + att.out_proj(o.transpose(1, 2).reshape(1, p, -1))
        h = h + layer.mlp(layer.layer_norm2(h))
    return out


def _prefix_attention(q, k, v, k_pre, v_pre, *, causal: bool) -> torch.Tensor:
    """Attention (n, Sq, D) of the queries ``q`` (n, Sq, D; the last Sq of the S own positions) on the prefix's
    ``k_pre``, ``v_pre`` (1, heads, P, hd) and their own ``k``, ``v`` (n, S, D), causal or not. The prefix part
    is two dense products on block-diagonal matrices (a fused call over thousands of tiny problems is overhead)."""
    n, sq, d = q.shape
    s = k.shape[1]
    heads, p, hd = k_pre.shape[1], k_pre.shape[2], k_pre.shape[3]
    dt = q.dtype
    k_bd = torch.block_diag(*k_pre[0].to(dt).transpose(1, 2))  # (D, heads*P): head h's keys in block h
    v_bd = torch.block_diag(*v_pre[0].to(dt))                  # (heads*P, D)
    s_pre = (q.reshape(n * sq, d) @ k_bd).view(n, sq, heads, p).float()
    s_own = torch.einsum("nqhd,nkhd->nqhk", q.reshape(n, sq, heads, hd), k.reshape(n, s, heads, hd)).float()
    if causal:
        allowed = torch.tril(torch.ones(sq, s, dtype=torch.bool, device=q.device), diagonal=s - sq)
        s_own = s_own.masked_fill(~allowed[None, :, None, :], float("-inf"))
    probs = torch.softmax(torch.cat([s_pre, s_own], dim=-1) * hd ** -0.5, dim=-1).to(dt)
    out = probs[..., :p].reshape(n * sq, heads * p) @ v_bd
    own = torch.einsum("nqhk,nkhd->nqhd", probs[..., p:], v.reshape(n, s, heads, hd))
    return out.view(n, sq, d) + own.reshape(n, sq, d)


@torch.no_grad()
def prefix_cached_text_features(model, prefix: list[int], suffixes: torch.Tensor, *, eos_only_last: bool = True,
                                compute_dtype: torch.dtype | None = None, weights: list[dict] | None = None,
                                prefix_kv: list | None = None) -> torch.Tensor:
    """CLIP text features (projected, not normalised) of the prompts ``prefix + suffixes[i]``. ``eos_only_last``:
    the last layer runs only the EOS query (the pooled one; exact). ``compute_dtype``: of the token positions'
    products and attention (the rest in the weights' dtype). ``weights`` (:func:`layer_weights` in it) and
    ``prefix_kv`` (:func:`prefix_keys_values`) are made here when not given."""
    tm = model.text_model
    dtype = tm.embeddings.token_embedding.weight.dtype
    cdt = compute_dtype or dtype
    suf_ids = suffixes.to(tm.embeddings.token_embedding.weight.device)
    p, s = len(prefix), suf_ids.shape[1]
    prefix_kv = prefix_kv if prefix_kv is not None else prefix_keys_values(model, prefix)
    weights = weights if weights is not None else layer_weights(model, cdt)
    h = tm.embeddings.token_embedding(suf_ids) + tm.embeddings.position_embedding.weight[p : p + s]
    layers = list(tm.encoder.layers)
    for i, (layer, w) in enumerate(zip(layers, weights)):
        d = h.shape[-1]
        last = eos_only_last and i == len(layers) - 1
        x = layer.layer_norm1(h).to(cdt)
        if last:  # keys and values of every position, the query of the EOS only
            kv = F.linear(x, w["qkv"][d:], w["qkv_b"][d:])
            q = F.linear(x[:, -1], w["qkv"][:d], w["qkv_b"][:d])[:, None]  # (2-D: 3-D strided input takes bmm)
            h = h[:, -1:]
        else:
            qkv = F.linear(x, w["qkv"], w["qkv_b"])
            q, kv = qkv[..., :d], qkv[..., d:]
        out = _prefix_attention(q, kv[..., :d], kv[..., d:], *prefix_kv[i], causal=not last)
        h = h + F.linear(out, w["out"], w["out_b"])
        h = h + F.linear(w["act"](F.linear(layer.layer_norm2(h).to(cdt), w["fc1"], w["fc1_b"])), w["fc2"], w["fc2_b"])
        if last:
            break
    return model.text_projection(tm.final_layer_norm(h[:, -1]).to(dtype))


def _clip_amp(clip, precision) -> tuple[torch.Tensor, torch.dtype | None]:
    """(a weight of the CLIP, the dtype the vocabulary embedding computes in or None)."""
    w = next(clip.model.parameters())
    return w, autocast_dtype(w.device, precision, w.dtype, "vocabulary precision")


def template_features(clip, template: str, token_ids: torch.Tensor, batch_size: int | None = None, *,
                      precision: str | None = "fp32", eos_only_last: bool = True, weights=None) -> torch.Tensor:
    """L2-normalised CLIP text features (len(token_ids), D) of ``template`` with each token in it, computed in
    ``precision`` ("fp32", "bf16", "auto": :func:`autocast_dtype`); ``weights``: :func:`layer_weights` in it."""
    tok = clip.tokenizer
    w, amp = _clip_amp(clip, precision)
    pre = _template_parts(tok, template)[0]
    weights = weights if weights is not None else layer_weights(clip.model, amp or w.dtype)
    with _one_cpu_thread(w.device):
        prefix_kv = [(k.to(amp or w.dtype), v.to(amp or w.dtype)) for k, v in prefix_keys_values(clip.model, pre)]
    suffixes = _template_ids(tok, template, token_ids)[:, len(pre):]  # the token and the words after it
    if not batch_size:  # prompts per pass: on a CPU few enough to stay in cache (benchmarks/vocab_embedding.md)
        batch_size = 8192 if w.device.type != "cpu" else 1024 if (amp or w.dtype) == torch.float32 else 2048
    n_batches = max(1, -(-len(suffixes) // batch_size))
    batch_size = max(1, -(-len(suffixes) // n_batches))  # even batches: no small last one
    return torch.cat([F.normalize(prefix_cached_text_features(
        clip.model, pre, suffixes[i : i + batch_size], eos_only_last=eos_only_last, compute_dtype=amp,
        weights=weights, prefix_kv=prefix_kv).float(), dim=-1).cpu() for i in range(0, len(suffixes), batch_size)])


def vocab_cache_entry(clip, templates, cache_dir=None, *, precision: str | None = "fp32") -> tuple[Path, dict]:
    """The cache file of ``vocab_text_features(clip, templates, precision=precision)`` and its key (CLIP name and
    fingerprint, templates, vocabulary size, and "float32" or "bfloat16-mixed": precisions never share one)."""
    w, amp = _clip_amp(clip, precision)
    label = str(w.dtype if amp is None else amp).replace("torch.", "") + ("" if amp is None else "-mixed")
    key = dict(clip=clip.name, weights=clip_fingerprint(clip), templates=list(templates), vocab=len(clip.tokenizer),
               precision=label)
    folder, digest = cache_entry(cache_dir, "vocab", key)
    return folder / f"{digest}.safetensors", key


def vocab_text_features(clip, templates=(TEMPLATE,), *, precision: str | None = "fp32", cache_dir=None,
                        verbose: bool = True) -> torch.Tensor:
    """CLIP text embedding (V, D) of every vocabulary token, averaged over ``templates`` (or one template),
    L2-normalised, special tokens' rows zero; cached unless ``cache_dir=False``."""
    templates = (templates,) if isinstance(templates, str) else templates
    tok = clip.tokenizer
    file, key = vocab_cache_entry(clip, templates, cache_dir, precision=precision) if cache_dir is not False else (None, None)
    if file is not None and file.exists():
        try:
            return load_verified(file)[0]["features"]
        except (CacheError, KeyError) as err:
            warnings.warn(f"ignoring a bad vocabulary-cache entry ({err}); computing it again", stacklevel=2)
    ids = word_token_ids(tok)
    w, amp = _clip_amp(clip, precision)
    total, weights = None, layer_weights(clip.model, amp or w.dtype)
    for template in tqdm(templates, desc="embedding the vocabulary", disable=not verbose, leave=False):
        f = template_features(clip, template, ids, precision=precision, weights=weights)
        total = f if total is None else total + f
    feats = torch.zeros(len(tok), total.shape[1])
    feats[ids] = F.normalize(total, dim=-1)
    if file is not None:
        save_verified(file, {"features": feats}, key)
    return feats
