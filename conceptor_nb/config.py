"""Settings and profiles: the one place where defaults live, and the one parser of settings written as text.

A :class:`Profile` binds a model and its CLIP to the method's :class:`Settings`. ``CONCEPTOR_PROFILE`` picks
the active one (``toy`` by default, ``ci``, ``sd``, ``tiny``); :func:`resolve` gives a named model its family's.
"""
from __future__ import annotations

import os
import sys
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from .errors import InvalidInputError

ENV_PROFILE, ENV_CACHE, ENV_DATA = "CONCEPTOR_PROFILE", "CONCEPTOR_CACHE", "CONCEPTOR_DATA"
PACKAGE_DATA = Path(__file__).resolve().parent / "data"  # shipped inside the package (wheel included)
TEMPLATE = "a photo of a {}"  # the prompt template ('{}' is the concept); the one literal of it
SEED_STRIDE = 1_000_003  # a run of seed s draws its images from seeds s * SEED_STRIDE + ...: runs share no image
# the 27 templates the authors average over when CLIP embeds a token (textual inversion's imagenet_templates_small)
CLIP_TEMPLATES = (
    TEMPLATE, "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}", "a photo of a clean {}",
    "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}", "a photo of the cool {}",
    "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}", "a photo of the {}",
    "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}", "a rendition of the {}",
    "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}", "a good photo of a {}",
    "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}", "a photo of the large {}",
    "a photo of a cool {}", "a photo of a small {}",
)
SAMPLERS = ("dpm", "lms", "ddim", "euler", "pndm")
AUTOCAST, VOCAB_PRECISIONS = ("off", "bf16", "auto"), ("fp32", "bf16", "auto")
LEGACY_NAMES = {"gen_scheduler": "sampler", "val_scheduler": "val_sampler"}  # keys of older saved files


def _f(default, help: str, **meta):
    """A Settings field with its help text (and choices) for the command-line flags."""
    if isinstance(default, tuple):
        return field(default_factory=lambda: default, metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


@dataclass(frozen=True)
class Settings:
    """The method's hyper-parameters: keyword arguments of ``decompose``, flags of ``conceptor decompose``."""

    template: str = _f(TEMPLATE, "prompt template; '{}' is the concept (and the pseudo-token)")
    # concept images
    n_train: int = _f(100, "training images of the concept")
    n_val: int = _f(20, "validation images of the concept")
    gen_steps: int = _f(50, "sampling steps for the concept images and renders")
    guidance: float = _f(7.5, "classifier-free guidance scale")
    sampler: str = _f("lms", "sampler for the concept images and renders", choices=SAMPLERS)
    # dictionary
    dict_size: int = _f(5000, "dictionary size N (tokens ranked by CLIP)")
    clip_templates: tuple = _f(CLIP_TEMPLATES, "templates averaged when CLIP embeds a token ('authors': the paper's 27)")
    exclude_threshold: float | None = _f(0.9, "drop tokens whose CLIP text cosine with the concept word is above "
                                         "this ('none': keep them)")
    vocab_precision: str = _f("fp32", "precision of the one-time CLIP vocabulary embedding (auto: bf16 where the "
                              "hardware computes it natively)", choices=VOCAB_PRECISIONS)
    null_threshold: float | None = _f(None, "drop tokens CLIP reads as no word (cosine with the empty template above "
                                      "this; 'none': off)")
    # fit
    n_tokens: int = _f(50, "explanation tokens n (the sparsity term's top-n)")
    steps: int = _f(500, "fit steps")
    batch_size: int = _f(6, "fit batch size")
    lr: float = _f(1e-3, "learning rate (AdamW)")
    weight_decay: float = _f(1e-2, "AdamW weight decay")
    sparsity: float = _f(1e-3, "sparsity lambda")
    min_timestep: float = _f(0.0, "fit only on noise levels t >= this fraction of the schedule (0: all, the authors')")
    mlp_hidden: int = _f(100, "hidden width of the coefficient MLP")
    flip: bool = _f(True, "random horizontal flips of the training images")
    # validation
    val_every: int = _f(50, "validate every K steps (0: never; the last step's coefficients are kept)")
    val_steps: int = _f(50, "sampling steps of the validation renders")
    val_sampler: str = _f("dpm", "sampler of the validation renders", choices=SAMPLERS)
    val_patience: int = _f(0, "stop after K validation rounds without a better score (0: never, the authors')")
    # error bars and the significance test
    fits: int = _f(1, "fits on K disjoint parts of the concept images: K > 1 gives each token error bars (1: the authors')")
    n_test: int = _f(0, "held-out concept images of the significance test of each top token (0: no test)")
    test_draws: int = _f(8, "paired (noise, timestep) draws per held-out image in the significance test")
    explain_guidance: float | None = _f(None, "guidance of single-image decomposition's renders ('none': the concept "
                                        "images'); not part of a decomposition's identity")
    autocast: str = _f("off", "precision of the fit's UNet pass (auto: bf16 where the weights are fp32 and the "
                       "hardware computes bf16 natively)", choices=AUTOCAST)
    seed: int = _f(0, "seed of the run: picks the concept images and the fit's randomness")

    def replace(self, **kw) -> "Settings":
        unknown = set(kw) - {f.name for f in fields(self)}
        if unknown:
            raise TypeError(f"unknown settings {sorted(unknown)}; known: {[f.name for f in fields(self)]}")
        if kw.get("clip_templates") is not None:
            kw["clip_templates"] = tuple(kw["clip_templates"])
        return replace(self, **kw)

    def to_dict(self) -> dict:
        return {**asdict(self), "clip_templates": list(self.clip_templates)}

    @classmethod
    def from_dict(cls, d: dict) -> "Settings":
        """Settings from a saved dict (older key names mapped; other keys, like ``model``, ignored)."""
        d = {LEGACY_NAMES.get(k, k): v for k, v in d.items() if not (k in LEGACY_NAMES and LEGACY_NAMES[k] in d)}
        return cls().replace(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


HINTS = typing.get_type_hints(Settings)  # field -> type, ``float | None`` evaluated
BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def parse_setting(name: str, text):
    """The value of setting ``name`` written as text: a command-line flag, a CSV cell, ``--set name=value``.

    Numbers as Python reads them (an integral float for an int), ``none``/``off`` for an optional number,
    booleans as 1/0, true/false, yes/no, on/off; ``clip_templates`` a list or one string split at ``|``
    (``authors``: the paper's 27). InvalidInputError names the setting.
    """
    name = name.strip().replace("-", "_")
    if name not in HINTS:
        raise InvalidInputError(f"unknown setting {name!r}; the settings are {', '.join(HINTS)}")
    if name == "clip_templates":
        values = text.split("|") if isinstance(text, str) else list(text)
        return CLIP_TEMPLATES if values == ["authors"] else tuple(v for v in values if v)
    args = typing.get_args(HINTS[name])
    base, low = next((a for a in args if a is not type(None)), HINTS[name]), text.strip().lower()
    if base is str or (type(None) in args and low in ("none", "off")):
        return text if base is str else None
    try:
        if base is bool:
            return BOOLS[low]
        if base is float or low.lstrip("+-").isdigit():
            return base(low)
        if float(low).is_integer():  # "3.0", as spreadsheets write it
            return int(float(low))
    except (KeyError, ValueError):
        pass
    kind = {bool: "a boolean (1/0, true/false, yes/no, on/off)", int: "an integer", float: "a number"}[base]
    raise InvalidInputError(f"{name} must be {kind}{' or none' if type(None) in args else ''}, got {text!r}")


@dataclass(frozen=True)
class Profile:
    """A named set of defaults: the model, its CLIP, and the method's settings."""

    name: str
    model: str
    clip: str
    settings: Settings
    family: str  # "toy", "tiny" or "sd": which models these settings are made for


SD_MODEL, SD_CLIP = "stabilityai/stable-diffusion-2-1-base", "openai/clip-vit-base-patch32"
SD = Settings(autocast="auto", vocab_precision="auto", n_test=8, test_draws=4)  # the authors' settings, plus the significance test; bf16 where the hardware has it
# the toy world (32 px images, a few dozen words that matter); why these values: data/toyworld/README.md
TOY = Settings(n_train=48, n_val=8, gen_steps=20, guidance=1.5, sampler="dpm", dict_size=100, null_threshold=0.8,
               clip_templates=(TEMPLATE,), n_tokens=10, steps=300, batch_size=6, val_every=50, val_steps=15,
               min_timestep=0.2, n_test=8, test_draws=8, explain_guidance=7.5)
CI = TOY.replace(n_train=24, n_val=4, gen_steps=12, steps=150, val_every=50, val_steps=10, n_test=4)
TINY = Settings(n_train=8, n_val=2, gen_steps=4, guidance=3.0, sampler="dpm", dict_size=64, clip_templates=(TEMPLATE,),
                n_tokens=8, steps=10, batch_size=2, val_every=5, val_steps=3)  # random weights: tests, --model tiny
PROFILES = {p.name: p for p in (Profile("toy", "toy", "toy", TOY, "toy"), Profile("ci", "toy", "toy", CI, "toy"),
                                Profile("sd", SD_MODEL, SD_CLIP, SD, "sd"), Profile("tiny", "tiny", "tiny", TINY, "tiny"))}


def profile(name: str | None = None) -> Profile:
    """The profile ``name`` (default: the active one, ``CONCEPTOR_PROFILE``, else ``toy``)."""
    name = (name or os.environ.get(ENV_PROFILE, "")).strip().lower() or "toy"
    if name not in PROFILES:
        raise InvalidInputError(f"unknown profile {name!r} (an argument or {ENV_PROFILE}); choose one of {sorted(PROFILES)}")
    return PROFILES[name]


def profile_name() -> str:
    return profile().name


def settings(name: str | None = None) -> Settings:
    """The method settings of profile ``name`` (default: the active one)."""
    return profile(name).settings


def toy_run_folder(model) -> Path | None:
    """The folder ``python -m conceptor_nb.toyworld.train`` wrote (``train_config.json`` and ``pipeline/``)
    when ``model`` names it or its ``pipeline/``; else None."""
    if not model or str(model) in ("toy", "tiny"):
        return None
    path = Path(str(model)).expanduser()
    for root in (path, path.parent) if path.name == "pipeline" else (path,):
        if (root / "train_config.json").is_file() and (root / "pipeline" / "model_index.json").is_file():
            return root
    return None


def resolve(model: str | None = None, clip: str | None = None, *, warn: bool = True) -> tuple[Profile, str, str]:
    """The profile, model and CLIP a run uses.

    No model: the active profile's. A named model's family is ``toy``/``tiny`` by name or for a folder the toy
    training script wrote, else ``sd``; it keeps the active profile if of that family, else takes its family's
    (with a note on stderr). No CLIP: a trained toy world's own, else the profile's.
    """
    active = profile()
    if model is None:
        chosen, model = active, active.model
    else:
        model = str(model)
        family = model if model in ("toy", "tiny") else "toy" if toy_run_folder(model) else "sd"
        chosen = active if active.family == family else PROFILES[family]
        if chosen is not active and warn:
            print(f"note: model {model!r} uses the {chosen.name!r} profile's settings and CLIP (the active profile "
                  f"{active.name!r} is for {active.family} models; set {ENV_PROFILE}={chosen.name} to silence this)",
                  file=sys.stderr)
    run = toy_run_folder(model) if clip is None and model != chosen.model else None
    if run is not None and (run / "clip" / "config.json").is_file():
        clip = str(run / "clip")
    return chosen, model, clip or chosen.clip


def default_clip_for(model: str | None) -> str:
    """The CLIP that goes with a model (no model: the active profile's)."""
    return resolve(model or None, warn=False)[2]


def data_dir() -> Path:
    """The toy world and the CLIP tokenizer: the package's ``data/`` (``CONCEPTOR_DATA`` overrides)."""
    return Path(os.environ.get(ENV_DATA, PACKAGE_DATA))


def cache_dir() -> Path:
    """``CONCEPTOR_CACHE``, else ``$XDG_CACHE_HOME/conceptor_nb`` (``~/.cache/conceptor_nb``)."""
    return Path(os.environ.get(ENV_CACHE) or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "conceptor_nb")


def figures_dir() -> Path:
    """Where notebooks save figures: ``CONCEPTOR_FIGURES``, else ``figures/<profile>`` in the cache."""
    return Path(os.environ.get("CONCEPTOR_FIGURES") or cache_dir() / "figures" / profile_name())
