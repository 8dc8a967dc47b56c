"""Settings profiles, selected by one environment variable.

``CONCEPTOR_PROFILE`` picks the model and the sizes every stage uses when a
caller does not pass them:

* ``toy`` (default): the shipped toy world (``conceptor_nb/data/toyworld``), sizes that run
  on a laptop CPU in about a minute per concept.
* ``ci``: the toy world with fewer images and steps, for notebooks under CI.
* ``sd``: Stable Diffusion 2.1-base with CLIP ViT-B/32 and the authors'
  settings (see ``shared/REFERENCE.md``); needs the checkpoints and a GPU.

Every value is also a keyword argument of the function that uses it, so a
profile is only a set of defaults.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ENV_PROFILE = "CONCEPTOR_PROFILE"
ENV_CACHE = "CONCEPTOR_CACHE"
ENV_DATA = "CONCEPTOR_DATA"

PACKAGE_DATA = Path(__file__).resolve().parent / "data"  # shipped inside the package (wheel included)

# The 27 templates the authors average over when embedding a vocabulary token
# with CLIP (the "imagenet_templates_small" list of textual inversion).
CLIP_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}",
    "a cropped photo of a {}", "a photo of the {}", "a good photo of the {}", "a photo of one {}",
    "a close-up photo of the {}", "a rendition of the {}", "a photo of the clean {}",
    "a rendition of a {}", "a photo of a nice {}", "a good photo of a {}", "a photo of the nice {}",
    "a photo of the small {}", "a photo of the weird {}", "a photo of the large {}",
    "a photo of a cool {}", "a photo of a small {}",
)


@dataclass(frozen=True)
class Settings:
    """Defaults for every stage. Field names match the keyword arguments."""

    model: str = "toy"
    clip: str | None = None          # None: the CLIP that goes with ``model``
    template: str = "a photo of a {}"
    # concept images
    n_train: int = 100
    n_val: int = 20
    gen_steps: int = 50
    guidance: float = 7.5
    gen_scheduler: str = "lms"
    # dictionary
    dict_size: int = 5000
    clip_templates: tuple[str, ...] = CLIP_TEMPLATES
    exclude_threshold: float | None = 0.9
    null_threshold: float | None = None  # drop tokens CLIP reads as no word (toy world only; not the authors')
    # fit
    n_tokens: int = 50
    steps: int = 500
    batch_size: int = 6
    lr: float = 1e-3
    weight_decay: float = 1e-2
    sparsity: float = 1e-3
    mlp_hidden: int = 100
    val_every: int = 50
    val_steps: int = 50
    val_scheduler: str = "dpm"
    flip: bool = True
    # precision of the fit's UNet pass: "off" (the weights' dtype), "bf16" (autocast),
    # "auto" (bf16 autocast when the weights are float32 and the device computes bf16 natively:
    # a CUDA GPU with bf16, or a CPU with AVX512-BF16/AMX). The text encoder, the MLP, generation and
    # validation stay in the weights' dtype.
    autocast: str = "off"
    seed: int = 0

    def replace(self, **kw) -> "Settings":
        return replace(self, **kw)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["clip_templates"] = list(self.clip_templates)
        return d


# The authors' release: SD 2.1-base, 100/20 images, N=5000, n=50, 500 steps; the fit's UNet pass autocasts
# to bf16 where the hardware computes it natively (the release runs fp32).
SD = Settings(model="stabilityai/stable-diffusion-2-1-base", clip="openai/clip-vit-base-patch32", autocast="auto")

# The toy world: 32 px images, a few hundred words that matter. Guidance 1.5, chosen from the guidance table
# in data/toyworld/README.md: higher scales make the model drop the concepts' minority components (at 4, leaf's
# orange triangle 2%), lower ones leave a third of the images unresolved.
TOY = Settings(
    model="toy", clip="toy", n_train=48, n_val=8, gen_steps=20, guidance=1.5, gen_scheduler="dpm",
    dict_size=100, null_threshold=0.8, clip_templates=("a photo of a {}",), n_tokens=10, steps=300, batch_size=6,
    val_every=50, val_steps=15,
)
CI = TOY.replace(n_train=24, n_val=4, gen_steps=12, steps=150, val_every=50, val_steps=10)

# A random SD-shaped pipeline built from config: tests and ``--model tiny``.
TINY = Settings(
    model="tiny", clip="tiny", n_train=8, n_val=2, gen_steps=4, guidance=3.0, gen_scheduler="dpm",
    dict_size=64, clip_templates=("a photo of a {}",), n_tokens=8, steps=10, batch_size=2,
    val_every=5, val_steps=3,
)

PROFILES = {"toy": TOY, "ci": CI, "sd": SD, "tiny": TINY}


def profile_name() -> str:
    name = os.environ.get(ENV_PROFILE, "toy").strip().lower() or "toy"
    if name not in PROFILES:
        raise ValueError(f"{ENV_PROFILE}={name!r} is not a profile; choose one of {sorted(PROFILES)}")
    return name


def settings(profile: str | None = None) -> Settings:
    """The settings of ``profile`` (default: the ``CONCEPTOR_PROFILE`` variable, else ``toy``)."""
    name = profile or profile_name()
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}")
    return PROFILES[name]


def settings_for_model(model: str | None) -> Settings:
    """The profile's settings, or the tiny ones when the model is the random tiny pipeline."""
    if model == "tiny":
        return TINY
    s = settings()
    return s if model is None else s.replace(model=model)


def data_dir() -> Path:
    """The toy world and the CLIP tokenizer: the package's own ``data/`` (``CONCEPTOR_DATA`` overrides)."""
    return Path(os.environ.get(ENV_DATA, PACKAGE_DATA))


def figures_dir() -> Path:
    """Where notebooks save figures: ``CONCEPTOR_FIGURES`` if set (``scripts/make_figures.py`` sets it to
    the repository's ``figures/``), else ``figures/<profile>`` in the cache, so that no run writes into
    the source tree by default."""
    if os.environ.get("CONCEPTOR_FIGURES"):
        return Path(os.environ["CONCEPTOR_FIGURES"])
    return cache_dir() / "figures" / profile_name()


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "conceptor_nb"
    return Path(os.environ.get(ENV_CACHE, default))
