"""Semantic manipulation: edit one coefficient of a decomposition and render with the same seeds."""
from __future__ import annotations

import copy


def _token_id(tokenizer, token: str) -> int:
    ids = tokenizer(token, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(f"{token!r} is {len(ids)} tokens in this vocabulary; give a single-token word")
    return ids[0]


def set_coefficient(dec, token: str, value: float, *, tokenizer=None):
    """A copy of ``dec`` where ``token`` has coefficient ``value``.

    The explanation (the first ``n_tokens``) keeps its tokens; a token from
    outside it (the dictionary's tail, or a new word, which needs ``tokenizer``)
    joins it. ``value=0`` removes a token's contribution.
    """
    import math
    import numbers

    from .checks import bad, check_decomposition, check_token

    check_decomposition("dec", dec)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise bad("value", value, "a finite non-negative number (coefficients are alpha = |f(w)|)")
    value = float(value)
    token = check_token("token", token)
    new = copy.deepcopy(dec)
    n = new.n_tokens
    if token in new.tokens:
        i = new.tokens.index(token)
        tid, score = new.token_ids[i], (new.dictionary_scores[i] if new.dictionary_scores else float("nan"))
        for lst in (new.tokens, new.token_ids, new.coefficients) + ((new.dictionary_scores,) if new.dictionary_scores else ()):
            del lst[i]
        if i < n:
            n -= 1
    else:
        if tokenizer is None:
            raise ValueError(f"{token!r} is not in the decomposition's dictionary; pass tokenizer= to add it")
        tid, score = _token_id(tokenizer, token), float("nan")
    # insert at the end of the explanation, then order the explanation by coefficient
    new.tokens.insert(n, token)
    new.token_ids.insert(n, int(tid))
    new.coefficients.insert(n, float(value))
    if new.dictionary_scores:
        new.dictionary_scores.insert(n, score)
    n += 1
    order = sorted(range(n), key=lambda j: -new.coefficients[j])
    for name in ("tokens", "token_ids", "coefficients") + (("dictionary_scores",) if new.dictionary_scores else ()):
        lst = getattr(new, name)
        lst[:n] = [lst[j] for j in order]
    new.n_tokens = n
    new.history = {**new.history, "edits": new.history.get("edits", []) + [{"token": token, "value": float(value)}]}
    return new


# --- sweeps ---------------------------------------------------------------------------------------
from dataclasses import dataclass, field  # noqa: E402

import torch  # noqa: E402

from .results import load_result, save_result  # noqa: E402


@dataclass
class Sweep:
    """Images of one decomposition with one token's coefficient set to several values, same seeds."""

    concept: str
    token: str
    values: list[float]
    seeds: list[int]
    images: torch.Tensor                   # (len(values), len(seeds), 3, H, W)
    scores: dict = field(default_factory=dict)   # name -> one number per value (e.g. a class share)

    def to_frame(self):
        import pandas as pd

        frame = pd.DataFrame({"value": self.values})
        for name, col in self.scores.items():
            frame[name] = col
        return frame

    def plot(self, ax=None, n_seeds: int | None = None):
        """A strip: one column per value, one row per seed."""
        import matplotlib.pyplot as plt

        from .viz import image_grid

        k = min(n_seeds or len(self.seeds), len(self.seeds))
        imgs = self.images[:, :k].transpose(0, 1).reshape(-1, *self.images.shape[2:])
        if ax is None:
            _, ax = plt.subplots(figsize=(1.2 * len(self.values) + 1, 1.2 * k + 0.6))
        ax.imshow(image_grid(imgs, nrow=len(self.values)), interpolation="nearest")
        h = self.images.shape[-1] + 2
        ax.set_xticks([2 + h * i + h / 2 - 1 for i in range(len(self.values))], [f"{v:.3g}" for v in self.values])
        ax.set_yticks([])
        ax.set_xlabel(f"coefficient of '{self.token}'")
        ax.set_title(f"{self.concept}: sweep of {self.token}")
        return ax

    def save(self, folder, overwrite: bool = False):
        return save_result(self, folder, "sweep", overwrite)

    @classmethod
    def load(cls, folder) -> "Sweep":
        return load_result(cls, folder, "sweep")


def sweep(pipe, dec, token: str, values, seeds, *, measure: dict | None = None, steps: int | None = None,
          batch_size: int = 16) -> Sweep:
    """Render ``dec`` with ``token``'s coefficient at each of ``values`` (same ``seeds``), in one batch.

    ``measure``: name -> function(images) -> number, evaluated per value (e.g.
    the share of images a classifier calls 'red').
    """
    from .images import generate
    from .inject import template_prompt

    from .checks import bad, check_decomposition, check_float, check_int, check_pipe, check_seeds, check_token

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
    decs = [set_coefficient(dec, token, v, tokenizer=pipe.tokenizer) for v in values]
    vecs = torch.stack([d.vector(pipe) for d in decs]).repeat_interleave(len(seeds), dim=0)
    s = dec.settings
    images = generate(pipe, template_prompt(dec.template), seeds * len(values), pseudo=vecs, template=dec.template,
                      steps=steps or s.gen_steps, guidance=s.guidance, sampler=s.sampler,
                      batch_size=batch_size, verbose=False)
    images = images.reshape(len(values), len(seeds), *images.shape[1:])
    scores = {name: [float(fn(images[i])) for i in range(len(values))] for name, fn in (measure or {}).items()}
    return Sweep(dec.concept, token.strip().lower(), values, seeds, images, scores)


# --- interactive panel ----------------------------------------------------------------------------
class Panel:
    """Sliders for the top-k coefficients and a seed box; re-renders (debounced) on change.

    ``Panel(pipe, dec).widget`` is an ipywidgets box; display it in Jupyter. It
    is built without a front end too (nothing renders then), and
    ``panel.render()`` re-renders synchronously.
    """

    def __init__(self, pipe, dec, k: int = 6, seeds=(0, 1, 2, 3), debounce: float = 0.3, steps: int | None = None):
        import ipywidgets as w

        self.pipe, self.dec, self.debounce, self.steps = pipe, dec, debounce, steps
        self.tokens = [t for t, _ in dec.top(k)]
        hi = max(dec.coefficients[:k]) * 3 if dec.coefficients else 1.0
        self.sliders = [w.FloatSlider(value=c, min=0.0, max=hi, step=hi / 100, description=t, continuous_update=False,
                                      readout_format=".3f") for t, c in dec.top(k)]
        self.seed = w.Text(value=",".join(str(s) for s in seeds), description="seeds")
        self.image = w.Image(format="png")
        self.status = w.Label()
        self._timer = None
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
            seeds = [int(x) for x in self.seed.value.replace(" ", "").split(",") if x]
        except ValueError:
            self.status.value = "seeds: comma-separated integers"
            return []
        return seeds[:8]

    def render(self):
        import io

        from .viz import image_grid

        seeds = self.seeds()
        if not seeds:
            return None
        images = self.current().render(self.pipe, seeds, steps=self.steps)
        buf = io.BytesIO()
        image_grid(images, nrow=len(seeds), upscale=max(1, 128 // images.shape[-1])).save(buf, format="png")
        self.image.value = buf.getvalue()
        self.status.value = f"rendered {len(seeds)} seed(s)"
        return images

    def _changed(self, _change):
        if self.debounce <= 0:
            self.render()
            return
        import threading

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
