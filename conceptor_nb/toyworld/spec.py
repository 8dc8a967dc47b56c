"""The toy world's specification: a JSON data file, parsed and checked here.

A spec names the colour words, the glyphs (how a shape is drawn, as ellipses,
rectangles and polygons in a [-1, 1] box), the shape words (glyphs drawn in any
colour), the object words (a glyph with a fixed colour distribution) and the
hidden concepts (a concept word whose images are drawn from known components
with known weights). See ``conceptor_nb/data/toyworld/spec.json`` and its README.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..clip import clip_tokenizer
from ..config import TEMPLATE, data_dir

PRIMITIVES = ("ellipse", "rect", "polygon")
KINDS = ("attribute", "object", "concept")


class SpecError(ValueError):
    """A toy-world spec that cannot be used; the message says what and where."""


@dataclass(frozen=True)
class Component:
    """One way a concept is drawn: a glyph in a colour, with its share of the concept's images."""

    glyph: str
    colour: str | None  # None: drawn from the object's own colour distribution
    weight: float
    words: tuple[str, ...]  # the world words that describe it ("apple"; "yellow", "circle")

    @property
    def label(self) -> str:
        return " ".join(self.words)


@dataclass(frozen=True)
class Concept:
    word: str
    kind: str
    components: tuple[Component, ...]
    constituents: dict  # word -> weight (the known answer a decomposition should find)
    description: str = ""
    bias: dict | None = None


@dataclass
class Spec:
    name: str
    image_size: int
    template: str
    filler_word: str
    render: dict
    colours: dict  # word -> (r, g, b) in [0, 1]
    fixed_colours: dict
    glyphs: dict  # glyph name -> list of primitive dicts
    shapes: list
    objects: dict  # word -> {"glyph": str, "colours": {colour: weight}}
    concepts: dict  # word -> Concept
    sampling: dict
    path: Path | None = None
    raw: dict = field(default_factory=dict, repr=False)

    # ---- word lists -------------------------------------------------------
    @property
    def colour_words(self) -> list[str]:
        return list(self.colours)

    @property
    def shape_words(self) -> list[str]:
        return list(self.shapes)

    @property
    def object_words(self) -> list[str]:
        return list(self.objects)

    @property
    def concept_words(self) -> list[str]:
        return list(self.concepts)

    @property
    def attribute_words(self) -> list[str]:
        return self.colour_words + self.shape_words

    @property
    def world_words(self) -> list[str]:
        """Every word the world's captions use for content (not the template words)."""
        return self.colour_words + self.shape_words + self.object_words + self.concept_words + [self.filler_word]

    def glyph_of(self, word: str) -> str:
        if word in self.shapes:
            return word
        if word in self.objects:
            return self.objects[word]["glyph"]
        raise KeyError(f"{word!r} is neither a shape nor an object word of spec {self.name!r}")

    def prompt(self, *words: str) -> str:
        return self.template.format(" ".join(words))

    def to_json(self) -> str:
        return json.dumps(self.raw, indent=2)


def default_spec_path() -> Path:
    return data_dir() / "toyworld" / "spec.json"


def load_spec(path: str | Path | dict | None = None, *, check_tokens: bool = True) -> Spec:
    """Read and validate a spec (a path, an already-parsed dict, or None for the shipped one)."""
    if isinstance(path, dict):
        raw, where = path, None
    else:
        where = Path(path) if path is not None else default_spec_path()
        if not where.exists():
            raise SpecError(f"spec file {where} does not exist")
        try:
            raw = json.loads(where.read_text())
        except json.JSONDecodeError as err:
            raise SpecError(f"spec file {where} is not valid JSON: {err}") from err
    spec = parse_spec(raw, path=where)
    if check_tokens:
        check_single_tokens(spec)
    return spec


def _req(d: dict, key: str, where: str, typ=None):
    if not isinstance(d, dict):
        raise SpecError(f"{where} must be an object, got {type(d).__name__}")
    if key not in d:
        raise SpecError(f"{where} is missing the key {key!r}")
    v = d[key]
    if typ is not None and not isinstance(v, typ):
        names = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
        raise SpecError(f"{where}.{key} must be {names}, got {type(v).__name__}")
    return v


def _rgb(v, where: str) -> tuple[float, float, float]:
    if not (isinstance(v, (list, tuple)) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)):
        raise SpecError(f"{where} must be a list of 3 numbers in [0, 1], got {v!r}")
    if not all(0.0 <= float(x) <= 1.0 for x in v):
        raise SpecError(f"{where} has a value outside [0, 1]: {v!r}")
    return tuple(float(x) for x in v)


def _weight(v, where: str) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
        raise SpecError(f"{where} must be a positive number, got {v!r}")
    return float(v)


def _check_word(w, where: str):
    if not isinstance(w, str) or not w or not w.isalpha() or w != w.lower():
        raise SpecError(f"{where}: word {w!r} must be a non-empty lower-case alphabetic string")


def parse_spec(raw: dict, path: Path | None = None) -> Spec:
    """Check a parsed spec dict; raise :class:`SpecError` naming the first problem."""
    if not isinstance(raw, dict):
        raise SpecError("a spec must be a JSON object")
    name = _req(raw, "name", "spec", str)
    size = _req(raw, "image_size", "spec", int)
    if size < 8 or size % 2:
        raise SpecError(f"spec.image_size must be an even number >= 8, got {size}")
    template = raw.get("template", TEMPLATE)
    if not isinstance(template, str) or template.count("{}") != 1:
        raise SpecError(f"spec.template must contain exactly one '{{}}', got {template!r}")
    filler = raw.get("filler_word", "thing")
    _check_word(filler, "spec.filler_word")
    render = dict(supersample=4, size_range=[0.24, 0.4], background_range=[0.8, 1.0], colour_jitter=0.06, noise=0.01, margin=1)
    render.update(raw.get("render", {}))
    lo, hi = render["size_range"]
    if not 0 < lo <= hi <= 0.5:
        raise SpecError(f"spec.render.size_range must be 0 < lo <= hi <= 0.5 (half-size as a fraction of the image), got {render['size_range']}")

    colours_raw = _req(raw, "colours", "spec", dict)
    if len(colours_raw) < 2:
        raise SpecError("spec.colours needs at least two colour words")
    colours = {}
    for w, v in colours_raw.items():
        _check_word(w, "spec.colours")
        colours[w] = _rgb(v, f"spec.colours.{w}")
    fixed = {k: _rgb(v, f"spec.fixed_colours.{k}") for k, v in raw.get("fixed_colours", {}).items()}
    for k in fixed:
        if k in colours:
            raise SpecError(f"spec.fixed_colours.{k} has the name of a colour word")

    glyphs_raw = _req(raw, "glyphs", "spec", dict)
    glyphs = {}
    for g, prims in glyphs_raw.items():
        where = f"spec.glyphs.{g}"
        if not isinstance(prims, list) or not prims:
            raise SpecError(f"{where} must be a non-empty list of primitives")
        out = []
        for i, p in enumerate(prims):
            pw = f"{where}[{i}]"
            if not isinstance(p, dict):
                raise SpecError(f"{pw} must be an object like {{'ellipse': [cx, cy, rx, ry]}}")
            kinds = [k for k in p if k in PRIMITIVES]
            if len(kinds) != 1:
                raise SpecError(f"{pw} must have exactly one of {PRIMITIVES}, got keys {sorted(p)}")
            kind = kinds[0]
            geo = p[kind]
            if kind in ("ellipse", "rect"):
                if not (isinstance(geo, list) and len(geo) == 4 and all(isinstance(x, (int, float)) for x in geo)):
                    raise SpecError(f"{pw}.{kind} must be 4 numbers")
                if kind == "ellipse" and not (geo[2] > 0 and geo[3] > 0):
                    raise SpecError(f"{pw}.ellipse radii must be positive")
                if kind == "rect" and not (geo[0] < geo[2] and geo[1] < geo[3]):
                    raise SpecError(f"{pw}.rect must be [x0, y0, x1, y1] with x0 < x1 and y0 < y1")
            else:
                if not (isinstance(geo, list) and len(geo) >= 3 and all(isinstance(q, list) and len(q) == 2 for q in geo)):
                    raise SpecError(f"{pw}.polygon must be a list of at least 3 [x, y] points")
            pts = [geo[:2]] if kind != "polygon" else geo
            flat = [abs(float(x)) for q in pts for x in q]
            if kind == "ellipse":
                flat = [abs(geo[0]) + geo[2], abs(geo[1]) + geo[3]]
            if max(flat) > 1.0 + 1e-6:
                raise SpecError(f"{pw} leaves the glyph box [-1, 1]")
            fill = p.get("fill", "main")
            if fill != "main" and fill not in fixed:
                raise SpecError(f"{pw}.fill {fill!r} is neither 'main' nor a name in spec.fixed_colours")
            out.append({"kind": kind, "geo": geo, "fill": fill})
        if not any(q["fill"] == "main" for q in out):
            raise SpecError(f"{where} has no primitive with fill 'main', so its colour word could not show")
        glyphs[g] = out

    shapes = _req(raw, "shapes", "spec", list)
    for s in shapes:
        _check_word(s, "spec.shapes")
        if s not in glyphs:
            raise SpecError(f"shape word {s!r} has no glyph in spec.glyphs")
    objects = {}
    for w, o in raw.get("objects", {}).items():
        _check_word(w, "spec.objects")
        g = _req(o, "glyph", f"spec.objects.{w}", str)
        if g not in glyphs:
            raise SpecError(f"spec.objects.{w}.glyph {g!r} is not in spec.glyphs")
        cols = _req(o, "colours", f"spec.objects.{w}", dict)
        if not cols:
            raise SpecError(f"spec.objects.{w}.colours is empty")
        for c, wt in cols.items():
            if c not in colours:
                raise SpecError(f"spec.objects.{w}.colours: {c!r} is not a colour word")
            _weight(wt, f"spec.objects.{w}.colours.{c}")
        objects[w] = {"glyph": g, "colours": {c: float(v) for c, v in cols.items()}}

    words_so_far = list(colours) + list(shapes) + list(objects) + [filler]
    dup = {w for w in words_so_far if words_so_far.count(w) > 1}
    if dup:
        raise SpecError(f"words used twice across colours/shapes/objects/filler: {sorted(dup)}")

    concepts = {}
    for w, c in raw.get("concepts", {}).items():
        where = f"spec.concepts.{w}"
        _check_word(w, "spec.concepts")
        if w in words_so_far:
            raise SpecError(f"concept word {w!r} is also a colour/shape/object word")
        comps_raw = _req(c, "components", where, list)
        if not comps_raw:
            raise SpecError(f"{where}.components is empty")
        comps = []
        for i, comp in enumerate(comps_raw):
            cw = f"{where}.components[{i}]"
            wt = _weight(_req(comp, "weight", cw), f"{cw}.weight")
            colour = comp.get("colour")
            if colour is not None and colour not in colours:
                raise SpecError(f"{cw}.colour {colour!r} is not a colour word")
            if "object" in comp:
                ow = comp["object"]
                if ow not in objects:
                    raise SpecError(f"{cw}.object {ow!r} is not an object word")
                if colour is not None and colour not in objects[ow]["colours"]:
                    raise SpecError(f"{cw}: object {ow!r} is never drawn {colour!r}")
                glyph, words = objects[ow]["glyph"], ((colour,) if colour and len(objects[ow]["colours"]) > 1 else ()) + (ow,)
            elif "shape" in comp:
                sw = comp["shape"]
                if sw not in shapes:
                    raise SpecError(f"{cw}.shape {sw!r} is not a shape word")
                if colour is None:
                    raise SpecError(f"{cw}: a shape component needs a colour")
                glyph, words = sw, (colour, sw)
            else:
                raise SpecError(f"{cw} needs an 'object' or a 'shape'")
            comps.append(Component(glyph=glyph, colour=colour, weight=wt, words=words))
        total = sum(x.weight for x in comps)
        comps = [Component(x.glyph, x.colour, x.weight / total, x.words) for x in comps]
        keys = [(x.glyph, x.colour) for x in comps]
        if len(set(keys)) != len(keys):
            raise SpecError(f"{where}: two components are drawn alike")
        cons = c.get("constituents")
        if cons is None:  # derive: a word's weight is the share of images it describes
            cons = {}
            for x in comps:
                for word in x.words:
                    cons[word] = cons.get(word, 0.0) + x.weight
        if not isinstance(cons, dict) or not cons:
            raise SpecError(f"{where}.constituents must be a non-empty {{word: weight}} object")
        for word, wt in cons.items():
            if word not in words_so_far:
                raise SpecError(f"{where}.constituents: {word!r} is not a world word")
            _weight(wt, f"{where}.constituents.{word}")
        bias = c.get("bias")
        if bias is not None:  # a colour bias (the default) or a shape bias, between two of the concept's components
            attribute = bias.get("attribute", "colour") if isinstance(bias, dict) else None
            if attribute not in ("colour", "shape"):
                raise SpecError(f"{where}.bias.attribute must be 'colour' or 'shape', got {attribute!r}")
            drawn = {x.colour if attribute == "colour" else x.glyph for x in comps}
            for k in ("majority", "minority"):
                if _req(bias, k, f"{where}.bias") not in (colours if attribute == "colour" else shapes):
                    raise SpecError(f"{where}.bias.{k} must be a {attribute} word")
                if bias[k] not in drawn:
                    raise SpecError(f"{where}.bias.{k} {bias[k]!r} is not the {attribute} of any of its components")
        concepts[w] = Concept(word=w, kind=str(c.get("kind", "mixture")), components=tuple(comps),
                              constituents={k: float(v) for k, v in cons.items()},
                              description=str(c.get("description", "")), bias=bias)

    sampling = {
        "kinds": {"attribute": 0.4, "object": 0.25, "concept": 0.35},
        "captions": {
            "attribute": [["a photo of a {colour} {shape}", 0.5], ["a photo of a {shape}", 0.2],
                          ["a photo of a {colour} thing", 0.15], ["a photo of a {colour}", 0.15]],
            "object": [["a photo of a {object}", 0.7], ["a photo of a {colour} {object}", 0.3]],
            "concept": [["a photo of a {concept}", 0.8], ["a photo of a {colour} {concept}", 0.2]],
        },
        "caption_dropout": 0.1, "distractor_prob": 0.4, "distractor_max": 3,
    }
    s_raw = raw.get("sampling", {})
    if not isinstance(s_raw, dict):
        raise SpecError("spec.sampling must be an object")
    sampling.update({k: v for k, v in s_raw.items() if k != "captions"})
    sampling["captions"] = {**sampling["captions"], **s_raw.get("captions", {})}
    for k, v in sampling["kinds"].items():
        if k not in KINDS:
            raise SpecError(f"spec.sampling.kinds: unknown kind {k!r}; use {KINDS}")
        if not isinstance(v, (int, float)) or v < 0:
            raise SpecError(f"spec.sampling.kinds.{k} must be a number >= 0")
    if not objects:
        sampling["kinds"]["object"] = 0
    if not concepts:
        sampling["kinds"]["concept"] = 0
    if sum(sampling["kinds"].values()) <= 0:
        raise SpecError("spec.sampling.kinds gives every kind weight 0")
    for kind, forms in sampling["captions"].items():
        for form in forms:
            if not (isinstance(form, list) and len(form) == 2 and isinstance(form[0], str)):
                raise SpecError(f"spec.sampling.captions.{kind}: each entry is [\"caption with {{slots}}\", weight]")
    for k in ("caption_dropout", "distractor_prob"):
        if not 0 <= float(sampling[k]) < 1:
            raise SpecError(f"spec.sampling.{k} must be in [0, 1)")

    return Spec(name=name, image_size=size, template=template, filler_word=filler, render=render,
                colours=colours, fixed_colours=fixed, glyphs=glyphs, shapes=list(shapes), objects=objects,
                concepts=concepts, sampling=sampling, path=path, raw=raw)


def check_single_tokens(spec: Spec, tokenizer=None) -> None:
    """Every world word must be one CLIP token (Conceptor's dictionary is made of tokens)."""
    tokenizer = tokenizer if tokenizer is not None else clip_tokenizer()
    bad = []
    for w in spec.world_words:
        ids = tokenizer(w, add_special_tokens=False).input_ids
        if len(ids) != 1:
            bad.append(f"{w!r} -> {len(ids)} tokens")
    if bad:
        raise SpecError("world words must each be a single CLIP token; these are not: " + ", ".join(bad))
