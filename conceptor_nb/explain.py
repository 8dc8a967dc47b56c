"""Single-image decomposition: which few tokens of a concept made this one image.

The authors' procedure: render the image from the pseudo-token with a seed;
walk the tokens from the weakest to the strongest, zero one (and its near
duplicates), re-render with the same seed, and drop it for good if the CLIP
image similarity to the original stays above a threshold; repeat until
nothing drops. Here each pass renders all of its candidates as one batch (one
batched render per pass instead of one render per token) and drops the weakest
token that passes; the next pass re-examines every remaining token. This is not
the walk's order: after a drop the walk goes on to stronger tokens, while the
next pass here looks at the weaker ones again first, so when several removals
pass, the two can keep different tokens.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .checks import SAMPLERS, check_choice, check_decomposition, check_float, check_int, check_pipe, check_seed
from .conceptor import Decomposition, combine
from .images import generate
from .inject import template_prompt, token_embeddings
from .results import load_result, save_result


@dataclass
class ImageExplanation:
    """The tokens that explain one image, and how they were found."""

    concept: str
    seed: int
    kept: list[str]
    kept_coefficients: list[float]
    trace: list[dict]                      # pass, token, similarity, dropped
    image: torch.Tensor                    # (3, H, W) the pseudo-token's image
    kept_image: torch.Tensor               # (3, H, W) from the kept tokens alone
    token_images: torch.Tensor             # (k, 3, H, W) "a photo of a <token>", same seed
    kept_similarity: float = float("nan")  # CLIP similarity of kept_image to image
    settings: dict = field(default_factory=dict)

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(self.trace, columns=["pass", "token", "coefficient", "similarity", "dropped"])

    def plot(self, ax=None, titles: bool = True):
        """One row: the image, the image from the kept tokens, one image per kept token."""
        import matplotlib.pyplot as plt

        panels = [(self.image, "concept image"), (self.kept_image, " + ".join(self.kept) or "(nothing kept)")]
        panels += [(img, tok) for img, tok in zip(self.token_images, self.kept)]
        if ax is None:
            _, ax = plt.subplots(1, len(panels), figsize=(2 * len(panels), 2.3))
        axes = list(ax) if hasattr(ax, "__len__") else [ax]
        if len(axes) == 1 and len(panels) > 1:  # one axes given: draw the row as one strip
            from .viz import image_grid

            axes[0].imshow(image_grid(torch.stack([p for p, _ in panels]), nrow=len(panels)), interpolation="nearest")
            axes[0].set_axis_off()
            if titles:
                axes[0].set_title(" | ".join(t for _, t in panels), fontsize=8)
            return axes[0]
        for a, (img, title) in zip(axes, panels):
            a.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            a.set_axis_off()
            if titles:
                a.set_title(title, fontsize=9)
        return axes

    def plot_trace(self, ax=None):
        """Similarity of each candidate removal, pass by pass, with the threshold."""
        import seaborn as sns

        if ax is None:
            import matplotlib.pyplot as plt

            _, ax = plt.subplots(figsize=(6, 3))
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

    def save(self, folder, overwrite: bool = False):
        return save_result(self, folder, "image_explanation", overwrite)

    @classmethod
    def load(cls, folder) -> "ImageExplanation":
        return load_result(cls, folder, "image_explanation")


def _duplicates(clip, tokens: list[str], threshold: float, template: str) -> list[set[int]]:
    """For each token, the indices of tokens whose CLIP text embedding has cosine > threshold with it."""
    if clip is None or threshold is None or len(tokens) < 2:
        return [{i} for i in range(len(tokens))]
    f = clip.text_features([template.format(t) for t in tokens])
    sim = f @ f.T
    return [set((sim[i] > threshold).nonzero().flatten().tolist()) | {i} for i in range(len(tokens))]


def explain_image(pipe, dec: Decomposition, seed: int, *, clip=None, n_tokens: int | None = None,
                  threshold: float = 0.93, duplicate_threshold: float | None = 0.95, steps: int | None = None,
                  guidance: float | None = None, sampler: str | None = None, max_passes: int | None = None,
                  verbose: bool = False) -> ImageExplanation:
    """Which of ``dec``'s top tokens made the image of ``seed``.

    ``clip``: the CLIP model that scores image similarity (default: the one that
    goes with the decomposition).
    """
    check_pipe(pipe)
    check_decomposition("dec", dec)
    seed = check_seed("seed", seed)
    n_tokens = check_int("n_tokens", n_tokens, 1, allow_none=True)
    threshold = check_float("threshold", threshold)  # outside [-1, 1]: drop every token, or none
    duplicate_threshold = check_float("duplicate_threshold", duplicate_threshold, allow_none=True)
    steps = check_int("steps", steps, 1, 1000, allow_none=True)
    guidance = check_float("guidance", guidance, 0.0, 100.0, allow_none=True)
    sampler = check_choice("sampler", sampler, SAMPLERS, allow_none=True)
    max_passes = check_int("max_passes", max_passes, 1, allow_none=True)
    if clip is None:
        from .config import default_clip_for
        from .models import load_clip

        clip = load_clip(dec.clip or default_clip_for(dec.model), device=pipe.device)
    t0 = time.perf_counter()
    n = min(n_tokens or dec.n_tokens, len(dec.tokens))
    s = dec.settings
    kw = dict(steps=steps or s.gen_steps, guidance=guidance or s.guidance, sampler=sampler or s.sampler,
              template=dec.template, verbose=False)
    tokens = dec.tokens[:n]
    emb = token_embeddings(pipe, dec.token_ids[:n])
    table = emb  # (device only)
    coef = torch.tensor(dec.coefficients[:n], device=table.device)
    dups = _duplicates(clip, tokens, duplicate_threshold, dec.template)
    prompt = template_prompt(dec.template)

    def render(masks: list[torch.Tensor]) -> torch.Tensor:
        vecs = torch.stack([combine(coef * m, emb, dec.norm) for m in masks])
        return generate(pipe, prompt, [seed] * len(masks), pseudo=vecs, **kw)

    keep = torch.ones(n, device=table.device)
    image = render([keep])[0]
    target = clip.image_features(image[None])
    kept_image, kept_sim = image, 1.0
    trace = []
    for p in range(1, (max_passes or n) + 1):
        active = [i for i in range(n) if keep[i] > 0]
        if len(active) <= 1:
            break
        order = sorted(active, key=lambda i: float(coef[i]))  # weakest first
        masks = []
        for i in order:
            m = keep.clone()
            m[list(dups[i])] = 0
            masks.append(m)
        if all(float(m.sum()) == 0 for m in masks):
            break
        cands = render(masks)
        sims = (clip.image_features(cands) @ target.T).flatten().tolist()
        drop = next((j for j, sim in enumerate(sims) if sim > threshold and float(masks[j].sum()) > 0), None)
        for j, i in enumerate(order):
            trace.append({"pass": p, "token": tokens[i], "coefficient": float(coef[i]), "similarity": sims[j],
                          "dropped": j == drop})
        if drop is None:
            break
        keep = masks[drop]
        kept_image, kept_sim = cands[drop], sims[drop]
        if verbose:
            print(f"pass {p}: dropped {tokens[order[drop]]} (similarity {sims[drop]:.3f})")
    kept_idx = [i for i in range(n) if keep[i] > 0]
    kept = [tokens[i] for i in kept_idx]
    one_hot = emb[kept_idx]  # "a photo of a <token>" == the token's own embedding in the template, unscaled
    token_images = generate(pipe, prompt, [seed] * len(kept_idx), pseudo=one_hot, **kw) if kept_idx else image[:0]
    return ImageExplanation(
        concept=dec.concept, seed=int(seed), kept=kept, kept_coefficients=[float(coef[i]) for i in kept_idx],
        # each tensor owns its memory (on CPU .cpu() is the same tensor): safetensors refuses shared ones
        trace=trace, image=image.cpu().clone(), kept_image=kept_image.cpu().clone(), token_images=token_images.cpu(),
        kept_similarity=float(kept_sim),
        settings={"threshold": threshold, "duplicate_threshold": duplicate_threshold, "n_tokens": n,
                  "steps": kw["steps"], "guidance": kw["guidance"], "sampler": kw["sampler"],
                  "seconds": time.perf_counter() - t0},
    )
