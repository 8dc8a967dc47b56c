"""Scores against the spec, with the pixel oracle as the judge: what images show (component and
constituent shares), whether they show what a prompt says, and how a decomposition's tokens compare
with a concept's known constituents (recall@k, Spearman, top-k overlap and its chance level)."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from ..checks import parse_concept
from ..config import Settings, resolve
from ..method.dictionary import clean_token
from ..method.generate import generate
from .oracle import Oracle, Reading
from .spec import Spec, load_spec

GEN_BATCH = 64  # images per pipeline call when the evaluation generates (the shipped report's)


def toy_settings() -> Settings:
    """The settings of the toy world's profile: the active profile when it is one (toy, ci), else toy."""
    return resolve("toy", warn=False)[0].settings


def images_of(pipe, prompt: str, n: int, seed: int, **gen_kw) -> torch.Tensor:
    """``n`` images of ``prompt`` with the seeds ``seed .. seed+n-1`` (no progress bar); ``steps``, ``guidance``,
    ``sampler``: the toy profile's unless given."""
    s = toy_settings()
    kw = {"steps": s.gen_steps, "guidance": s.guidance, "sampler": s.sampler, **gen_kw}
    return generate(pipe, prompt, range(seed, seed + n), batch_size=GEN_BATCH, verbose=False, **kw)


def spec_and_oracle(spec, oracle):
    """The spec (a Spec, a path, or None: the shipped one) and an oracle for it (``oracle``, else a new one)."""
    spec = spec if isinstance(spec, Spec) else load_spec(spec)
    return spec, (oracle or Oracle(spec))


def generated_share(pipe, prompt: str, n: int = 32, seed: int = 0, *, spec: Spec | None = None,
                    oracle: Oracle | None = None, images: torch.Tensor | None = None, **gen_kw) -> dict:
    """Shares of oracle glyph and colour classes among ``n`` images generated for ``prompt``."""
    spec, oracle = spec_and_oracle(spec, oracle)
    rd = oracle(images_of(pipe, prompt, n, seed, **gen_kw) if images is None else images)
    n = len(rd)
    shares = lambda keys: {k: v / n for k, v in Counter(keys).most_common()}
    return {"prompt": prompt, "n": n, "glyph": shares(r.glyph for r in rd), "colour": shares(r.colour for r in rd),
            "pair": shares(f"{r.colour} {r.glyph}" for r in rd), "readings": rd}


def satisfies(reading: Reading, spec: Spec, words: list[str]) -> bool:
    """Does the image show every word of the prompt (colour, shape or object)?"""
    for w in words:
        if w in spec.colours:
            if reading.colour != w:
                return False
        elif w in spec.shapes or w in spec.objects:
            if reading.glyph != spec.glyph_of(w):
                return False
        elif w != spec.filler_word:
            raise ValueError(f"{w!r} is not an attribute or object word")
    return True


def reading_label(r: Reading) -> str:
    """An oracle reading as words: "orange circle", "blue lemon", "no glyph"."""
    if r.glyph is None:
        return "no glyph"
    return f"{r.colour} {r.glyph}" if r.colour else r.glyph


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
    """Component shares of a hidden concept's images (``images``, else ``n`` generated) against the spec's weights."""
    spec, oracle = spec_and_oracle(spec, oracle)
    if concept not in spec.concepts:
        raise KeyError(f"{concept!r} is not a concept of spec {spec.name!r}; concepts: {spec.concept_words}")
    con = spec.concepts[concept]
    prompt = prompt or spec.prompt(concept)
    rd = oracle(images_of(pipe, prompt, n, seed, **gen_kw) if images is None else images)
    comp = [oracle.component_of(r, concept) for r in rd]
    idx = Counter(comp)
    labels = [c.label for c in con.components]
    gen = {lab: idx.get(i, 0) / len(rd) for i, lab in enumerate(labels)}
    gen["other"] = idx.get(-1, 0) / len(rd)
    want = {lab: c.weight for lab, c in zip(labels, con.components)}
    diff = max(abs(gen[lab] - want[lab]) for lab in labels)
    other = Counter(reading_label(r) for r, i in zip(rd, comp) if i == -1)
    return MixtureResult(concept, prompt, len(rd), want, gen, diff, {k: v / len(rd) for k, v in other.most_common()})


def constituent_shares(spec: Spec, concept: str, generated: dict) -> dict:
    """{constituent: share of images that show it}, from component shares (``MixtureResult.generated``):
    a constituent is drawn in every image of each component whose words name it."""
    comps = spec.concepts[concept].components
    return {w: sum(generated.get(c.label, 0.0) for c in comps if w in c.words) for w in spec.concepts[concept].constituents}


def drawn_constituents(spec: Spec, concept: str, generated: dict, min_share: float = 0.10) -> list[str]:
    """The constituents shown in at least ``min_share`` of the images (the ones a decomposition can see)."""
    return [w for w, v in constituent_shares(spec, concept, generated).items() if v >= min_share - 1e-9]


def fidelity(table: dict, spec: Spec, *, guidance: float, tolerance: float = 0.10, min_share: float = 0.10) -> dict:
    """Target 4 of issue 11 read off a guidance table: at guidance 1 every spec component within ``tolerance``
    of its spec share; at ``guidance`` every component drawn in at least ``min_share`` of images."""
    g1 = table.get(1.0) or table.get(1)
    gp = table[float(guidance)]
    worst1 = {c: max(abs(r["generated"][k] - r["spec"][k]) for k in r["spec"]) for c, r in g1.items()} if g1 else {}
    least = {c: min(r["generated"][k] for k in r["spec"]) for c, r in gp.items()}
    return {"guidance": float(guidance), "max_diff_at_1": worst1, "min_share_at_guidance": least,
            "ok_at_1": bool(g1) and all(v <= tolerance + 1e-9 for v in worst1.values()),
            "ok_at_guidance": all(v >= min_share - 1e-9 for v in least.values())}


def fidelity_of(table: dict, spec: Spec, guidance: float) -> dict:
    """:func:`fidelity` of a guidance table as the report stores it (``{"1.0": {concept: generated}}``)."""
    full = {float(g): {c: {"generated": v, "spec": {x.label: x.weight for x in spec.concepts[c].components}}
                       for c, v in rows.items()} for g, rows in table.items()}
    return fidelity(full, spec, guidance=guidance)


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


def top_overlap(a: list[str], b: list[str]) -> float:
    """|a & b| / |a| for two top-k lists of equal length."""
    return len(set(a) & set(b)) / max(1, len(a))


def chance_overlap(k: int, dictionary_size: int) -> float:
    """Expected overlap of two random k-subsets of a dictionary of ``dictionary_size`` tokens: k / size."""
    return min(1.0, k / max(1, dictionary_size))


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
    :class:`conceptor_nb.Decomposition`) against the spec's constituents of ``concept`` (default
    ``dec.concept``, parsed as every concept is: "a photo of a fruit" and "a fruit" name "fruit")."""
    spec = spec if isinstance(spec, Spec) else load_spec(spec)
    concept = parse_concept(concept or getattr(dec, "concept", None) or "")[0]
    if concept not in spec.concepts:
        raise KeyError(f"{concept!r} is not a concept of spec {spec.name!r}; concepts: {spec.concept_words}")
    cons = spec.concepts[concept].constituents
    pairs = dec.top(k) if hasattr(dec, "top") else list(zip(dec.tokens, dec.coefficients))[:k]
    top = [(clean_token(t), float(c)) for t, c in pairs]
    top_words = [t for t, _ in top]
    found = [w for w in cons if w in top_words]
    coef = {}
    for t, c in zip(getattr(dec, "tokens", []), getattr(dec, "coefficients", [])):
        t = clean_token(t)
        coef[t] = max(coef.get(t, 0.0), abs(float(c)))
    for t, c in top:
        coef.setdefault(t, abs(c))
    rho = spearman([cons[w] for w in cons], [coef.get(w, 0.0) for w in cons])
    recall = len(found) / len(cons) if cons else math.nan
    return DecompositionScore(concept, k, recall, rho, found, [w for w in cons if w not in found], top, dict(cons))


def score_frame(decompositions, spec: Spec | str | None = None, k: int = 5) -> pd.DataFrame:
    """One row per decomposition of a hidden concept: recall@k beside its chance level (a random top k of the
    decomposition's dictionary), Spearman, found and missing constituents."""
    spec = spec if isinstance(spec, Spec) else load_spec(spec)
    rows = []
    for d in decompositions:
        sc = score_decomposition(d, spec, k=k)
        rows.append({"concept": sc.concept, f"recall@{k}": sc.recall_at_k,
                     "chance": chance_overlap(k, len(getattr(d, "tokens", [])) or k), "spearman": sc.spearman,
                     "found": ", ".join(sc.found), "missing": ", ".join(sc.missing),
                     "spec": ", ".join(f"{w} {v:g}" for w, v in sc.constituents.items())})
    return pd.DataFrame(rows)


def explanation_frame(explanations, spec: Spec | str | None = None) -> pd.DataFrame:
    """Single-image explanations (``explain_image``) against the oracle, one row per image: what it shows, the kept
    tokens, how many were dropped, whether the kept tokens name what it shows (an object of one colour names that
    colour too: "fish" names blue; no credit when nothing was dropped, which explains nothing), and the chance that
    as many tokens drawn at random from the explanation's top tokens would name it."""
    spec = spec if isinstance(spec, Spec) else load_spec(spec)
    oracle = Oracle(spec)
    colour = {w: next(iter(o["colours"])) for w, o in spec.objects.items() if len(o["colours"]) == 1}
    rows = []
    for e in explanations:
        seen = oracle.read(e.image).words(spec)
        names = lambda t: t in seen or colour.get(t) in seen  # noqa: E731
        top = list(dict.fromkeys(row["token"] for row in e.trace)) or list(e.kept)
        k, hits, dropped = len(e.kept), sum(map(names, top)), sum(row["dropped"] for row in e.trace)
        rows.append({"seed": e.seed, "oracle sees": ", ".join(sorted(seen)), "kept": ", ".join(e.kept),
                     "dropped": dropped, "agree": dropped > 0 and any(map(names, e.kept)),
                     "chance": 1 - math.comb(len(top) - hits, k) / math.comb(len(top), k) if k <= len(top) else 1.0})
    return pd.DataFrame(rows)
