"""Procedural renderer of the toy world: one coloured glyph on a tinted background.

Everything drawn comes from the spec (``spec.py``); this module only knows how
to paint ellipses, rectangles and polygons (anti-aliased by supersampling) and
how to sample a balanced, seeded dataset of (image, labels) records.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from .spec import Spec


def _prim_mask(prim: dict, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    kind, g = prim["kind"], prim["geo"]
    if kind == "ellipse":
        return ((u - g[0]) / g[2]) ** 2 + ((v - g[1]) / g[3]) ** 2 <= 1.0
    if kind == "rect":
        return (u >= g[0]) & (u <= g[2]) & (v >= g[1]) & (v <= g[3])
    inside = np.zeros(u.shape, dtype=bool)  # polygon: even-odd ray casting
    n = len(g)
    for i in range(n):
        (x1, y1), (x2, y2) = g[i], g[(i + 1) % n]
        if y1 == y2:
            continue
        cross = ((y1 > v) != (y2 > v)) & (u < (x2 - x1) * (v - y1) / (y2 - y1) + x1)
        inside ^= cross
    return inside


def render_glyph(spec: Spec, glyph: str, colour: str | tuple, rng: np.random.Generator,
                 *, half: float | None = None, center: tuple[float, float] | None = None,
                 background=None, jitter: bool = True) -> np.ndarray:
    """One image (H, W, 3) float32 in [0, 1]. ``colour``: a colour word or an RGB triple.

    Size (``half``, the glyph's half-width in pixels), position and background
    tint are drawn from ``rng`` unless given.
    """
    r = spec.render
    S, ss = spec.image_size, int(r["supersample"])
    if half is None:
        half = rng.uniform(*r["size_range"]) * S
    margin = float(r["margin"])
    if center is None:
        lo, hi = half + margin, S - half - margin
        center = (rng.uniform(lo, hi), rng.uniform(lo, hi)) if hi > lo else (S / 2, S / 2)
    if background is None:
        background = rng.uniform(*r["background_range"], size=3)
    rgb = np.asarray(spec.colours[colour] if isinstance(colour, str) else colour, dtype=np.float64)
    if jitter:
        rgb = np.clip(rgb + rng.uniform(-r["colour_jitter"], r["colour_jitter"], size=3), 0, 1)
    N = S * ss
    canvas = np.empty((N, N, 3), dtype=np.float64)
    canvas[:] = background
    cx, cy = center
    x0, x1 = max(0, int((cx - half) * ss) - 1), min(N, int((cx + half) * ss) + 2)
    y0, y1 = max(0, int((cy - half) * ss) - 1), min(N, int((cy + half) * ss) + 2)
    xs = ((np.arange(x0, x1) + 0.5) / ss - cx) / half
    ys = ((np.arange(y0, y1) + 0.5) / ss - cy) / half
    u, v = np.meshgrid(xs, ys)
    win = canvas[y0:y1, x0:x1]
    for prim in spec.glyphs[glyph]:
        fill = rgb if prim["fill"] == "main" else np.asarray(spec.fixed_colours[prim["fill"]])
        win[_prim_mask(prim, u, v)] = fill
    img = canvas.reshape(S, ss, S, ss, 3).mean(axis=(1, 3))
    noise = float(r["noise"])
    if jitter and noise > 0:
        img = img + rng.normal(0, noise, size=img.shape)
    return np.clip(img, 0, 1).astype(np.float32)


@dataclass(frozen=True)
class Record:
    """What one dataset image shows, and the words that may caption it."""

    kind: str  # attribute / object / concept
    glyph: str
    colour: str
    word: str  # the shape, object or concept word
    component: int = -1  # index of the concept's component, -1 otherwise


def _balanced(items: list, n: int, rng: np.random.Generator, weights=None) -> list:
    """``n`` items with exact (rounded) shares ``weights`` (default equal), in random order."""
    if n <= 0 or not items:
        return []
    w = np.ones(len(items)) if weights is None else np.asarray(weights, dtype=float)
    w = w / w.sum()
    counts = np.floor(w * n).astype(int)
    rest = n - counts.sum()
    order = np.argsort(-(w * n - counts), kind="stable")
    counts[order[:rest]] += 1
    out = list(itertools.chain.from_iterable([it] * int(c) for it, c in zip(items, counts)))
    perm = rng.permutation(len(out))
    return [out[i] for i in perm]


def sample_records(spec: Spec, n: int, seed: int) -> list[Record]:
    """A balanced list of ``n`` records: kinds, colours, shapes, objects and each concept's
    components in exactly (rounded) the spec's proportions, so the training set is the spec."""
    rng = np.random.default_rng([seed, 1])
    kinds = spec.sampling["kinds"]
    names = [k for k in ("attribute", "object", "concept") if kinds.get(k, 0) > 0]
    kind_list = _balanced(names, n, rng, [kinds[k] for k in names])
    counts = {k: kind_list.count(k) for k in names}
    recs: list[Record] = []
    pairs = list(itertools.product(spec.colour_words, spec.shape_words))
    for c, s in _balanced(pairs, counts.get("attribute", 0), rng):
        recs.append(Record("attribute", s, c, s))
    per_obj = _balanced(spec.object_words, counts.get("object", 0), rng)
    for o in spec.object_words:
        cols = spec.objects[o]["colours"]
        for c in _balanced(list(cols), per_obj.count(o), rng, list(cols.values())):
            recs.append(Record("object", spec.objects[o]["glyph"], c, o))
    per_con = _balanced(spec.concept_words, counts.get("concept", 0), rng)
    for w in spec.concept_words:
        con = spec.concepts[w]
        idx = _balanced(list(range(len(con.components))), per_con.count(w), rng, [x.weight for x in con.components])
        for i in idx:
            comp = con.components[i]
            colour = comp.colour
            if colour is None:  # object component: its own colour distribution
                obj = comp.words[-1]
                cols = spec.objects[obj]["colours"]
                colour = list(cols)[rng.choice(len(cols), p=np.array(list(cols.values())) / sum(cols.values()))]
            recs.append(Record("concept", comp.glyph, colour, w, i))
    perm = rng.permutation(len(recs))
    return [recs[i] for i in perm]


def render_record(spec: Spec, rec: Record, seed: int, index: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 2, index])
    return render_glyph(spec, rec.glyph, rec.colour, rng)


def render_dataset(spec: Spec, n: int, seed: int = 0, progress: bool = False):
    """(images uint8 (n, 3, S, S), records). Deterministic in (spec, n, seed)."""
    recs = sample_records(spec, n, seed)
    S = spec.image_size
    out = np.empty((len(recs), 3, S, S), dtype=np.uint8)
    for i, rec in enumerate(recs):
        img = render_record(spec, rec, seed, i)
        out[i] = np.round(img * 255).astype(np.uint8).transpose(2, 0, 1)
        if progress and i and i % 10000 == 0:
            print(f"  rendered {i}/{len(recs)}", flush=True)
    return out, recs


def render_word(spec: Spec, words: list[str] | str, n: int, seed: int = 0) -> np.ndarray:
    """``n`` float images (n, 3, S, S) of a prompt's words, e.g. ["red", "circle"], ["apple"],
    ["doctor"] (drawn from the concept's components by weight)."""
    if isinstance(words, str):
        words = words.split()
    rng = np.random.default_rng([seed, 3])
    colour = next((w for w in words if w in spec.colours), None)
    main = [w for w in words if w not in spec.colours]
    imgs = []
    for i in range(n):
        r = np.random.default_rng([seed, 4, i])
        if main and main[0] in spec.concepts:
            comps = spec.concepts[main[0]].components
            comp = comps[rng.choice(len(comps), p=[c.weight for c in comps])]
            g, c = comp.glyph, comp.colour or colour
            if c is None:
                cols = spec.objects[comp.words[-1]]["colours"]
                c = list(cols)[rng.choice(len(cols), p=np.array(list(cols.values())) / sum(cols.values()))]
        else:
            g = spec.glyph_of(main[0]) if main else spec.shape_words[rng.integers(len(spec.shape_words))]
            if colour is not None:
                c = colour
            elif main and main[0] in spec.objects:
                cols = spec.objects[main[0]]["colours"]
                c = list(cols)[rng.choice(len(cols), p=np.array(list(cols.values())) / sum(cols.values()))]
            else:
                c = spec.colour_words[rng.integers(len(spec.colour_words))]
        imgs.append(render_glyph(spec, g, c, r).transpose(2, 0, 1))
    return np.stack(imgs)
