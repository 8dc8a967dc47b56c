"""Measure the toy world's models against the spec, with the pixel oracle as the judge.

* :func:`generated_share`: what the oracle sees in images generated for a prompt.
* :func:`word_accuracy`: for attribute and object words, the share of generated images
  that show what the prompt says.
* :func:`word_fidelity`: every plain word and colour-shape pair, per guidance scale.
* :func:`mixture_proportions`: for a hidden concept, generated component shares vs the spec (and what
  the images that show no component show instead).
* :func:`model_fidelity`: the guidance table and the word fidelity: a retrained model's quick check
  (``python -m conceptor_nb.toyworld.evaluate --fidelity --model RUN``).
* :func:`clip_constituent_ranks`: where the toy CLIP ranks a concept's constituents among
  all 49,408 vocabulary tokens (the dictionary filter Conceptor relies on).
* :func:`score_decomposition`: recall@k and Spearman rank correlation of a Conceptor
  decomposition against the concept's known constituents.
"""
from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from .oracle import Oracle, Reading
from .spec import Spec, load_spec


# --------------------------------------------------------------------------- generation
def generate(pipe, prompt: str, n: int = 32, seed: int = 0, *, steps: int = 20, guidance: float = 4.0,
             sampler: str = "dpm", batch_size: int = 64) -> torch.Tensor:
    """``n`` images (n, 3, H, W) in [0, 1] of ``prompt``, seeds ``seed .. seed+n-1``
    (the package's :func:`conceptor_nb.images.generate`, without a progress bar)."""
    from ..images import generate as _generate

    return _generate(pipe, prompt, range(seed, seed + n), steps=steps, guidance=guidance, sampler=sampler,
                     batch_size=batch_size, verbose=False)


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


def word_fidelity(pipe, spec: Spec | None = None, guidances=(1.0,), n: int = 32, seed: int = 0, *,
                  oracle: Oracle | None = None, steps: int = 20, sampler: str = "dpm", log=None) -> dict:
    """How faithfully the model draws the world's plain words, per guidance scale:
    ``{guidance: {"n": n, "words": {word: share}, "pairs": {"red circle": {"both": .., "colour": .., "glyph": ..}}}}``.

    ``words``: every colour, shape and object word alone ("a photo of a red"), the share of images that
    show it; ``pairs``: every colour with every shape, the share that show both, the colour, the shape.
    A model that draws its hidden concepts unfaithfully at some scale usually draws plain words badly
    there too: this table says whether a concept's miss is the concept's or the model's."""
    spec, oracle = _spec_oracle(spec, oracle)
    out = {}
    for g in guidances:
        kw = dict(steps=steps, guidance=float(g), sampler=sampler)
        words = word_accuracy(pipe, spec, spec.colour_words + spec.shape_words + spec.object_words, n, seed,
                              oracle=oracle, **kw)
        pairs = {}
        for c in spec.colour_words:
            for sh in spec.shape_words:
                rd = generated_share(pipe, spec.prompt(c, sh), n, seed, spec=spec, oracle=oracle, **kw)["readings"]
                glyph = [r.glyph == spec.glyph_of(sh) for r in rd]
                colour = [r.colour == c for r in rd]
                pairs[f"{c} {sh}"] = {"both": float(np.mean([a and b for a, b in zip(glyph, colour)])),
                                      "colour": float(np.mean(colour)), "glyph": float(np.mean(glyph))}
        out[str(float(g))] = {"n": n, "words": words, "pairs": pairs}
        if log:
            log(f"guidance {g:g}: plain words {np.mean(list(words.values())):.0%}, colour-shape pairs "
                f"{np.mean([v['both'] for v in pairs.values()]):.0%}")
    return out


@dataclass
class MixtureResult:
    concept: str
    prompt: str
    n: int
    spec: dict  # component label -> weight
    generated: dict  # component label (or "other") -> share
    max_abs_diff: float
    other: dict = field(default_factory=dict)  # what the "other" images show ("colour glyph" -> share of all images)

    def as_dict(self) -> dict:
        return {"concept": self.concept, "prompt": self.prompt, "n": self.n, "spec": self.spec,
                "generated": self.generated, "max_abs_diff": self.max_abs_diff, "other": self.other}


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
    comp = [oracle.component_of(r, concept) for r in rd]
    idx = Counter(comp)
    labels = [c.label for c in con.components]
    gen = {lab: idx.get(i, 0) / len(rd) for i, lab in enumerate(labels)}
    gen["other"] = idx.get(-1, 0) / len(rd)
    want = {lab: c.weight for lab, c in zip(labels, con.components)}
    diff = max(abs(gen[lab] - want[lab]) for lab in labels)
    other = Counter(reading_label(r) for r, i in zip(rd, comp) if i == -1)
    return MixtureResult(concept, prompt, len(rd), want, gen, diff, {k: v / len(rd) for k, v in other.most_common()})


def reading_label(r: Reading) -> str:
    """An oracle reading as words: "orange circle", "blue lemon", "no glyph"."""
    if r.glyph is None:
        return "no glyph"
    return f"{r.colour} {r.glyph}" if r.colour else r.glyph


def guidance_table(pipe, spec: Spec | str | None = None, guidances=(1.0, 2.0, 4.0, 7.5), n: int = 128, seed: int = 0,
                   *, oracle: Oracle | None = None, steps: int = 20, sampler: str = "dpm", log=None) -> dict:
    """{guidance: {concept: MixtureResult.as_dict()}}: what the model draws for each hidden concept at
    each guidance scale (same seeds for every scale), judged by the oracle."""
    spec, oracle = _spec_oracle(spec, oracle)
    out = {}
    for g in guidances:
        out[float(g)] = {}
        for c in spec.concept_words:
            m = mixture_proportions(pipe, spec, c, n, seed, oracle=oracle, steps=steps, guidance=float(g), sampler=sampler)
            out[float(g)][c] = m.as_dict()
            if log:
                log(f"guidance {g:g} {c}: " + ", ".join(f"{k} {v:.0%}" for k, v in m.generated.items()))
    return out


def fidelity(table: dict, spec: Spec, *, guidance: float, tolerance: float = 0.10, min_share: float = 0.10) -> dict:
    """Target 4 of issue 11 read off a :func:`guidance_table`: at guidance 1 every spec component within
    ``tolerance`` of its spec share; at ``guidance`` every component drawn in at least ``min_share`` of images."""
    g1 = table.get(1.0) or table.get(1)
    gp = table[float(guidance)]
    worst1 = {c: max(abs(r["generated"][k] - r["spec"][k]) for k in r["spec"]) for c, r in g1.items()} if g1 else {}
    least = {c: min(r["generated"][k] for k in r["spec"]) for c, r in gp.items()}
    return {"guidance": float(guidance), "max_diff_at_1": worst1, "min_share_at_guidance": least,
            "ok_at_1": bool(g1) and all(v <= tolerance + 1e-9 for v in worst1.values()),
            "ok_at_guidance": all(v >= min_share - 1e-9 for v in least.values())}


# --------------------------------------------------------------------------- CLIP filter
def vocab_text_features(clip, template: str = "a photo of a {}") -> torch.Tensor:
    """(V, D) normalised CLIP text features of ``template`` around each vocabulary token id: the dictionary's
    own vocabulary embedding (:func:`conceptor_nb.dictionary.vocab_text_features`), uncached here."""
    from ..dictionary import vocab_text_features as embed

    return embed(clip, (template,), cache_dir=False, verbose=False)


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
                sampler: str = "dpm", pairs: list[str] | None = None, log=print) -> dict:
    """Every number the README reports, measured with the oracle."""
    oracle = Oracle(spec)
    kw = dict(steps=steps, guidance=guidance, sampler=sampler)
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


# --------------------------------------------------------------------------- decompositions against ground truth
def constituent_shares(spec: Spec, concept: str, generated: dict) -> dict:
    """{constituent: share of images that show it}, from component shares (``MixtureResult.generated``):
    a constituent is drawn in every image of each component whose words name it."""
    comps = spec.concepts[concept].components
    return {w: sum(generated.get(c.label, 0.0) for c in comps if w in c.words) for w in spec.concepts[concept].constituents}


def drawn_constituents(spec: Spec, concept: str, generated: dict, min_share: float = 0.10) -> list[str]:
    """The constituents shown in at least ``min_share`` of the images (the ones a decomposition can see)."""
    return [w for w, v in constituent_shares(spec, concept, generated).items() if v >= min_share - 1e-9]


def top_overlap(a: list[str], b: list[str]) -> float:
    """|a & b| / |a| for two top-k lists of equal length."""
    return len(set(a) & set(b)) / max(1, len(a))


def chance_overlap(k: int, dictionary_size: int) -> float:
    """Expected overlap of two random k-subsets of a dictionary of ``dictionary_size`` tokens: k / size."""
    return min(1.0, k / max(1, dictionary_size))


@torch.no_grad()
def null_test(pipe, spec: Spec, token: str, n: int = 32, seed: int = 0, *, oracle: Oracle | None = None, **gen_kw) -> dict:
    """Is ``token`` meaningless to the model? Render "a photo of a <token>" and the empty template "a photo of a"
    with the same seeds; report the total-variation distance between the oracle's (colour, glyph) readings of
    the two sets and the mean pixel distance of same-seed pairs (0, 0: the token changes nothing)."""
    spec, oracle = _spec_oracle(spec, oracle)
    empty = spec.template.format("").strip()
    a = generate(pipe, spec.template.format(token), n, seed, **gen_kw)
    b = generate(pipe, empty, n, seed, **gen_kw)
    ra, rb = Counter(f"{r.colour} {r.glyph}" for r in oracle(a)), Counter(f"{r.colour} {r.glyph}" for r in oracle(b))
    tv = 0.5 * sum(abs(ra[k] - rb[k]) for k in set(ra) | set(rb)) / n
    return {"token": token, "tv_distance_to_empty": tv, "pixel_distance_to_empty": float((a - b).abs().mean()),
            "token_readings": dict(ra.most_common(4)), "empty_readings": dict(rb.most_common(4))}


def _loss_inputs(pipe, images: torch.Tensor, template: str):
    """What the fit's loss needs, once per image set: (alphas_cumprod, number of timesteps, prediction type,
    latents of ``images``, the template's token ids)."""
    from diffusers import DDPMScheduler

    from ..conceptor import encode_latents
    from ..inject import template_prompt, tokenize

    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    return (sched.alphas_cumprod, sched.config.num_train_timesteps, sched.config.prediction_type,
            encode_latents(pipe, images).float(), tokenize(pipe.tokenizer, template_prompt(template)))


def loss_by_timestep(pipe, images: torch.Tensor, vectors: dict, *, template: str = "a photo of a {}", bins: int = 10,
                     repeats: int = 20, seed: int = 123) -> dict:
    """The fit's reconstruction loss (the diffusion loss, epsilon or v) on ``images`` with each pseudo-token of
    ``vectors`` (``{name: vector}``) in ``template``, per band of noise levels: ``{name: [mean loss of band
    0 (t near 0), ..., band bins-1]}``, plus ``"all"``: the mean over uniform t, what the fit minimises.
    Every vector sees the same noise and timesteps (``repeats`` draws per image)."""
    from ..conceptor import diffusion_loss

    ac, n_t, prediction, lat, ids = _loss_inputs(pipe, images, template)
    gen = torch.Generator().manual_seed(seed)
    draws = [(torch.randn(lat.shape, generator=gen), torch.randint(0, n_t, (len(lat),), generator=gen)) for _ in range(repeats)]
    out = {}
    for name, w in vectors.items():
        per, cnt, total = torch.zeros(bins), torch.zeros(bins), 0.0
        with torch.no_grad():
            for noise, tt in draws:
                loss = diffusion_loss(pipe, w, lat, noise, tt, ids, template, prediction, ac,
                                      reduction="none")  # the fit's own loss, per image
                band = (tt * bins // n_t).clamp(max=bins - 1)
                per.index_add_(0, band, loss)
                cnt.index_add_(0, band, torch.ones_like(loss))
                total += float(loss.mean())
        out[name] = {"bands": (per / cnt.clamp_min(1)).tolist(), "all": total / repeats}
    return out


@torch.no_grad()
def paired_loss(pipe, images: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, template: str = "a photo of a {}",
                min_timestep: float = 0.0, repeats: int = 20, seed: int = 321) -> dict:
    """The fit's reconstruction loss on ``images`` with pseudo-token ``a`` and with ``b``, on the same noise and
    timesteps (t uniform on the fit's range, ``[min_timestep, 1)`` of the schedule): both means, and the mean
    and standard error of the per-sample difference ``b - a`` (paired, so far tighter than either mean)."""
    from ..conceptor import diffusion_loss

    ac, n_t, prediction, lat, ids = _loss_inputs(pipe, images, template)
    gen = torch.Generator().manual_seed(seed)
    la, lb = [], []
    for _ in range(repeats):
        noise = torch.randn(lat.shape, generator=gen)
        t = torch.randint(int(min_timestep * n_t), n_t, (len(lat),), generator=gen)
        for w, acc in ((a, la), (b, lb)):
            acc.append(diffusion_loss(pipe, w, lat, noise, t, ids, template, prediction, ac,
                                      reduction="none"))
    la, lb = torch.cat(la), torch.cat(lb)
    d = lb - la
    return {"a": float(la.mean()), "b": float(lb.mean()), "diff": float(d.mean()),
            "diff_se": float(d.std() / len(d) ** 0.5), "samples": len(d)}


def miss_check(pipe, dec, images: torch.Tensor, word: str, *, k: int = 5, repeats: int = 20) -> dict:
    """Why did a drawn constituent miss the top ``k``: the optimiser, or the objective? Compares the fit's
    pseudo-token (its top ``n_tokens``) with the same pseudo-token where ``word`` gets the ``k``-th largest
    coefficient (swapped with the token that held it; added with that coefficient if it was outside the top
    ``n_tokens``), under the fit's own loss on the run's concept images (its noise range, paired noise).
    ``verdict``: ``"fit"`` when the promoted pseudo-token reconstructs the images worse by more than two standard
    errors (no better optimisation of this objective would rank ``word`` higher: the miss is the objective's, on
    this model), ``"promoted"`` when it reconstructs them better by as much (the optimiser missed it), else
    ``"indifferent"`` (the objective cannot tell the two apart on these images)."""
    from ..conceptor import combine
    from ..inject import token_embeddings

    words = [_clean(x) for x in dec.tokens]
    if word not in words:
        return {"word": word, "in_dictionary": False}
    j, n = words.index(word), dec.n_tokens
    ids, coef = list(dec.token_ids[:n]), [float(c) for c in dec.coefficients[:n]]
    promoted_ids, promoted = list(ids), list(coef)
    if j < n:
        promoted[j], promoted[k - 1] = coef[k - 1], coef[j]
    else:
        promoted_ids.append(dec.token_ids[j])
        promoted.append(coef[k - 1])
    promoted_vector = combine(torch.tensor(promoted, dtype=torch.float32), token_embeddings(pipe, promoted_ids), dec.norm)
    r = paired_loss(pipe, images, dec.vector(pipe), promoted_vector, template=dec.template,
                    min_timestep=dec.settings.min_timestep, repeats=repeats)
    return {"word": word, "in_dictionary": True, "rank": j + 1, "coefficient": round(float(dec.coefficients[j]), 4),
            "loss_fit": r["a"], "loss_promoted": r["b"], "diff": r["diff"], "diff_se": r["diff_se"],
            "samples": r["samples"], "verdict": "fit" if r["diff"] > 2 * r["diff_se"] else
            "promoted" if r["diff"] < -2 * r["diff_se"] else "indifferent"}


def timestep_diagnostic(pipe, spec: Spec, concept: str, images: torch.Tensor, *, template: str = "a photo of a {}",
                        bins: int = 10, repeats: int = 20) -> dict:
    """Is the diffusion loss semantic at every noise level? On ``images`` of ``concept``: the loss of the
    concept's own word, of the spec's constituents mixed by their weights, and of the filler word (a word that
    names nothing drawn), per band of t. ``first_semantic_band``: the lowest band from which the word and the
    mixture both beat the filler in every band above (None: never)."""
    from ..conceptor import combine, vocab_norm
    from ..inject import token_embeddings

    tok = pipe.tokenizer
    wid = lambda w: tok(w, add_special_tokens=False).input_ids[0]  # every world word is one token (spec check)
    norm = vocab_norm(pipe)
    cons = spec.concepts[concept].constituents
    vec = lambda words, weights: combine(torch.tensor(weights, dtype=torch.float32),
                                         token_embeddings(pipe, [wid(w) for w in words]), norm)
    vectors = {f"the word '{concept}'": vec([concept], [1.0]),
               "the spec's mixture": vec(list(cons), list(cons.values())),
               f"the filler '{spec.filler_word}'": vec([spec.filler_word], [1.0])}
    res = loss_by_timestep(pipe, images, vectors, template=template, bins=bins, repeats=repeats)
    word, mix, filler = (res[k]["bands"] for k in vectors)
    ok = [word[i] < filler[i] and mix[i] < filler[i] for i in range(bins)]
    first = next((i for i in range(bins) if all(ok[i:])), None)
    return {"concept": concept, "losses": res, "first_semantic_band": first, "bins": bins}


def summarise(runs: dict, k: int = 5, top: int = 10) -> dict:
    """Means over the runs of :func:`decomposition_report` (``{concept: [row per run]}``), and each concept's
    top-``top`` stability (mean pairwise overlap across its runs) beside the chance overlap for its dictionary."""
    stab, chance, stab_k = {}, {}, {}
    for c, rows in runs.items():
        pairs = [(a, b) for i, a in enumerate(rows) for b in rows[i + 1:]]

        def mean_overlap(n):
            return float(np.mean([top_overlap([w for w, _ in a["top"][:n]], [w for w, _ in b["top"][:n]])
                                  for a, b in pairs])) if pairs else float("nan")

        stab[c], stab_k[c] = mean_overlap(top), mean_overlap(k)
        chance[c] = float(np.mean([chance_overlap(top, r["dictionary_size"]) for r in rows]))
    allrows = [r for rows in runs.values() for r in rows]
    return {
        "decompositions": len(allrows),
        f"recall@{k}_spec_mean": float(np.mean([r[f"recall@{k}_spec"] for r in allrows])),
        f"recall@{k}_drawn_mean": float(np.nanmean([r[f"recall@{k}_drawn"] for r in allrows])),
        f"recall@{k}_drawn_all_perfect": all(r[f"recall@{k}_drawn"] == 1.0 for r in allrows),
        f"not_world_in_top{k}_per_decomposition": float(np.mean([len(r["not_world_in_top"]) for r in allrows])),
        f"stability_top{top}": stab, f"chance_top{top}": chance,
        f"stability_top{top}_mean": float(np.nanmean(list(stab.values()))),
        f"stability_top{k}": stab_k, f"stability_top{k}_mean": float(np.nanmean(list(stab_k.values()))),
        f"chance_top{top}_mean": float(np.mean(list(chance.values()))),
    }


def fidelity_of(table: dict, spec: Spec, guidance: float) -> dict:
    """:func:`fidelity` of a guidance table as the report stores it (``{"1.0": {concept: generated}}``)."""
    full = {float(g): {c: {"generated": v, "spec": {x.label: x.weight for x in spec.concepts[c].components}}
                       for c, v in rows.items()} for g, rows in table.items()}
    return fidelity(full, spec, guidance=guidance)


def decomposition_report(pipe, clip, spec: Spec, seeds=(0, 1, 2), *, settings=None, concepts=None, k: int = 5,
                         top: int = 10, min_share: float = 0.10, render_n: int | None = None, null_n: int = 32,
                         guidances=(1.0, 2.0, 4.0, 7.5), guidance_n: int = 128, cache_dir=None, log=print,
                         partial_path=None, diagnostic_seed: int | None = 7, miss_repeats: int = 20,
                         word_n: int = 32) -> dict:
    """Issue 11's measurements: per concept and run (a run's seed picks disjoint concept images, see
    :func:`conceptor_nb.images.image_seeds`) the top-``top`` tokens, recall@``k`` against the spec's
    constituents and against the drawn ones (shown in >= ``min_share`` of that run's concept images), the
    tokens outside the world's words in the top ``k`` (each rendered alone against the empty template),
    the oracle proportions of the concept images and of the pseudo-token's renders, top-``top`` stability
    across runs beside the chance overlap for the dictionary, and the guidance table. ``diagnostic_seed`` (a
    run seed not among ``seeds``; None: skip): :func:`timestep_diagnostic` on that run's concept images. Each
    drawn constituent a run misses gets a :func:`miss_check` (``miss_repeats`` noise draws per image; 0: none).
    ``word_n`` images per prompt (0: skip): :func:`word_fidelity` at guidance 1 and the profile's guidance."""
    from ..config import settings as profile_settings
    from ..conceptor import decompose

    s = settings or profile_settings("toy")
    oracle = Oracle(spec)
    world = set(spec.world_words)
    concepts = list(concepts or spec.concept_words)
    gen_kw = dict(steps=s.gen_steps, guidance=s.guidance, sampler=s.sampler)
    out = {"settings": {"profile": s.to_dict(), "seeds": list(seeds), "k": k, "top": top, "min_share": min_share},
           "runs": {}, "null_tests": {}}
    for seed in seeds:
        for c in concepts:
            t = time.time()
            dec = decompose(pipe, c, clip=clip, settings=s.replace(seed=int(seed)), cache_dir=cache_dir, verbose=False)
            imgs = dec.concept_images(pipe, cache_dir=cache_dir)
            m = mixture_proportions(pipe, spec, c, oracle=oracle, images=imgs)
            drawn = drawn_constituents(spec, c, m.generated, min_share)
            words = [_clean(x) for x in dec.tokens[:top]]
            sc = score_decomposition(dec, spec, c, k=k)
            found_drawn = [w for w in drawn if w in words[:k]]
            row = {"concept": c, "seed": int(seed), "image_seeds": [dec.seeds(1)[0], len(imgs)],
                   "top": [[w, round(float(x), 4)] for w, x in zip(words, dec.coefficients[:top])],
                   "dictionary_size": len(dec.tokens), f"recall@{k}_spec": sc.recall_at_k,
                   f"recall@{k}_drawn": len(found_drawn) / len(drawn) if drawn else float("nan"),
                   "drawn": drawn, "missing_spec": sc.missing, "missing_drawn": [w for w in drawn if w not in found_drawn],
                   "not_world_in_top": [w for w in words[:k] if w not in world],
                   "concept_images": m.generated}
            if render_n:
                n = min(render_n, len(imgs))
                rend = dec.render(pipe, dec.seeds(n))
                row["renders"] = mixture_proportions(pipe, spec, c, oracle=oracle, images=rend).generated
                row["concept_images_first_n"] = mixture_proportions(pipe, spec, c, oracle=oracle, images=imgs[:n]).generated
            if row["missing_drawn"] and miss_repeats:
                row["miss_checks"] = [miss_check(pipe, dec, imgs, w, k=k, repeats=miss_repeats) for w in row["missing_drawn"]]
            row["seconds"] = round(time.time() - t, 1)
            out["runs"].setdefault(c, []).append(row)
            if log:
                log(f"seed {seed} {c}: top {words[:k]} recall spec {row[f'recall@{k}_spec']:.2f} drawn "
                    f"{row[f'recall@{k}_drawn']:.2f} not-world {row['not_world_in_top']} ({row['seconds']}s)")
            for w in row["not_world_in_top"]:
                if w not in out["null_tests"]:
                    out["null_tests"][w] = null_test(pipe, spec, w, null_n, 0, oracle=oracle, **gen_kw)
            if partial_path:  # what is done so far, in case the run is cut short
                import json
                from pathlib import Path

                Path(partial_path).write_text(json.dumps(out, indent=1, default=str))
    out["summary"] = summarise(out["runs"], k, top)
    if diagnostic_seed is not None:
        from ..images import concept_images

        out["timestep_diagnostic"] = {"seed": int(diagnostic_seed), "concepts": {}}
        for c in concepts:
            imgs = concept_images(pipe, s.template.format(c), s.n_train, int(diagnostic_seed), steps=s.gen_steps,
                                  guidance=s.guidance, sampler=s.sampler, cache_dir=cache_dir, verbose=False)
            out["timestep_diagnostic"]["concepts"][c] = timestep_diagnostic(pipe, spec, c, imgs, template=s.template)
    out.update(model_fidelity(pipe, spec, s, guidances, guidance_n, word_n, oracle=oracle, log=log))
    return out


def model_fidelity(pipe, spec: Spec, settings, guidances=(1.0, 2.0, 4.0, 7.5), n: int = 128, word_n: int = 32, *,
                   oracle: Oracle | None = None, log=None) -> dict:
    """What the model draws, with the profile's sampler and steps (``settings``): the guidance table of the hidden
    concepts (``n`` images each; what the unresolved ones show; target 4's verdict when the profile's guidance is
    among ``guidances``) and :func:`word_fidelity` at guidance 1 and the profile's (``word_n`` images per prompt;
    0: skip). Without decompositions: the quick check of a retrained model (``evaluate --fidelity``)."""
    spec, oracle = _spec_oracle(spec, oracle)
    s, out = settings, {}
    if guidances:
        table = guidance_table(pipe, spec, guidances, n, 0, oracle=oracle, steps=s.gen_steps, sampler=s.sampler, log=log)
        out["guidance_table"] = {str(g): {c: r["generated"] for c, r in rows.items()} for g, rows in table.items()}
        out["guidance_other"] = {str(g): {c: r["other"] for c, r in rows.items()} for g, rows in table.items()}
        if float(s.guidance) in [float(g) for g in guidances]:
            out["fidelity"] = fidelity_of(out["guidance_table"], spec, float(s.guidance))
    if word_n:
        out["word_fidelity"] = word_fidelity(pipe, spec, sorted({1.0, float(s.guidance)}), word_n, 0, oracle=oracle,
                                             steps=s.gen_steps, sampler=s.sampler, log=log)
    return out


def _pct(x: float) -> str:
    return "-" if x != x else f"{100 * x:.0f}%"


def report_markdown(rep: dict, spec: Spec) -> str:
    """The decomposition report as Markdown tables (what the README shows)."""
    k, top = rep["settings"]["k"], rep["settings"]["top"]
    lines = ["| concept | run (seed) | top-10 tokens (coefficient) | recall@5 spec | recall@5 drawn | not-world in top 5 |",
             "| --- | --- | --- | --- | --- | --- |"]
    for c, rows in rep["runs"].items():
        for r in rows:
            toks = ", ".join(f"{w} {x:.2f}" for w, x in r["top"])
            lines.append(f"| {c} | {r['seed']} | {toks} | {_pct(r[f'recall@{k}_spec'])} | {_pct(r[f'recall@{k}_drawn'])} "
                         f"({', '.join(r['drawn'])}) | {', '.join(r['not_world_in_top']) or '-'} |")
    sm = rep["summary"]
    lines += ["", f"Mean recall@{k}: spec constituents {_pct(sm[f'recall@{k}_spec_mean'])}, drawn constituents "
              f"{_pct(sm[f'recall@{k}_drawn_mean'])} (every run 100%: {sm[f'recall@{k}_drawn_all_perfect']}); "
              f"tokens outside the world's words in a top {k}: {sm[f'not_world_in_top{k}_per_decomposition']:.2f} per decomposition.",
              ""]
    sk = sm.get(f"stability_top{k}")  # reports written before it was measured lack the top-k column
    lines += [f"| concept | top-{top} stability across runs | chance overlap (top {top} / dictionary size) |"
              + (f" top-{k} stability |" if sk else ""), "| --- | --- | --- |" + (" --- |" if sk else "")]
    for c in rep["runs"]:
        lines.append(f"| {c} | {sm[f'stability_top{top}'][c]:.2f} | {sm[f'chance_top{top}'][c]:.2f} |"
                     + (f" {sk[c]:.2f} |" if sk else ""))
    lines.append(f"| mean | {sm[f'stability_top{top}_mean']:.2f} | {sm[f'chance_top{top}_mean']:.2f} |"
                 + (f" {sm[f'stability_top{k}_mean']:.2f} |" if sk else ""))
    checks = [(c, r, m) for c, rows in rep["runs"].items() for r in rows for m in r.get("miss_checks", [])]
    if checks:
        lines += ["", f"Drawn constituents missing from a top {k}: would the fit's own objective rank them higher? The fit's "
                  f"pseudo-token against the same one with the token given the {k}th largest coefficient, under the fit's "
                  "loss on that run's concept images (same noise; difference x 1000 with its standard error; positive: "
                  "promoting the token reconstructs the images worse; the objective prefers whichever is better by more "
                  "than two standard errors):", "",
                  "| concept | run | token | rank | share of the run's images | loss x 1000, fit | promoted - fit | "
                  "the objective prefers |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for c, r, m in checks:
            if not m["in_dictionary"]:
                lines.append(f"| {c} | {r['seed']} | {m['word']} | not in the dictionary | | | | |")
                continue
            share = _pct(constituent_shares(spec, c, r["concept_images"]).get(m["word"], float("nan")))
            lines.append(f"| {c} | {r['seed']} | {m['word']} | {m['rank']} | {share} | {1000 * m['loss_fit']:.2f} | "
                         f"{1000 * m['diff']:+.4f} ± {1000 * m['diff_se']:.4f} | {m['verdict']} |")
    if rep.get("timestep_diagnostic"):
        td = rep["timestep_diagnostic"]
        bins = next(iter(td["concepts"].values()))["bins"]
        lines += ["", f"Reconstruction loss x 1000 by noise level (t in tenths of the schedule), on held-out concept images "
                  f"(run seed {td['seed']}); `all`: uniform t, what the fit minimises:", "",
                  "| concept | pseudo-token | all | " + " | ".join(f"t {i}/{bins}" for i in range(bins)) + " |",
                  "| --- | --- | --- |" + " --- |" * bins]
        for c, d in td["concepts"].items():
            for name, r in d["losses"].items():
                lines.append(f"| {c} | {name} | {1000 * r['all']:.1f} | " + " | ".join(f"{1000 * x:.1f}" for x in r["bands"]) + " |")
        lines += ["", "First band from which the concept's word and the spec's mixture both beat the filler in every higher "
                  "band: " + ", ".join(f"{c} {d['first_semantic_band'] if d['first_semantic_band'] is not None else 'never'}"
                                        f"/{bins}" for c, d in td["concepts"].items()) + "."]
    if rep.get("null_tests"):
        lines += ["", "| token outside the world | oracle TV distance to the empty template | mean pixel distance |", "| --- | --- | --- |"]
        for w, t in rep["null_tests"].items():
            lines.append(f"| {w} | {t['tv_distance_to_empty']:.2f} | {t['pixel_distance_to_empty']:.3f} |")
    if any("renders" in r for rows in rep["runs"].values() for r in rows):
        lines += ["", "| concept | run | concept images (oracle) | pseudo-token renders, same seeds (oracle) |", "| --- | --- | --- | --- |"]
        for c, rows in rep["runs"].items():
            for r in rows:
                if "renders" in r:
                    f = lambda d: ", ".join(f"{a} {_pct(b)}" for a, b in d.items())
                    lines.append(f"| {c} | {r['seed']} | {f(r['concept_images_first_n'])} | {f(r['renders'])} |")
    return "\n".join(lines + fidelity_markdown(rep, spec))


def fidelity_markdown(rep: dict, spec: Spec) -> list[str]:
    """The model-fidelity part of a report (guidance table, what the unresolved images show, plain words) as
    Markdown lines."""
    lines = []
    if rep.get("guidance_table"):
        gs = list(rep["guidance_table"])
        lines += ["", "| concept | spec | " + " | ".join(f"guidance {g}" for g in gs) + " |", "| --- | --- |" + " --- |" * len(gs)]
        for c in spec.concept_words:
            if c not in rep["guidance_table"][gs[0]]:
                continue
            want = ", ".join(f"{x.label} {_pct(x.weight)}" for x in spec.concepts[c].components)
            cells = [", ".join(f"{a} {_pct(b)}" for a, b in rep["guidance_table"][g][c].items()) for g in gs]
            lines.append(f"| {c} | {want} | " + " | ".join(cells) + " |")
        fd = rep.get("fidelity")
        if fd:
            lines += ["", f"Fidelity: at guidance 1 every component within 10 points of the spec: {fd['ok_at_1']} "
                      f"(largest gap per concept: " + ", ".join(f"{c} {100 * v:.0f}" for c, v in fd["max_diff_at_1"].items())
                      + f"); at guidance {fd['guidance']:g} every component drawn in >= 10% of images: {fd['ok_at_guidance']} "
                      f"(smallest share: " + ", ".join(f"{c} {_pct(v)}" for c, v in fd["min_share_at_guidance"].items()) + ")."]
        other = rep.get("guidance_other", {}).get(gs[0])
        if other:
            lines += ["", f"What the images that show no component of the concept show instead, at guidance {float(gs[0]):g} (share of "
                      "all the concept's images, the three most frequent):", "",
                      "| concept | other | " + " | ".join(["most frequent"] * 3) + " |", "| --- | --- | --- | --- | --- |"]
            for c, d in other.items():
                cells = [f"{w} {_pct(x)}" for w, x in list(d.items())[:3]] + [""] * 3
                lines.append(f"| {c} | {_pct(rep['guidance_table'][gs[0]][c]['other'])} | " + " | ".join(cells[:3]) + " |")
    wf = rep.get("word_fidelity")
    if wf:
        gs = list(wf)
        lines += ["", f"Plain words: the share of images ({wf[gs[0]].get('n', 32)} per prompt, \"a photo of a red\", \"a photo of a red circle\") that "
                  "show what the prompt says, by the oracle. Colour-shape pairs: every colour with every shape; a word's "
                  "row: mean over its pairs; last rows: means over all pairs.", "",
                  "| prompt | " + " | ".join(f"guidance {float(g):g}: alone" for g in gs) + " | "
                  + " | ".join(f"guidance {float(g):g}: in pairs (both right)" for g in gs) + " |",
                  "| --- |" + " --- |" * (2 * len(gs))]
        words = list(wf[gs[0]]["words"])
        for w in words:
            alone = [_pct(wf[g]["words"][w]) for g in gs]
            paired = []
            for g in gs:
                ps = [v["both"] for key, v in wf[g]["pairs"].items() if w in key.split()]
                paired.append(_pct(float(np.mean(ps))) if ps else "-")
            lines.append(f"| {w} | " + " | ".join(alone) + " | " + " | ".join(paired) + " |")
        for part in ("both", "colour", "glyph"):
            name = {"both": "all pairs: both right", "colour": "all pairs: colour right", "glyph": "all pairs: shape right"}[part]
            lines.append(f"| {name} | " + " | ".join([""] * len(gs)) + " | "
                         + " | ".join(_pct(float(np.mean([v[part] for v in wf[g]["pairs"].values()]))) for g in gs) + " |")
    return lines


README_BEGIN, README_END = "<!-- evaluate --decompose: begin -->", "<!-- evaluate --decompose: end -->"


def load_models(model: str = "toy", device: str = "cpu"):
    """(pipeline, clip or None) for 'toy' or a folder trained by ``conceptor_nb.toyworld.train``
    (``pipeline/`` and ``clip/``; a pipeline folder without its own tokenizer gets the CLIP tokenizer)."""
    from pathlib import Path

    from ..models import load_clip, load_pipeline, prepare_pipeline

    if model == "toy":
        return load_pipeline("toy", device=device, dtype=torch.float32), load_clip("toy", device=device)
    root = Path(model)
    pdir = root / "pipeline" if (root / "pipeline").is_dir() else root
    if (pdir / "tokenizer").is_dir():
        pipe = load_pipeline(str(pdir), device=device, dtype=torch.float32)
    else:
        from diffusers import StableDiffusionPipeline

        from ..tiny import clip_tokenizer

        pipe = StableDiffusionPipeline.from_pretrained(pdir, torch_dtype=torch.float32, safety_checker=None,
                                                       requires_safety_checker=False, tokenizer=clip_tokenizer())
        pipe = prepare_pipeline(pipe, str(pdir), torch.device(device), torch.float32)
    clip = None
    if (root / "clip" / "config.json").exists():
        clip = load_clip(str(root / "clip"), device=device)
        if not (root / "clip" / "vocab.json").exists():  # saved without its tokenizer (the CLIP tokenizer)
            from ..tiny import clip_tokenizer

            clip.tokenizer = clip_tokenizer()
    return pipe, clip


def provenance(argv=None) -> str:
    """The command line and the machine a report came from."""
    import platform
    import sys

    args = " ".join(sys.argv[1:] if argv is None else argv)
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return f"python -m conceptor_nb.toyworld.evaluate {args} on {dev}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"


def parse_overrides(items) -> dict:
    """``["val_every=0", "null_threshold=none"]`` -> ``{"val_every": 0, "null_threshold": None}``, typed by
    the Settings fields (the same fields the CLI's flags come from)."""
    import typing

    from ..config import Settings

    hints = typing.get_type_hints(Settings)
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in hints:
            raise SystemExit(f"--set {item!r}: expected NAME=VALUE with NAME one of {sorted(hints)}")
        tp = hints[name]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        base = args[0] if args else tp
        if value.strip().lower() in ("none", "off") and type(None) in typing.get_args(tp):
            out[name] = None
        elif base is bool:
            out[name] = value.strip().lower() in ("1", "true", "yes", "on")
        elif name == "clip_templates":
            out[name] = tuple(x for x in value.split("|") if x)
        else:
            out[name] = base(value)
    return out


def write_readme_section(path, markdown: str) -> None:
    """Replace the text between the README's evaluate markers with ``markdown`` (append the section if absent)."""
    from pathlib import Path

    path = Path(path)
    text = path.read_text() if path.exists() else ""
    block = f"{README_BEGIN}\n{markdown}\n{README_END}"
    if README_BEGIN in text and README_END in text:
        text = text[: text.index(README_BEGIN)] + block + text[text.index(README_END) + len(README_END):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def main(argv=None):
    import argparse
    import json
    from pathlib import Path

    p = argparse.ArgumentParser(prog="python -m conceptor_nb.toyworld.evaluate",
                                description="Oracle report of a toy-world model; with --decompose, Conceptor's "
                                            "decompositions scored against the spec (issue 11's measurements).")
    p.add_argument("--model", default="toy", help="'toy' or a folder with pipeline/ and clip/ (as the training script writes)")
    p.add_argument("--spec", default=None, help="spec JSON (default: the shipped one)")
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--scheduler", default="dpm")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    p.add_argument("--decompose", action="store_true", help="decompose every hidden concept once per seed and score it")
    p.add_argument("--fidelity", action="store_true",
                   help="only what the model draws (guidance table, plain words) with the profile's sampler: a retrain's "
                        "quick check, minutes on a CPU")
    p.add_argument("--seeds", default="0,1,2", help="runs (each seed picks its own, disjoint concept images)")
    p.add_argument("--profile", default="toy", help="settings profile of the decompositions (toy, ci)")
    p.add_argument("--concepts", default=None, help="comma-separated subset of the spec's concepts")
    p.add_argument("--fit-steps", type=int, default=None, help="override the profile's fit steps")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="override one setting of the profile (repeatable), e.g. --set val_every=0 --set n_val=16")
    p.add_argument("--render-n", type=int, default=48, help="pseudo-token renders per run for the reconstruction table (0: none)")
    p.add_argument("--guidances", default="1,2,4,7.5", help="guidance table scales ('' for none)")
    p.add_argument("--guidance-n", type=int, default=128)
    p.add_argument("--cache", default=None, help="cache folder for concept images and dictionaries")
    p.add_argument("--diagnostic-seed", type=int, default=7,
                   help="run seed of the held-out images of the loss-by-noise-level diagnostic (-1: skip)")
    p.add_argument("--miss-repeats", type=int, default=20,
                   help="noise draws per image of the check of each missed drawn constituent (0: no check)")
    p.add_argument("--word-n", type=int, default=32,
                   help="images per plain-word prompt of the word fidelity table at guidance 1 and the profile's (0: none)")
    p.add_argument("--readme", default=None, help="write the Markdown into this README between the evaluate markers")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    spec = load_spec(a.spec)
    pipe, clip = load_models(a.model, a.device)
    t = time.time()
    if a.fidelity:
        from ..config import settings as profile_settings

        s = profile_settings(a.profile)
        if a.set:
            s = s.replace(**parse_overrides(a.set))
        gs = tuple(float(x) for x in a.guidances.split(",") if x.strip())
        rep = {"settings": {"profile": s.to_dict(), "model": a.model}}
        rep.update(model_fidelity(pipe, spec, s, gs, a.guidance_n, a.word_n, log=print))
        print("\n".join(fidelity_markdown(rep, spec)))
    elif a.decompose:
        from ..config import settings as profile_settings

        s = profile_settings(a.profile)
        if a.fit_steps:
            s = s.replace(steps=a.fit_steps)
        if a.set:
            s = s.replace(**parse_overrides(a.set))
        gs = tuple(float(x) for x in a.guidances.split(",") if x.strip())
        rep = decomposition_report(pipe, clip, spec, [int(x) for x in a.seeds.split(",")], settings=s,
                                   concepts=a.concepts.split(",") if a.concepts else None, render_n=a.render_n,
                                   guidances=gs, guidance_n=a.guidance_n, cache_dir=a.cache,
                                   partial_path=a.out + ".partial" if a.out else None,
                                   diagnostic_seed=None if a.diagnostic_seed < 0 else a.diagnostic_seed,
                                   miss_repeats=a.miss_repeats, word_n=a.word_n)
        md = report_markdown(rep, spec)
        print(md)
        if a.readme:
            write_readme_section(a.readme, md)
    else:
        rep = full_report(pipe, clip, spec, a.n, a.seed, steps=a.steps, guidance=a.guidance, sampler=a.scheduler)
    rep["eval_seconds"] = time.time() - t
    rep["provenance"] = provenance(argv)
    if a.out:
        Path(a.out).write_text(json.dumps(rep, indent=2, default=str))
        Path(a.out + ".partial").unlink(missing_ok=True)  # the run finished: its partial copy is not needed
    return rep


if __name__ == "__main__":
    main()
