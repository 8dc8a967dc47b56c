"""Measure the toy world's models against the spec, with the pixel oracle as the judge.

* :func:`generated_share`: what the oracle sees in images generated for a prompt.
* :func:`word_accuracy`: for attribute and object words, the share of generated images
  that show what the prompt says.
* :func:`mixture_proportions`: for a hidden concept, generated component shares vs the spec.
* :func:`clip_constituent_ranks`: where the toy CLIP ranks a concept's constituents among
  all 49,408 vocabulary tokens (the dictionary filter Conceptor relies on).
* :func:`score_decomposition`: recall@k and Spearman rank correlation of a Conceptor
  decomposition against the concept's known constituents.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from .oracle import Oracle, Reading
from .spec import Spec, load_spec


# --------------------------------------------------------------------------- generation
def _set_scheduler(pipe, name: str):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    cls = {"dpm": DPMSolverMultistepScheduler, "ddim": DDIMScheduler}.get(name)
    if cls is None:
        raise ValueError(f"scheduler {name!r}: use 'dpm' or 'ddim'")
    return cls.from_config(pipe.scheduler.config)


@torch.no_grad()
def generate(pipe, prompt: str, n: int = 32, seed: int = 0, *, steps: int = 20, guidance: float = 4.0,
             scheduler: str = "dpm", batch_size: int = 16, size: int | None = None) -> torch.Tensor:
    """``n`` images (n, 3, H, W) in [0, 1] for ``prompt``; batch ``i`` uses seed ``seed + i``."""
    old = pipe.scheduler
    pipe.scheduler = _set_scheduler(pipe, scheduler)
    try:
        out = []
        for i, start in enumerate(range(0, n, batch_size)):
            b = min(batch_size, n - start)
            g = torch.Generator("cpu").manual_seed(seed + i)
            kw = {} if size is None else {"height": size, "width": size}
            res = pipe([prompt] * b, num_inference_steps=steps, guidance_scale=guidance, generator=g,
                       output_type="pt", **kw)
            out.append(res.images.float().cpu())
        return torch.cat(out).clamp(0, 1)
    finally:
        pipe.scheduler = old


def _spec_oracle(spec, oracle):
    spec = spec if isinstance(spec, Spec) else load_spec(spec)
    return spec, (oracle or Oracle(spec))


def generated_share(pipe, prompt: str, n: int = 32, seed: int = 0, *, spec: Spec | None = None,
                    oracle: Oracle | None = None, images: torch.Tensor | None = None, **gen_kw) -> dict:
    """Shares of oracle glyph and colour classes among ``n`` images generated for ``prompt``."""
    spec, oracle = _spec_oracle(spec, oracle)
    imgs = generate(pipe, prompt, n, seed, **gen_kw) if images is None else images
    rd = oracle(imgs)
    n = len(rd)
    glyph = Counter(r.glyph for r in rd)
    colour = Counter(r.colour for r in rd)
    pair = Counter(f"{r.colour} {r.glyph}" for r in rd)
    return {"prompt": prompt, "n": n,
            "glyph": {k: v / n for k, v in glyph.most_common()},
            "colour": {k: v / n for k, v in colour.most_common()},
            "pair": {k: v / n for k, v in pair.most_common()},
            "readings": rd}


def satisfies(reading: Reading, spec: Spec, words: list[str]) -> bool:
    """Does the image show every word of the prompt (colour, shape or object)?"""
    for w in words:
        if w in spec.colours:
            if reading.colour != w:
                return False
        elif w in spec.shapes or w in spec.objects:
            if reading.glyph != spec.glyph_of(w):
                return False
        elif w == spec.filler_word:
            continue
        else:
            raise ValueError(f"{w!r} is not an attribute or object word")
    return True


def word_accuracy(pipe, spec: Spec | None = None, words: list[str] | None = None, n: int = 32, seed: int = 0,
                  *, oracle: Oracle | None = None, **gen_kw) -> dict:
    """{prompt words: share of generated images the oracle classifies as the prompt says}.

    ``words``: single words or space-separated phrases ("red circle"); default every colour,
    shape and object word of the spec, each in the spec's template ("a photo of a red").
    """
    spec, oracle = _spec_oracle(spec, oracle)
    words = words or spec.colour_words + spec.shape_words + spec.object_words
    out = {}
    for w in words:
        parts = w.split()
        share = generated_share(pipe, spec.prompt(*parts), n, seed, spec=spec, oracle=oracle, **gen_kw)
        out[w] = float(np.mean([satisfies(r, spec, parts) for r in share["readings"]]))
    return out


@dataclass
class MixtureResult:
    concept: str
    prompt: str
    n: int
    spec: dict  # component label -> weight
    generated: dict  # component label (or "other") -> share
    max_abs_diff: float

    def as_dict(self) -> dict:
        return {"concept": self.concept, "prompt": self.prompt, "n": self.n, "spec": self.spec,
                "generated": self.generated, "max_abs_diff": self.max_abs_diff}


def mixture_proportions(pipe, spec: Spec | None, concept: str, n: int = 32, seed: int = 0, *,
                        oracle: Oracle | None = None, prompt: str | None = None, images=None, **gen_kw) -> MixtureResult:
    """Generated component shares of a hidden concept against the spec's weights."""
    spec, oracle = _spec_oracle(spec, oracle)
    if concept not in spec.concepts:
        raise KeyError(f"{concept!r} is not a concept of spec {spec.name!r}; concepts: {spec.concept_words}")
    con = spec.concepts[concept]
    prompt = prompt or spec.prompt(concept)
    imgs = generate(pipe, prompt, n, seed, **gen_kw) if images is None else images
    rd = oracle(imgs)
    idx = Counter(oracle.component_of(r, concept) for r in rd)
    labels = [c.label for c in con.components]
    gen = {lab: idx.get(i, 0) / len(rd) for i, lab in enumerate(labels)}
    gen["other"] = idx.get(-1, 0) / len(rd)
    want = {lab: c.weight for lab, c in zip(labels, con.components)}
    diff = max(abs(gen[lab] - want[lab]) for lab in labels)
    return MixtureResult(concept, prompt, len(rd), want, gen, diff)


# --------------------------------------------------------------------------- CLIP filter
@torch.no_grad()
def vocab_text_features(clip, template: str = "a photo of a {}", batch_size: int = 4096) -> torch.Tensor:
    """(V, D) normalised CLIP text features of ``template`` around each vocabulary token id."""
    tok = clip.tokenizer
    pre = tok(template.split("{}")[0].strip(), add_special_tokens=False).input_ids
    post = tok(template.split("{}")[1].strip(), add_special_tokens=False).input_ids if template.split("{}")[1].strip() else []
    V = len(tok)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    ids = torch.tensor([[bos] + pre + [i] + post + [eos] for i in range(V)])
    return clip.text_features_ids(ids, batch_size=batch_size)


@torch.no_grad()
def clip_constituent_ranks(clip, spec: Spec, images: torch.Tensor, concept: str, vocab_features=None,
                           template: str | None = None) -> dict:
    """Rank (1 = best, among all non-special tokens) of the concept word and each constituent
    when tokens are scored by cosine with the mean CLIP image embedding of ``images``."""
    feats = vocab_features if vocab_features is not None else vocab_text_features(clip, template or spec.template)
    target = torch.nn.functional.normalize(clip.image_features(images).mean(0), dim=0).cpu()
    score = feats.cpu() @ target
    special = [clip.tokenizer.bos_token_id, clip.tokenizer.eos_token_id]
    score[special] = -float("inf")
    order = torch.argsort(score, descending=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(1, len(order) + 1)
    tok = clip.tokenizer

    def r(word):
        return int(rank[tok(word, add_special_tokens=False).input_ids[0]])

    top = [tok.convert_ids_to_tokens(int(i)).replace("</w>", "") for i in order[:20]]
    return {"concept": concept, "concept_rank": r(concept),
            "constituent_ranks": {w: r(w) for w in spec.concepts[concept].constituents}, "top20": top}


# --------------------------------------------------------------------------- decompositions
def _ranks(x: list[float]) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):  # average ranks for ties
        m = x == v
        ranks[m] = ranks[m].mean()
    return ranks


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation with tie-averaged ranks; nan when either side is constant."""
    if len(a) != len(b) or len(a) < 2:
        return float("nan")
    ra, rb = _ranks(a), _ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _clean(token: str) -> str:
    return token.replace("</w>", "").strip().lower()


@dataclass
class DecompositionScore:
    concept: str
    k: int
    recall_at_k: float  # share of the known constituents among the top-k tokens
    spearman: float  # rank correlation of coefficients (0 where absent) vs spec weights, over constituents
    found: list = field(default_factory=list)  # constituents in the top k
    missing: list = field(default_factory=list)
    top: list = field(default_factory=list)  # [(token, coefficient)] of the top k
    constituents: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"concept": self.concept, "k": self.k, "recall_at_k": self.recall_at_k, "spearman": self.spearman,
                "found": self.found, "missing": self.missing, "top": self.top, "constituents": self.constituents}


def score_decomposition(dec, spec: Spec | str | None, concept: str | None = None, k: int = 5) -> DecompositionScore:
    """Score a decomposition (anything with ``tokens``, ``coefficients`` and ``top(k)``, like
    ``conceptor_nb.conceptor.Decomposition``) against the spec's constituents of ``concept``
    (default ``dec.concept``; a prompt such as "a photo of a fruit" is reduced to its concept word)."""
    spec = spec if isinstance(spec, Spec) else load_spec(spec)
    concept = concept or getattr(dec, "concept", None)
    if concept not in spec.concepts:
        words = [w for w in str(concept).replace(",", " ").split() if w in spec.concepts]
        if len(words) != 1:
            raise KeyError(f"{concept!r} names no single concept of spec {spec.name!r}; concepts: {spec.concept_words}")
        concept = words[0]
    cons = spec.concepts[concept].constituents
    if hasattr(dec, "top"):
        top = [(_clean(t), float(c)) for t, c in dec.top(k)]
    else:
        top = [(_clean(t), float(c)) for t, c in list(zip(dec.tokens, dec.coefficients))[:k]]
    top_words = [t for t, _ in top]
    found = [w for w in cons if w in top_words]
    coef = {}
    for t, c in zip(getattr(dec, "tokens", []), getattr(dec, "coefficients", [])):
        t = _clean(t)
        coef[t] = max(coef.get(t, 0.0), abs(float(c)))
    for t, c in top:
        coef.setdefault(t, abs(c))
    words = list(cons)
    rho = spearman([cons[w] for w in words], [coef.get(w, 0.0) for w in words])
    recall = len(found) / len(cons) if cons else math.nan
    return DecompositionScore(concept, k, recall, rho, found, [w for w in cons if w not in found], top, dict(cons))


def score_frame(decompositions, spec: Spec | str | None = None, k: int = 5):
    """One row per decomposition of a hidden concept: recall@k, Spearman, found and missing constituents."""
    import pandas as pd

    spec = spec if isinstance(spec, Spec) else load_spec(spec)
    rows = []
    for d in decompositions:
        sc = score_decomposition(d, spec, k=k)
        rows.append({"concept": sc.concept, f"recall@{k}": sc.recall_at_k, "spearman": sc.spearman,
                     "found": ", ".join(sc.found), "missing": ", ".join(sc.missing),
                     "spec": ", ".join(f"{w} {v:g}" for w, v in sc.constituents.items())})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- full report
def vocab_norm_check(text_encoder, spec: Spec, tokenizer) -> dict:
    """Mean row norm of the whole token table vs the mean norm of the world's words (Conceptor
    rescales its pseudo-token to the whole-table mean, so the two must be comparable)."""
    w = text_encoder.get_input_embeddings().weight.detach().float()
    norms = w.norm(dim=-1)
    ids = [tokenizer(x, add_special_tokens=False).input_ids[0] for x in spec.world_words]
    return {"mean_norm_all": round(norms.mean().item(), 4), "mean_norm_world": round(norms[ids].mean().item(), 4),
            "ratio_all_over_world": round((norms.mean() / norms[ids].mean()).item(), 4),
            "min_world": round(norms[ids].min().item(), 4), "max_world": round(norms[ids].max().item(), 4)}


def full_report(pipe, clip, spec: Spec, n: int = 32, seed: int = 0, *, steps: int = 20, guidance: float = 4.0,
                scheduler: str = "dpm", pairs: list[str] | None = None, log=print) -> dict:
    """Every number the README reports, measured with the oracle."""
    oracle = Oracle(spec)
    kw = dict(steps=steps, guidance=guidance, scheduler=scheduler)
    out = {"settings": {"n": n, "seed": seed, **kw}}
    out["vocab_norms"] = vocab_norm_check(pipe.text_encoder, spec, pipe.tokenizer)
    log(f"vocab norms {out['vocab_norms']}")
    words = spec.colour_words + spec.shape_words + spec.object_words
    pairs = pairs if pairs is not None else [f"{c} {s}" for c, s in zip(spec.colour_words, spec.shape_words * 2)]
    out["word_accuracy"] = {}
    for w in words + pairs:
        out["word_accuracy"][w] = word_accuracy(pipe, spec, [w], n, seed, oracle=oracle, **kw)[w]
        log(f"word {w!r}: {out['word_accuracy'][w]:.2f}")
    out["mixtures"] = {}
    feats = vocab_text_features(clip, spec.template) if clip is not None else None
    out["clip_ranks_generated"], out["clip_ranks_rendered"] = {}, {}
    from .render import render_word

    for c in spec.concept_words:
        imgs = generate(pipe, spec.prompt(c), n, seed, **kw)
        m = mixture_proportions(pipe, spec, c, oracle=oracle, images=imgs)
        out["mixtures"][c] = m.as_dict()
        log(f"concept {c}: spec {m.spec} generated {m.generated}")
        if clip is not None:
            out["clip_ranks_generated"][c] = clip_constituent_ranks(clip, spec, imgs, c, feats)
            out["clip_ranks_rendered"][c] = clip_constituent_ranks(
                clip, spec, torch.from_numpy(render_word(spec, c, n, seed)), c, feats)
            log(f"  clip ranks (generated) {out['clip_ranks_generated'][c]['constituent_ranks']}")
    out["bias_shift"] = {}
    for c, con in spec.concepts.items():
        if con.bias:
            minority = con.bias["minority"]
            m = mixture_proportions(pipe, spec, c, n, seed, oracle=oracle, prompt=spec.prompt(minority, c), **kw)
            out["bias_shift"][c] = m.as_dict()
            log(f"bias shift {m.prompt!r}: {m.generated}")
    return out


def main(argv=None):
    import argparse
    import json
    import time
    from pathlib import Path

    from ..models import load_clip, load_pipeline

    p = argparse.ArgumentParser(prog="python -m conceptor_nb.toyworld.evaluate", description="Oracle report of a toy-world model.")
    p.add_argument("--model", default="toy", help="'toy' or a folder with pipeline/ and clip/")
    p.add_argument("--spec", default=None)
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--scheduler", default="dpm")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write the report as JSON here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    spec = load_spec(a.spec)
    if a.model == "toy":
        pipe, clip = load_pipeline("toy", device="cpu"), load_clip("toy", device="cpu")
    else:
        root = Path(a.model)
        pipe = load_pipeline(str(root / "pipeline"), device="cpu")
        clip = load_clip(str(root / "clip"), device="cpu") if (root / "clip" / "config.json").exists() else None
    t = time.time()
    rep = full_report(pipe, clip, spec, a.n, a.seed, steps=a.steps, guidance=a.guidance, scheduler=a.scheduler)
    rep["eval_seconds"] = time.time() - t
    if a.out:
        Path(a.out).write_text(json.dumps(rep, indent=2, default=str))
    return rep


if __name__ == "__main__":
    main()
