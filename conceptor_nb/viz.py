"""Plots and image grids. Every plot takes ``ax=`` and returns it."""
from __future__ import annotations

import math
import random

import matplotlib.pyplot as plt
from matplotlib.colors import is_color_like
import torch
from PIL import Image



def axes(ax=None, figsize=(6, 3)):
    """``ax``, or the axes of a new figure of ``figsize``."""
    return plt.subplots(figsize=figsize)[1] if ax is None else ax


def image_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2, upscale: int = 1) -> Image.Image:
    """A PIL image of float images (N, 3, H, W) in [0, 1], ``nrow`` to a row, on white."""
    n, _, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    canvas = torch.ones(3, math.ceil(n / nrow) * (h + pad) + pad, nrow * (w + pad) + pad)
    for i, img in enumerate(images.detach().float().cpu().clamp(0, 1)):
        top, left = pad + (i // nrow) * (h + pad), pad + (i % nrow) * (w + pad)
        canvas[:, top: top + h, left: left + w] = img
    im = Image.fromarray((canvas * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
    return im.resize((im.width * upscale, im.height * upscale), Image.NEAREST) if upscale > 1 else im


def show_images(images: torch.Tensor, ax=None, nrow: int | None = None, title: str | None = None):
    ax = axes(ax, (4, 4))
    ax.imshow(image_grid(images, nrow=nrow), interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return ax


def coefficient_bars(dec, k: int = 10, ax=None, color: str = "C0"):
    """Horizontal bars of the top-k coefficients; error bars: the spread across fits (where there are several);
    grey: tokens the significance test does not support."""
    ax = axes(ax, (5, 0.3 * k + 1))
    f = dec.to_frame(k)
    colours = ["lightgrey" if s is False else color for s in f["supported"]]
    ax.barh(range(len(f)), f["coefficient"], xerr=None if f["spread"].isna().all() else f["spread"], color=colours,
            error_kw={"ecolor": "black", "capsize": 2})
    ax.set_yticks(range(len(f)), f["token"])
    ax.invert_yaxis()
    note = "; grey: not supported by the test" if (f["supported"] == False).any() else ""  # noqa: E712
    ax.set_title(f"{dec.concept}: top {len(f)} tokens{note}")
    ax.set_xlabel("coefficient" + (" (mean +- sd over fits)" if not f["spread"].isna().all() else ""))
    return ax


def word_picture(dec, k: int = 8, ax=None, min_size: float = 9, max_size: float = 30):
    """The paper-style picture: the top words, font size by coefficient; a colour word in its colour, words the
    significance test does not support in grey italics."""
    ax = axes(ax, (6, 2.5))
    top, ok = dec.top(k), dec.supported()
    if not top:
        return ax
    hi = max(c for _, c in top) or 1.0
    rnd = random.Random(0)
    n = len(top)
    cols = math.ceil(math.sqrt(2 * n))
    col_pts = ax.get_position().width * ax.figure.get_figwidth() * 72 / cols
    # one common factor, so that every word fits its column and sizes stay proportional
    wanted = [(min_size + (max_size - min_size) * c / hi) * 0.65 * max(3, len(t)) for t, c in top]
    shrink = min(1.0, col_pts / max(wanted))
    for i, (token, c) in enumerate(top):
        r, col = divmod(i, cols)
        x = (col + 0.5) / cols + rnd.uniform(-0.04, 0.04)
        y = 1 - (r + 0.5) / math.ceil(n / cols) + rnd.uniform(-0.05, 0.05)
        word = token.replace("</w>", "")
        colour = "lightgrey" if ok[i] is False else {"yellow": "goldenrod", "white": "silver"}.get(word, word) \
            if is_color_like(word) and word.isalpha() else "black"
        ax.text(x, y, token, fontsize=(min_size + (max_size - min_size) * c / hi) * shrink, ha="center",
                va="center", color=colour, fontweight="bold" if i < 3 else "normal",
                fontstyle="italic" if ok[i] is False else "normal")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_axis_off()
    ax.set_title(f'"{dec.concept}"' + (" (grey: not supported)" if False in ok[:n] else ""))
    return ax
