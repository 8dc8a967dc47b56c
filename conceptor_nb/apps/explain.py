"""Single-image decomposition: which few of a concept's tokens made one image (see docs for how this
batched search differs from the authors' token-by-token walk)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
import torch

from ..checks import check_choice, check_float, check_int, check_pipe, check_seed
from ..clip import clip_for
from ..config import SAMPLERS
from ..method.decomposition import Decomposition, check_decomposition, check_fields
from ..method.fit import combine
from ..method.generate import generate
from ..method.inject import template_prompt, token_embeddings
from ..viz import axes, image_grid
from . import Saved


@dataclass
class ImageExplanation(Saved):
    """The tokens that explain one image, and how they were found."""

    kind = "image_explanation"
    concept: str
    seed: int
    kept: list[str]
    kept_coefficients: list[float]
    trace: list[dict]                      # pass, token, coefficient, similarity, dropped
    image: torch.Tensor                    # (3, H, W) the pseudo-token's image
    kept_image: torch.Tensor               # (3, H, W) from the kept tokens alone
    token_images: torch.Tensor             # (k, 3, H, W) the template with <token>, same seed
    kept_similarity: float = float("nan")  # CLIP similarity of kept_image to image
    settings: dict = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.trace, columns=["pass", "token", "coefficient", "similarity", "dropped"])

    def plot(self, ax=None, titles: bool = True):
        """One row: the image, the image from the kept tokens, one image per kept token (one axes: a strip)."""
        panels = [(self.image, "pseudo-token image"), (self.kept_image, " + ".join(self.kept) or "(nothing kept)")]
        panels += list(zip(self.token_images, self.kept))
        if ax is None:
            _, ax = plt.subplots(1, len(panels), figsize=(2 * len(panels), 2.3))
        ax = list(ax) if hasattr(ax, "__len__") else [ax]
        if len(ax) == 1 and len(panels) > 1:
            ax[0].imshow(image_grid(torch.stack([p for p, _ in panels]), nrow=len(panels)), interpolation="nearest")
            ax[0].set_axis_off()
            if titles:
                ax[0].set_title(" | ".join(t for _, t in panels), fontsize=8)
            return ax[0]
        for a, (img, title) in zip(ax, panels):
            a.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            a.set_axis_off()
            if titles:
                a.set_title(title, fontsize=9)
        return ax

    def plot_trace(self, ax=None):
        """Similarity of each candidate removal, pass by pass, with the threshold."""
        ax = axes(ax, (6, 3))
        frame = self.to_frame()
        frame["label"] = [f"{p}:{t}" for p, t in zip(frame["pass"], frame["token"])]
        sns.barplot(data=frame, x="label", y="similarity", hue="dropped", dodge=False, ax=ax,
                    palette={True: "C2", False: "C3"})
        ax.axhline(self.settings.get("threshold", 0.93), color="k", ls="--", lw=1)
        ax.set_ylim(min(0.5, float(frame["similarity"].min()) - 0.05) if len(frame) else 0.5, 1.0)
        ax.tick_params(axis="x", rotation=70, labelsize=7)
        ax.set_xlabel("pass:token removed")
        ax.set_title(f"seed {self.seed}: kept {', '.join(self.kept)}")
        return ax


def _duplicates(clip, tokens: list[str], threshold: float | None, template: str) -> list[set[int]]:
    """For each token, the indices of tokens whose CLIP text embedding has cosine > threshold with it."""
    if threshold is None or len(tokens) < 2:
        return [{i} for i in range(len(tokens))]
    f = clip.text_features([template.format(t) for t in tokens])
    sim = f @ f.T
    return [set((sim[i] > threshold).nonzero().flatten().tolist()) | {i} for i in range(len(tokens))]


def explain_image(pipe, dec: Decomposition, seed: int, *, clip=None, n_tokens: int | None = None,
                  threshold: float = 0.93, duplicate_threshold: float | None = 0.95, steps: int | None = None,
                  guidance: float | None = None, sampler: str | None = None, max_passes: int | None = None,
                  verbose: bool = False) -> ImageExplanation:
    """Which of ``dec``'s top tokens made the image of ``seed``.

    Each pass renders, in one batch, the image without each remaining token (and its near duplicates,
    CLIP text cosine > ``duplicate_threshold``), weakest first, and drops the weakest whose image keeps
    a CLIP image similarity above ``threshold``; it stops when no removal passes. ``clip``: the CLIP that
    scores similarity (default: the decomposition's, see ``clip_for``). ``guidance``: default the settings'
    ``explain_guidance``, else the concept images' guidance.
    """
    check_pipe(pipe)
    check_fields(check_decomposition("dec", dec), "dec", pipe)  # of this model, its tokens this model's
    seed = check_seed("seed", seed)
    n_tokens = check_int("n_tokens", n_tokens, 1, allow_none=True)
    threshold = check_float("threshold", threshold)  # outside [-1, 1]: drop every token, or none
    duplicate_threshold = check_float("duplicate_threshold", duplicate_threshold, allow_none=True)
    steps = check_int("steps", steps, 1, 1000, allow_none=True)
    guidance = check_float("guidance", guidance, 0.0, 100.0, allow_none=True)
    sampler = check_choice("sampler", sampler, SAMPLERS, allow_none=True)
    max_passes = check_int("max_passes", max_passes, 1, allow_none=True)
    clip = clip_for(pipe, clip or dec.clip or None)
    t0 = time.perf_counter()
    n = min(n_tokens or dec.n_tokens, len(dec.tokens))
    s = dec.settings
    if guidance is None:  # the toy profile renders these at a higher guidance than its concept images (docs/method.md)
        guidance = s.guidance if s.explain_guidance is None else s.explain_guidance
    kw = dict(steps=steps or s.gen_steps, guidance=guidance, sampler=sampler or s.sampler, template=dec.template,
              verbose=False)
    tokens = dec.tokens[:n]
    emb = token_embeddings(pipe, dec.token_ids[:n])
    coef = torch.tensor(dec.coefficients[:n], device=emb.device)
    dups = _duplicates(clip, tokens, duplicate_threshold, dec.template)
    prompt = template_prompt(dec.template)

    def render(masks: list[torch.Tensor]) -> torch.Tensor:
        vecs = torch.stack([combine(coef * m, emb, dec.norm) for m in masks])
        return generate(pipe, prompt, [seed] * len(masks), pseudo=vecs, **kw)

    keep = torch.ones(n, device=emb.device)
    image = render([keep])[0]
    target = clip.image_features(image[None])
    kept_image, kept_sim = image, 1.0
    trace = []
    for p in range(1, (max_passes or n) + 1):
        order = sorted((i for i in range(n) if keep[i] > 0), key=lambda i: float(coef[i]))  # weakest first
        if len(order) <= 1:
            break
        masks = [keep.clone().index_fill_(0, torch.tensor(sorted(dups[i]), device=keep.device), 0) for i in order]
        if all(float(m.sum()) == 0 for m in masks):
            break
        cands = render(masks)
        sims = (clip.image_features(cands) @ target.T).flatten().tolist()
        drop = next((j for j, sim in enumerate(sims) if sim > threshold and float(masks[j].sum()) > 0), None)
        trace += [{"pass": p, "token": tokens[i], "coefficient": float(coef[i]), "similarity": sims[j],
                   "dropped": j == drop} for j, i in enumerate(order)]
        if drop is None:
            break
        keep, kept_image, kept_sim = masks[drop], cands[drop], sims[drop]
        if verbose:
            print(f"pass {p}: dropped {tokens[order[drop]]} (similarity {sims[drop]:.3f})")
    kept_idx = [i for i in range(n) if keep[i] > 0]
    # "a photo of a <token>" == the token's own embedding in the template, unscaled
    token_images = generate(pipe, prompt, [seed] * len(kept_idx), pseudo=emb[kept_idx], **kw) if kept_idx else image[:0]
    return ImageExplanation(
        concept=dec.concept, seed=int(seed), kept=[tokens[i] for i in kept_idx],
        kept_coefficients=[float(coef[i]) for i in kept_idx], trace=trace,
        # each tensor owns its memory (on CPU .cpu() is the same tensor): safetensors refuses shared ones
        image=image.cpu().clone(), kept_image=kept_image.cpu().clone(), token_images=token_images.cpu(),
        kept_similarity=float(kept_sim),
        settings={"threshold": threshold, "duplicate_threshold": duplicate_threshold, "n_tokens": n,
                  "steps": kw["steps"], "guidance": kw["guidance"], "sampler": kw["sampler"],
                  "seconds": time.perf_counter() - t0},
    )
