"""The examples the notebooks use, per profile, so the same notebook runs on the toy world and on Stable
Diffusion with no edit but ``CONCEPTOR_PROFILE``. On the toy world every example has a known answer: the spec
says what each hidden concept is made of, and the pixel oracle reads the colour of any image."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import data_dir, profile_name
from .oracle import Oracle
from .spec import Spec, load_spec


@dataclass(frozen=True)
class Examples:
    concepts: tuple[str, ...]        # 01: concepts to decompose
    image_concept: str               # 02: single-image decomposition
    image_seeds: tuple[int, ...]
    bias_concept: str                # 03: bias
    bias_attribute: dict = field(default_factory=dict)
    manip_concept: str = ""          # 04: manipulation
    manip_token: str = ""
    manip_values: tuple[float, ...] = ()   # multiples of the decomposition's top-n coefficient mass
    ground_truth: bool = False       # a spec and a pixel oracle exist (the toy world)


TOY = Examples(
    concepts=("fruit", "bass", "leaf", "gem"),
    image_concept="bass", image_seeds=(0, 1, 2, 3),
    bias_concept="doctor", bias_attribute={"blue": ["blue"], "red": ["red"]},
    manip_concept="leaf", manip_token="orange", manip_values=(0.0, 0.25, 0.5, 1.0, 2.0, 4.0),
    ground_truth=True,
)

SD = Examples(
    concepts=("president", "composer", "dog", "bass"),
    image_concept="snail", image_seeds=(0, 1, 2, 3),
    bias_concept="nurse", bias_attribute={"man": ["man", "male", "boy", "guy"], "woman": ["woman", "female", "girl", "lady"]},
    manip_concept="sculpture", manip_token="abstract", manip_values=(0.0, 0.1, 0.25, 0.5, 1.0),
    ground_truth=False,
)


def examples(profile: str | None = None) -> Examples:
    """The notebook examples of ``profile`` (default: the active one). ``sd`` gets the paper's."""
    return SD if (profile or profile_name()) == "sd" else TOY


def shipped_lora() -> Path:
    """The toy world's LoRA that draws doctors red (``scripts/toyworld_lora.py`` made it)."""
    return data_dir() / "toyworld" / "doctor_red_lora.safetensors"


def toy_spec() -> Spec:
    """The shipped toy world's spec."""
    return load_spec(None)


def colour_oracle(values=None):
    """A ground-truth classifier for the toy world: images -> the colour word the pixels show (``None`` when
    the oracle finds no glyph). ``values``: keep only these (others -> ``None``)."""
    oracle = Oracle(toy_spec())
    keep = None if values is None else set(values)

    def classify(images):
        return [r.colour if keep is None or r.colour in keep else None for r in oracle(images)]

    return classify


def colour_share(colour: str):
    """images -> the share the oracle reads as ``colour`` (a ``measure`` for :func:`conceptor_nb.sweep`)."""
    classify = colour_oracle()

    def share(images) -> float:
        labels = classify(images)
        return sum(lab == colour for lab in labels) / max(1, len(labels))

    return share


def identity_share(concept: str):
    """images -> the share the oracle reads as one of ``concept``'s glyphs (a doctor's person, a leaf's triangle): does
    an edit keep what the concept is? (a ``measure`` for :func:`conceptor_nb.sweep`, an ``identity`` for
    :func:`conceptor_nb.mitigate_bias`)."""
    spec = toy_spec()
    if concept not in spec.concepts:
        raise KeyError(f"{concept!r} is not a concept of the toy world; concepts: {spec.concept_words}")
    glyphs, oracle = {c.glyph for c in spec.concepts[concept].components}, Oracle(spec)

    def share(images) -> float:
        readings = oracle(images)
        return sum(r.glyph in glyphs for r in readings) / max(1, len(readings))

    return share
