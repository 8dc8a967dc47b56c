"""Semantic manipulation: set one coefficient of a decomposition and render with the same seeds (one
value, a sweep of values, or sliders in a notebook)."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from io import BytesIO

import pandas as pd
import torch

from ..checks import bad, check_float, check_int, check_pipe, check_seeds, check_token
from ..method.decomposition import check_decomposition
from ..method.generate import generate
from ..method.inject import template_prompt
from ..viz import axes, image_grid
from . import Saved


def set_coefficient(dec, token: str, value: float, *, tokenizer=None):
    """A copy of ``dec`` where ``token`` has coefficient ``value`` (see ``Decomposition.with_coefficient``)."""
    return check_decomposition("dec", dec).with_coefficient(token, value, tokenizer=tokenizer)


@dataclass
class Sweep(Saved):
    """Images of one decomposition with one token's coefficient set to several values, same seeds."""

    kind = "sweep"
    concept: str
    token: str
    values: list[float]
    seeds: list[int]
    images: torch.Tensor                   # (len(values), len(seeds), 3, H, W)
    scores: dict = field(default_factory=dict)   # name -> one number per value (e.g. a class share)

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"value": self.values, **self.scores})

    def plot(self, ax=None, n_seeds: int | None = None):
        """A strip: one column per value, one row per seed."""
        k = min(n_seeds or len(self.seeds), len(self.seeds))
        ax = axes(ax, (1.2 * len(self.values) + 1, 1.2 * k + 0.6))
        imgs = self.images[:, :k].transpose(0, 1).reshape(-1, *self.images.shape[2:])
        ax.imshow(image_grid(imgs, nrow=len(self.values)), interpolation="nearest")
        h = self.images.shape[-1] + 2
        ax.set_xticks([2 + h * i + h / 2 - 1 for i in range(len(self.values))], [f"{v:.3g}" for v in self.values])
        ax.set(yticks=[], xlabel=f"coefficient of '{self.token}'", title=f"{self.concept}: sweep of {self.token}")
        return ax


def sweep(pipe, dec, token: str, values, seeds, *, measure: dict | None = None, steps: int | None = None,
          batch_size: int = 16) -> Sweep:
    """Render ``dec`` with ``token``'s coefficient at each of ``values`` (same ``seeds``), in one batch.

    ``measure``: name -> function(images) -> number, evaluated per value (e.g. the share of images a
    classifier calls 'red').
    """
    check_pipe(pipe)
    check_decomposition("dec", dec)
    token = check_token("token", token)
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__") or not list(values):
        raise bad("values", values, "a non-empty list of coefficients (finite numbers >= 0)")
    values = [check_float(f"values[{i}]", v, 0.0) for i, v in enumerate(values)]
    seeds = check_seeds("seeds", seeds)
    steps = check_int("steps", steps, 1, 1000, allow_none=True)
    batch_size = check_int("batch_size", batch_size, 1)
    if measure is not None and (not isinstance(measure, dict) or not all(callable(f) for f in measure.values())):
        raise bad("measure", measure, "a dict of name -> function(images) -> number, or None")
    vecs = torch.stack([set_coefficient(dec, token, v, tokenizer=pipe.tokenizer).vector(pipe) for v in values])
    s = dec.settings
    images = generate(pipe, template_prompt(dec.template), seeds * len(values),
                      pseudo=vecs.repeat_interleave(len(seeds), dim=0), template=dec.template,
                      steps=steps or s.gen_steps, guidance=s.guidance, sampler=s.sampler, batch_size=batch_size,
                      verbose=False)
    images = images.reshape(len(values), len(seeds), *images.shape[1:])
    scores = {name: [float(fn(images[i])) for i in range(len(values))] for name, fn in (measure or {}).items()}
    return Sweep(dec.concept, token, values, seeds, images, scores)


class Panel:
    """Sliders for the top-k coefficients and a seed box; re-renders (debounced) on change.

    ``Panel(pipe, dec).widget`` is an ipywidgets box; display it in Jupyter. It is built without a front
    end too (nothing renders then), and ``panel.render()`` re-renders synchronously.
    """

    def __init__(self, pipe, dec, k: int = 6, seeds=(0, 1, 2, 3), debounce: float = 0.3, steps: int | None = None):
        import ipywidgets as w

        self.pipe, self.dec, self.debounce, self.steps = pipe, dec, debounce, steps
        self.tokens = [t for t, _ in dec.top(k)]
        hi = max(dec.coefficients[:k]) * 3 if dec.coefficients else 1.0
        self.sliders = [w.FloatSlider(value=c, min=0.0, max=hi, step=hi / 100, description=t, continuous_update=False,
                                      readout_format=".3f") for t, c in dec.top(k)]
        self.seed = w.Text(value=",".join(str(s) for s in seeds), description="seeds")
        self.image, self.status, self._timer = w.Image(format="png"), w.Label(), None
        for control in self.sliders + [self.seed]:
            control.observe(self._changed, names="value")
        self.widget = w.HBox([w.VBox(self.sliders + [self.seed, self.status]), self.image])
        self.render()

    def current(self):
        """The decomposition with the sliders' coefficients."""
        d = self.dec
        for token, slider in zip(self.tokens, self.sliders):
            d = set_coefficient(d, token, float(slider.value))
        return d

    def seeds(self) -> list[int]:
        try:
            return [int(x) for x in self.seed.value.replace(" ", "").split(",") if x][:8]
        except ValueError:
            self.status.value = "seeds: comma-separated integers"
            return []

    def render(self):
        seeds = self.seeds()
        if not seeds:
            return None
        images = self.current().render(self.pipe, seeds, steps=self.steps)
        buf = BytesIO()
        image_grid(images, nrow=len(seeds), upscale=max(1, 128 // images.shape[-1])).save(buf, format="png")
        self.image.value = buf.getvalue()
        self.status.value = f"rendered {len(seeds)} seed(s)"
        return images

    def _changed(self, _change):
        if self.debounce <= 0:
            self.render()
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = threading.Timer(self.debounce, self.render)
        self._timer.start()

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)


def panel(pipe, dec, k: int = 6, seeds=(0, 1, 2, 3), **kw) -> Panel:
    """An ipywidgets panel: sliders for the top-k coefficients, seeds, the rendered images."""
    return Panel(pipe, dec, k=k, seeds=seeds, **kw)
