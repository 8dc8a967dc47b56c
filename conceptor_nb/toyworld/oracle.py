"""Pixel oracles: what glyph, in what colour, a toy-world image shows.

No learning from labels of generated images: the background is the median of
the border pixels, the foreground is what differs from it, the glyph is the
nearest of per-glyph mean silhouettes (cropped to a square around the
foreground, mirror-tolerant), and the colour is a majority vote of the
foreground's core pixels over the spec's palette (fixed part colours such as
an apple's stem take part in the vote but cannot win).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .render import render_glyph
from .spec import Spec

T = 16  # silhouette side


@dataclass(frozen=True)
class Reading:
    glyph: str | None
    colour: str | None
    glyph_distance: float = float("nan")

    def words(self, spec: Spec) -> set[str]:
        """World words this image satisfies: its colour, its shape or object word."""
        out = set()
        if self.colour:
            out.add(self.colour)
        if self.glyph in spec.shapes:
            out.add(self.glyph)
        for o, d in spec.objects.items():
            if d["glyph"] == self.glyph:
                out.add(o)
        return out


def _as_hwc(img) -> np.ndarray:
    a = img.detach().cpu().float().numpy() if isinstance(img, torch.Tensor) else np.asarray(img, dtype=np.float32)
    if a.dtype == np.uint8 or a.max() > 1.5:
        a = a.astype(np.float32) / 255.0
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)
    return a


def foreground(img: np.ndarray):
    """(difference from the background (H, W), background RGB).

    The background is the median of the rings 1-2 px inside the edge; the outermost ring is
    ignored (glyphs keep a margin, and a VAE decoder leaves artefacts on the very edge)."""
    rings = [img[k] for k in (1, 2, -2, -3)] + [img[:, k] for k in (1, 2, -2, -3)]
    bg = np.median(np.concatenate(rings), axis=0)
    diff = np.abs(img - bg).max(axis=-1)
    diff[0, :] = diff[-1, :] = diff[:, 0] = diff[:, -1] = 0
    return diff, bg


def silhouette(diff: np.ndarray, thr: float = 0.12) -> np.ndarray | None:
    """The foreground, cropped to a square around it and resized to T x T (soft, in [0, 1]).
    Thresholds are relative to the glyph's own contrast, so blurred or faint images work."""
    contrast = float(np.percentile(diff, 99))
    if contrast < thr:
        return None
    fg = diff > max(thr, 0.4 * contrast)
    if fg.sum() < 4:
        return None
    ys, xs = np.nonzero(fg)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    side = max(y1 - y0, x1 - x0)
    soft = np.clip(diff / (0.8 * contrast), 0, 1)
    pad = side
    big = np.pad(soft, pad)
    cy, cx = (y0 + y1) / 2 + pad, (x0 + x1) / 2 + pad
    a, b = int(round(cy - side / 2)), int(round(cx - side / 2))
    crop = big[a : a + side, b : b + side]
    t = torch.from_numpy(np.ascontiguousarray(crop, dtype=np.float32))[None, None]
    return F.interpolate(t, size=(T, T), mode="bilinear", align_corners=False, antialias=True)[0, 0].numpy()


class Oracle:
    """Classifies the glyph and colour of toy-world images from their pixels."""

    def __init__(self, spec: Spec, n_templates: int = 24, seed: int = 12345):
        self.spec = spec
        self.glyph_names = list(spec.glyphs)
        rng = np.random.default_rng(seed)
        cols = spec.colour_words
        temps = []
        for g in self.glyph_names:
            acc = []
            for i in range(n_templates):
                img = render_glyph(spec, g, cols[i % len(cols)], rng)
                s = silhouette(foreground(img)[0])
                if s is not None:
                    acc.append(s)
            temps.append(np.mean(acc, axis=0))
        self.templates = np.stack(temps)  # (G, T, T)
        self.templates_flip = self.templates[:, :, ::-1]
        self.palette = np.array([spec.colours[c] for c in cols])
        self.fixed = np.array(list(spec.fixed_colours.values())).reshape(-1, 3)

    def read(self, img) -> Reading:
        a = _as_hwc(img)
        diff, _ = foreground(a)
        s = silhouette(diff)
        if s is None:
            return Reading(None, None)
        d = np.minimum(((self.templates - s) ** 2).mean(axis=(1, 2)), ((self.templates_flip - s) ** 2).mean(axis=(1, 2)))
        glyph = self.glyph_names[int(np.argmin(d))]
        core = a[diff > max(0.25, 0.5 * diff.max())]
        colour = None
        if len(core):
            allc = np.concatenate([self.palette, self.fixed]) if len(self.fixed) else self.palette
            near = np.argmin(((core[:, None, :] - allc[None]) ** 2).sum(-1), axis=1)
            votes = np.bincount(near, minlength=len(allc))[: len(self.palette)]
            if votes.sum() > 0:
                colour = self.spec.colour_words[int(np.argmax(votes))]
        return Reading(glyph, colour, float(d.min()))

    def __call__(self, images) -> list[Reading]:
        """Readings of a batch: tensor/array (N, 3, H, W) or (N, H, W, 3), floats in [0, 1] or uint8."""
        return [self.read(im) for im in images]

    def component_of(self, reading: Reading, concept: str) -> int:
        """Index of the concept's component the image shows, or -1 (something else)."""
        for i, comp in enumerate(self.spec.concepts[concept].components):
            if reading.glyph != comp.glyph:
                continue
            if comp.colour is None:
                obj = comp.words[-1]
                if reading.colour in self.spec.objects[obj]["colours"]:
                    return i
            elif reading.colour == comp.colour:
                return i
        return -1
