"""Bias: which value of an attribute a concept leans to (from its coefficients and from its images), and
mitigation by raising the under-represented value's coefficient. An *attribute* maps each value to its
words, e.g. ``{"man": ["man", "boy"], "woman": ["woman", "girl"]}``."""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
from matplotlib.colors import is_color_like

from ..checks import (as_images, bad, check_callable, check_float, check_int, check_pipe, check_seed, check_seeds,
                      check_template, pipeline_resolution)
from ..clip import clip_for
from ..config import TEMPLATE
from ..errors import InvalidInputError
from ..io import load_result, save_result
from ..method.decomposition import Decomposition, check_decomposition, check_fields
from ..viz import axes
from . import Saved

Classifier = Callable[[torch.Tensor], list]


def _check_attribute(attribute: dict, tokenizer=None, dec=None, *, single: bool = False) -> dict:
    """The attribute with its words stripped and lower-case; a word in two values is refused. With ``tokenizer``,
    a word of several tokens that is not one of ``dec``'s (it can never be a decomposition's token) is refused when
    ``single``, else warned of."""
    if not isinstance(attribute, dict) or len(attribute) < 2:
        raise bad("attribute", attribute,
                  "a dict mapping at least two values to word lists, e.g. {'man': ['man'], 'woman': ['woman']}")
    out, owner = {}, {}
    for value, words in attribute.items():
        words = [words] if isinstance(words, str) else list(words) if isinstance(words, (list, tuple, set)) else None
        if not words or not all(isinstance(w, str) and w.strip() for w in words):
            raise bad(f"attribute[{value!r}]", attribute[value], "a non-empty list of words")
        out[str(value)] = [w.strip().lower() for w in words]
        for w in out[str(value)]:
            if owner.setdefault(w, str(value)) != str(value):
                raise InvalidInputError(f"attribute: the word {w!r} is in two values, {owner[w]!r} and {str(value)!r}; "
                                        "give each value its own words")
    many = [(v, w, n) for v, ws in out.items() for w in ws
            if tokenizer is not None and w not in (dec.tokens if dec else ())
            and (n := len(tokenizer(w, add_special_tokens=False).input_ids)) != 1]
    if many and single:
        v, w, n = many[0]
        raise InvalidInputError(f"attribute[{v!r}]: {w!r} is {n} tokens in this model's vocabulary; mitigation raises "
                                "one token's coefficient, so give single-token words (e.g. 'woman', not 'businesswoman')")
    if many:
        warnings.warn(f"attribute words of several tokens ({', '.join(repr(w) for _, w, _ in many[:5])}) can never be "
                      "a decomposition's tokens: their coefficient share is 0 (the images are still classified by CLIP). "
                      "Check their spelling, or give single-token words", stacklevel=3)
    return out


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def zero_shot_classifier(clip, attribute: dict, template: str = TEMPLATE) -> Classifier:
    """A CLIP zero-shot classifier: each image goes to the value whose words' mean text embedding is closest."""
    attribute = _check_attribute(attribute)
    values = list(attribute)
    protos = torch.stack([torch.nn.functional.normalize(clip.text_features([template.format(w) for w in ws]).mean(0),
                                                        dim=0) for ws in attribute.values()])
    return lambda images: [values[i] for i in (clip.image_features(images) @ protos.T).argmax(-1).tolist()]


def shares(labels: list, values: list[str]) -> dict[str, float]:
    """Each value's share among the labels that are one of ``values`` (others, e.g. None, do not count)."""
    n = max(1, sum(1 for x in labels if x in values))
    return {v: sum(1 for x in labels if x == v) / n for v in values}


def coefficient_mass(dec: Decomposition, attribute: dict, n_tokens: int | None = None) -> dict[str, float]:
    """Each value's share of the top tokens' coefficient mass (the words of the value, summed)."""
    attribute = _check_attribute(attribute)
    top = dec.top(n_tokens)
    total = sum(c for _, c in top) or 1.0
    return {v: sum(c for t, c in top if t in ws) / total for v, ws in attribute.items()}


@dataclass
class BiasReport(Saved):
    """How a concept splits over the values of an attribute, measured two (or three) ways."""

    kind = "bias_report"
    concept: str
    values: list[str]
    coefficient_share: dict            # value -> share of the top-n coefficient mass
    image_share: dict                  # value -> share of images the CLIP zero-shot classifier assigns it
    image_ci: dict                     # value -> [low, high], 95% Wilson interval
    n_images: int
    oracle_share: dict | None = None   # value -> share by a ground-truth classifier, when there is one
    labels: list = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    @property
    def majority(self) -> str:
        return max(self.values, key=lambda v: self.image_share[v])

    def to_frame(self) -> pd.DataFrame:
        nan = float("nan")
        return pd.DataFrame([{"value": v, "coefficient_share": self.coefficient_share.get(v, nan),
                              "image_share": self.image_share[v], "ci_low": self.image_ci[v][0],
                              "ci_high": self.image_ci[v][1], "oracle_share": (self.oracle_share or {}).get(v, nan)}
                             for v in self.values])

    def plot(self, ax=None):
        """One group of bars per measure (coefficient mass; images by CLIP, with 95% intervals; images by the oracle,
        if any), one bar per value: each group is that measure's split over the values."""
        ax = axes(ax, (5, 3))
        f = self.to_frame()
        kinds = [("coefficient_share", "coefficient mass\n(top tokens)"), ("image_share", "images\n(CLIP)")]
        kinds += [("oracle_share", "images\n(oracle)")] if self.oracle_share else []
        w = 0.8 / len(f)
        for i, row in f.iterrows():
            x = [j + (i - (len(f) - 1) / 2) * w for j in range(len(kinds))]
            ax.bar(x, [row[col] for col, _ in kinds], width=w, label=row["value"],
                   color=row["value"] if is_color_like(row["value"]) else f"C{i}")
            ax.errorbar(x[1], row["image_share"], [[row["image_share"] - row["ci_low"]], [row["ci_high"] - row["image_share"]]],
                        color="k", capsize=3)
        ax.set_xticks(range(len(kinds)), [label for _, label in kinds])
        ax.set(ylim=(0, 1), ylabel="share of each measure", title=f"{self.concept}: bias")
        ax.legend(fontsize=8)
        return ax


def detect_bias(pipe, dec: Decomposition, attribute: dict, *, clip=None, images: torch.Tensor | None = None,
                n: int | None = None, seed: int | None = None, oracle: Classifier | None = None,
                class_template: str = TEMPLATE, cache_dir=None, verbose: bool = False) -> BiasReport:
    """Detect which value of ``attribute`` the concept leans to, from the coefficients and from images.

    ``images``: the concept's images (default: its generated training images, from the cache).
    ``oracle``: a ground-truth classifier, images -> values.
    """
    check_pipe(pipe)
    check_fields(check_decomposition("dec", dec), "dec", pipe)
    attribute = _check_attribute(attribute, pipe.tokenizer, dec)
    n = check_int("n", n, 1, allow_none=True)
    seed = check_seed("seed", seed, allow_none=True)
    check_callable("oracle", oracle)
    check_template("class_template", class_template)
    if images is not None:
        images = as_images(images, "images", pipeline_resolution(pipe))
    clip = clip_for(pipe, clip or dec.clip or None)
    if images is None:
        images = dec.concept_images(pipe, n or dec.settings.n_train, seed=seed, cache_dir=cache_dir, verbose=verbose)
    labels = zero_shot_classifier(clip, attribute, class_template)(images)
    values = list(attribute)
    counts = {v: sum(1 for x in labels if x == v) for v in values}
    return BiasReport(
        concept=dec.concept, values=values, coefficient_share=coefficient_mass(dec, attribute),
        image_share={v: counts[v] / max(1, len(labels)) for v in values},
        image_ci={v: list(wilson(counts[v], len(labels))) for v in values}, n_images=len(labels),
        oracle_share=shares(oracle(images), values) if oracle is not None else None, labels=list(labels),
        settings={"attribute": attribute, "class_template": class_template})


@dataclass
class Mitigation(Saved):
    """A rebalanced decomposition and the distributions before and after."""

    kind = "mitigation"
    concept: str
    target: dict                     # value -> wanted share
    token: str                       # the token whose coefficient was calibrated
    coefficient_before: float
    coefficient_after: float
    before: dict                     # value -> share in renders of the original decomposition
    after: dict                      # value -> share in renders of the mitigated one
    rounds: list[dict]               # coefficient tried -> measured shares (and identity)
    success: bool                    # the target met, and the identity kept when it was measured
    mitigated: Decomposition | None = None  # the rebalanced decomposition (saved in the subfolder mitigated/)
    settings: dict = field(default_factory=dict)
    identity_before: float | None = None  # share of renders that still show the concept (``identity``), if measured
    identity_after: float | None = None

    def to_frame(self) -> pd.DataFrame:
        """One row per value (its share of the images; target, before, after), and an ``identity`` row when the
        concept's identity was measured."""
        nan = float("nan")
        rows = [{"value": v, "target": self.target.get(v, nan), "before": self.before[v], "after": self.after[v]}
                for v in self.before]
        if self.identity_before is not None:
            rows.append({"value": "identity", "target": nan, "before": self.identity_before, "after": self.identity_after})
        return pd.DataFrame(rows)

    def plot(self, ax=None):
        """Before/after bars per value (and for the identity, hatched), with the target."""
        ax = axes(ax, (5, 3))
        f = self.to_frame()
        x = range(len(f))
        hatch = ["//" if v == "identity" else None for v in f["value"]]
        ax.bar([i - 0.2 for i in x], f["before"], width=0.4, label="before", color="C7", hatch=hatch)
        ax.bar([i + 0.2 for i in x], f["after"], width=0.4, label="after", color="C2", hatch=hatch)
        ax.scatter(list(x), f["target"], marker="_", s=600, color="k", label="target", zorder=3)
        ax.set_xticks(list(x), f["value"])
        ax.set(ylim=(0, 1), ylabel="share of images",
               title=f"{self.concept}: {self.token} {self.coefficient_before:.3g} -> {self.coefficient_after:.3g}")
        ax.legend(fontsize=8)
        return ax

    def save(self, folder, overwrite: bool = False):
        """``mitigation.json`` and the mitigated decomposition in ``mitigated/``."""
        folder = save_result(replace(self, mitigated=None), folder, self.kind, overwrite)
        if self.mitigated is not None:
            self.mitigated.save(Path(folder) / "mitigated", overwrite=overwrite)
        return folder

    @classmethod
    def load(cls, folder) -> "Mitigation":
        m = load_result(cls, folder, cls.kind)
        if (Path(folder) / "mitigated" / "decomposition.json").exists():
            m.mitigated = Decomposition.load(Path(folder) / "mitigated")
        return m


def mitigate_bias(pipe, dec: Decomposition, attribute: dict, target: dict | None = None, *,
                  classifier: Classifier | None = None, identity: Callable[[torch.Tensor], float] | None = None,
                  identity_tolerance: float = 0.1, clip=None, seeds=None, n: int = 32, tolerance: float = 0.05,
                  max_rounds: int = 8, steps: int | None = None, verbose: bool = False) -> Mitigation:
    """Raise the under-represented value's token until renders meet ``target`` (default: equal shares).

    The token: the value's strongest word in the decomposition's top ``n_tokens``, else its first word, added.
    Each round renders the same ``seeds`` and measures the shares with ``classifier`` (default: CLIP
    zero-shot); the coefficient is found by doubling, then bisection on the measured share.
    ``identity``: images -> the share that still show the concept (a doctor still a person); a coefficient whose
    renders lose more than ``identity_tolerance`` of it counts as too high, and is never the result.
    """
    check_pipe(pipe)
    check_fields(check_decomposition("dec", dec), "dec", pipe)
    attribute = _check_attribute(attribute, pipe.tokenizer, dec, single=True)  # before any image is rendered
    values = list(attribute)
    if target is not None and not isinstance(target, dict):
        raise bad("target", target, f"a dict giving a share for each of {values}, summing to 1, or None")
    target = dict(target or {v: 1 / len(values) for v in values})
    if set(target) != set(values) or not all(isinstance(v, (int, float)) and math.isfinite(v) and 0 <= v <= 1
                                             for v in target.values()) or abs(sum(target.values()) - 1) > 1e-6:
        raise bad("target", target, f"a share in [0, 1] for each of {values}, summing to 1")
    check_callable("classifier", classifier)
    check_callable("identity", identity)
    identity_tolerance = check_float("identity_tolerance", identity_tolerance, 0.0, 1.0)
    n = check_int("n", n, 1)
    tolerance = check_float("tolerance", tolerance, 0.0, 1.0, lo_open=True)
    max_rounds = check_int("max_rounds", max_rounds, 1, 100)
    steps = check_int("steps", steps, 1, 1000, allow_none=True)
    seeds = check_seeds("seeds", seeds) if seeds is not None else list(range(2_000_000, 2_000_000 + n))
    if classifier is None:
        classifier = zero_shot_classifier(clip_for(pipe, clip or dec.clip or None), attribute)
    t0 = time.perf_counter()
    kw = dict(steps=steps) if steps else {}

    def measure(d: Decomposition, c: float) -> dict:
        images = d.render(pipe, seeds, **kw)
        row = {"coefficient": c, **shares(classifier(images), values)}
        return {**row, "identity": float(identity(images))} if identity is not None else row

    rounds = [measure(dec, 0.0)]
    before = {v: rounds[0][v] for v in values}
    under = max(values, key=lambda v: target[v] - before[v])
    present = [(t, c) for t, c in dec.top() if t in attribute[under]]
    token, c0 = present[0] if present else (attribute[under][0], 0.0)
    rounds[0]["coefficient"] = c0
    kept = lambda r: identity is None or r["identity"] >= rounds[0]["identity"] - identity_tolerance  # noqa: E731
    best = (abs(before[under] - target[under]), rounds[0])
    lo, hi = c0, None
    c = max(c0 * 2, max(dec.coefficients[: dec.n_tokens]) * 0.5)
    for _ in range(max_rounds):
        if best[0] <= tolerance:
            break
        r = measure(dec.with_coefficient(token, c, tokenizer=pipe.tokenizer), c)
        rounds.append(r)
        if verbose:
            print(f"{token} = {c:.4g}: {r}")
        gap = r[under] - target[under]
        if kept(r) and abs(gap) < best[0]:
            best = (abs(gap), r)
        if gap < 0 and kept(r):
            lo = c
            c = c * 2 if hi is None else (lo + hi) / 2
        else:  # past the target, or so far that the renders stop showing the concept
            hi = c
            c = (lo + hi) / 2
    gap, chosen = best
    c_best = chosen["coefficient"]
    return Mitigation(
        concept=dec.concept, target=target, token=token, coefficient_before=c0, coefficient_after=c_best,
        before=before, after={v: chosen[v] for v in values}, rounds=rounds, success=gap <= tolerance,
        mitigated=dec.with_coefficient(token, c_best, tokenizer=pipe.tokenizer) if c_best != c0 else dec,
        settings={"attribute": attribute, "seeds": seeds, "tolerance": tolerance,
                  "identity_tolerance": identity_tolerance if identity is not None else None,
                  "seconds": time.perf_counter() - t0},
        identity_before=rounds[0].get("identity"), identity_after=chosen.get("identity"),
    )
