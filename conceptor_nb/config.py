"""Settings and profiles: the one place where defaults live.

Two things are kept apart:

* **model identity**: which diffusion pipeline and which CLIP (:class:`Profile` ``.model`` / ``.clip``);
* **method hyper-parameters**: :class:`Settings` (sizes, steps, learning rate, samplers, ...).

A profile binds the two. ``CONCEPTOR_PROFILE`` picks the active one:

* ``toy`` (default): the shipped toy world (``conceptor_nb/data/toyworld``), sizes that run on a
  laptop CPU in about a minute per concept.
* ``ci``: the toy world with fewer images and steps, for notebooks under CI.
* ``sd``: Stable Diffusion 2.1-base with CLIP ViT-B/32 and the authors' settings (the paper's
  release); needs the checkpoints in the local Hugging Face cache, and a GPU to be practical.
* ``tiny``: a random SD-shaped pipeline built from config (meaningless weights, for tests).

Naming a model picks the profile of its family (:func:`resolve`): ``"toy"`` keeps ``toy``/``ci``,
``"tiny"`` takes ``tiny``, anything else (a hub id, a folder, a ``.safetensors`` file) takes
``sd`` with the CLIP that goes with it. Every :class:`Settings` field is a keyword of
:func:`conceptor_nb.decompose` and a flag of ``conceptor decompose`` (generated from the fields).
"""
from __future__ import annotations

import os
import sys
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
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

SAMPLERS = ("dpm", "lms", "ddim", "euler", "pndm")
AUTOCAST = ("off", "bf16", "auto")
VOCAB_PRECISIONS = ("fp32", "bf16", "auto")


def _f(default, help: str, **meta):
    """A Settings field with its help text (and choices) for the generated CLI flags."""
    meta["help"] = help
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Settings:
    """The method's hyper-parameters. Field names are the keyword arguments of ``decompose``."""

    template: str = _f("a photo of a {}", "prompt template; '{}' is the concept (and the pseudo-token)")
    # concept images
    n_train: int = _f(100, "training images of the concept")
    n_val: int = _f(20, "validation images of the concept")
    gen_steps: int = _f(50, "sampling steps for the concept images and renders")
    guidance: float = _f(7.5, "classifier-free guidance scale")
    sampler: str = _f("lms", "sampler for the concept images and renders", choices=SAMPLERS)
    # dictionary
    dict_size: int = _f(5000, "dictionary size N (tokens ranked by CLIP)")
    clip_templates: tuple = _f(CLIP_TEMPLATES, "templates averaged when CLIP embeds a token "
                               "('authors': the 27 of the paper)")
    exclude_threshold: float | None = _f(0.9, "drop tokens whose CLIP text cosine with the concept word is "
                                         "above this ('none': keep them)")
    vocab_precision: str = _f("fp32", "precision of the one-time CLIP vocabulary embedding (bf16: its matrix "
                              "products in bf16; auto: bf16 where the hardware computes it natively); cached apart",
                              choices=VOCAB_PRECISIONS)
    null_threshold: float | None = _f(None, "drop tokens CLIP reads as no word (cosine with the empty template "
                                      "above this; toy world only, not the authors' method; 'none': off)")
    # fit
    n_tokens: int = _f(50, "explanation tokens n (the sparsity term's top-n)")
    steps: int = _f(500, "fit steps")
    batch_size: int = _f(6, "fit batch size")
    lr: float = _f(1e-3, "learning rate (AdamW)")
    weight_decay: float = _f(1e-2, "AdamW weight decay")
    sparsity: float = _f(1e-3, "sparsity lambda")
    min_timestep: float = _f(0.0, "fit only on noise levels t >= this fraction of the schedule (0: every t, the "
                             "authors'; toy world only, see conceptor_nb/data/toyworld/README.md)")
    mlp_hidden: int = _f(100, "hidden width of the coefficient MLP")
    flip: bool = _f(True, "random horizontal flips of the training images")
    # validation
    val_every: int = _f(50, "validate every K steps (0: never; the last step's coefficients are kept)")
    val_steps: int = _f(50, "sampling steps of the validation renders")
    val_sampler: str = _f("dpm", "sampler of the validation renders", choices=SAMPLERS)
    val_patience: int = _f(0, "stop the fit after K validation rounds without a better score (0: never, the authors')")
    # precision of the fit's UNet pass: "off" (the weights' dtype), "bf16" (autocast), "auto" (bf16 autocast
    # when the weights are float32 and the device computes bf16 natively: a CUDA GPU with bf16, or a CPU with
    # AVX512-BF16/AMX). The text encoder, the MLP, generation and validation stay in the weights' dtype.
    autocast: str = _f("off", "precision of the fit's UNet pass (auto: bf16 where the hardware computes it "
                       "natively)", choices=AUTOCAST)
    seed: int = _f(0, "seed of the run: picks the concept images and the fit's randomness")

    def replace(self, **kw) -> "Settings":
        unknown = set(kw) - {f.name for f in fields(self)}
        if unknown:
            raise TypeError(f"unknown settings {sorted(unknown)}; known: {[f.name for f in fields(self)]}")
        if "clip_templates" in kw and kw["clip_templates"] is not None:
            kw["clip_templates"] = tuple(kw["clip_templates"])
        return replace(self, **kw)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["clip_templates"] = list(self.clip_templates)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Settings":
        """Settings from a saved dict. Keys of older files are mapped (``gen_scheduler`` -> ``sampler``,
        ``val_scheduler`` -> ``val_sampler``); ``model`` and ``clip`` belong to the result, not here."""
        d = dict(d)
        for old, new in LEGACY_NAMES.items():
            if old in d:
                d.setdefault(new, d.pop(old))
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "clip_templates" in kw:
            kw["clip_templates"] = tuple(kw["clip_templates"])
        return cls(**kw)


LEGACY_NAMES = {"gen_scheduler": "sampler", "val_scheduler": "val_sampler"}


def settings_fields():
    """(name, type, default, metadata) of every Settings field, in order (the CLI's flags)."""
    out = []
    for f in fields(Settings):
        default = f.default if f.default is not MISSING else f.default_factory()
        out.append((f.name, f.type, default, dict(f.metadata)))
    return out


@dataclass(frozen=True)
class Profile:
    """A named set of defaults: the model, its CLIP, and the method's settings."""

    name: str
    model: str
    clip: str
    settings: Settings
    family: str  # "toy", "tiny" or "sd": which models these settings are made for


SD_MODEL = "stabilityai/stable-diffusion-2-1-base"
SD_CLIP = "openai/clip-vit-base-patch32"

# The authors' release: SD 2.1-base, 100/20 images, N=5000, n=50, 500 steps; the fit's UNet pass and the
# one-time vocabulary embedding compute in bf16 where the hardware does so natively (the release runs fp32;
# the vocabulary embedding's agreement with fp32: benchmarks/vocab_embedding.md).
SD = Settings(autocast="auto", vocab_precision="auto")

# The toy world: 32 px images, a few dozen words that matter. Guidance 1.5, chosen from the guidance table
# in conceptor_nb/data/toyworld/README.md: higher scales make the model drop the concepts' minority
# components (at 4, leaf's orange triangle 2%), lower ones leave a third of the images unresolved.
# The fit skips the lowest fifth of the noise levels (min_timestep=0.2; the authors use every t): there the
# toy model's loss prefers the filler word "thing" to each concept's own word (held-out images, all six
# concepts in t < 0.1, five of six in 0.1-0.2), and these levels carry half of the uniform-t loss, so they
# steered the fit to generic words. Measured against the ground truth (18 decompositions): recall@5 of the
# spec's constituents 0.94 -> 0.98, top-10 stability 0.77 -> 0.87 (conceptor_nb/data/toyworld/README.md).
TOY = Settings(
    n_train=48, n_val=8, gen_steps=20, guidance=1.5, sampler="dpm", dict_size=100, null_threshold=0.8,
    clip_templates=("a photo of a {}",), n_tokens=10, steps=300, batch_size=6, val_every=50, val_steps=15,
    min_timestep=0.2,
)
CI = TOY.replace(n_train=24, n_val=4, gen_steps=12, steps=150, val_every=50, val_steps=10)

# A random SD-shaped pipeline built from config: tests and ``--model tiny``.
TINY = Settings(
    n_train=8, n_val=2, gen_steps=4, guidance=3.0, sampler="dpm", dict_size=64, clip_templates=("a photo of a {}",),
    n_tokens=8, steps=10, batch_size=2, val_every=5, val_steps=3,
)

PROFILES = {
    "toy": Profile("toy", "toy", "toy", TOY, "toy"),
    "ci": Profile("ci", "toy", "toy", CI, "toy"),
    "sd": Profile("sd", SD_MODEL, SD_CLIP, SD, "sd"),
    "tiny": Profile("tiny", "tiny", "tiny", TINY, "tiny"),
}


def profile_name() -> str:
    """The active profile: ``CONCEPTOR_PROFILE``, else ``toy``."""
    name = os.environ.get(ENV_PROFILE, "toy").strip().lower() or "toy"
    if name not in PROFILES:
        raise ValueError(f"{ENV_PROFILE}={name!r} is not a profile; choose one of {sorted(PROFILES)}")
    return name


def profile(name: str | None = None) -> Profile:
    """The profile ``name`` (default: the active one)."""
    name = name or profile_name()
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}")
    return PROFILES[name]


def settings(name: str | None = None) -> Settings:
    """The method settings of profile ``name`` (default: the active one)."""
    return profile(name).settings


def toy_run_folder(model) -> Path | None:
    """The run folder when ``model`` names the output of ``python -m conceptor_nb.toyworld.train`` (the
    folder holding ``train_config.json`` and ``pipeline/``, or that ``pipeline/`` itself); else None."""
    if not model or str(model) in ("toy", "tiny"):
        return None
    path = Path(str(model)).expanduser()
    for root in (path, path.parent) if path.name == "pipeline" else (path,):
        if (root / "train_config.json").is_file() and (root / "pipeline" / "model_index.json").is_file():
            return root
    return None


def model_family(model: str) -> str:
    """'toy', 'tiny' or 'sd'. A folder the toy-world training script wrote is ``toy``; any other name (a hub
    id, a folder or a checkpoint file) is ``sd``."""
    if model in ("toy", "tiny"):
        return model
    return "toy" if toy_run_folder(model) is not None else "sd"


def resolve(model: str | None = None, clip: str | None = None, *, warn: bool = True) -> tuple[Profile, str, str]:
    """The profile, model and CLIP a run uses.

    No model: the active profile's. A named model keeps the active profile when it is of that profile's
    family, and otherwise takes its family's profile (``toy``, ``tiny`` or ``sd``), with a note on stderr:
    a Stable Diffusion model is never run with the toy world's sizes or CLIP. No CLIP: the profile's.
    """
    active = profile()
    if model is None:
        chosen, model = active, active.model
    else:
        model = str(model)
        family = model_family(model)
        chosen = active if active.family == family else PROFILES[family]
        if chosen is not active and warn:
            print(f"note: model {model!r} uses the {chosen.name!r} profile's settings and CLIP "
                  f"(the active profile {active.name!r} is for {active.family} models; "
                  f"set {ENV_PROFILE}={chosen.name} to silence this)", file=sys.stderr)
    if clip is None and model != chosen.model:
        run = toy_run_folder(model)  # a trained toy world brings its own CLIP
        if run is not None and (run / "clip" / "config.json").is_file():
            clip = str(run / "clip")
    return chosen, model, clip or chosen.clip


def default_clip_for(model: str | None) -> str:
    """The CLIP that goes with a pipeline (its family's profile's CLIP; no model: the active profile's)."""
    return resolve(model or None, warn=False)[2]


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
