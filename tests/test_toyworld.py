"""The toy world: spec parsing, renderer, pixel oracle, shipped models, training smoke test."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from conceptor_nb.config import data_dir
from conceptor_nb.toyworld.evaluate import score_decomposition, spearman
from conceptor_nb.toyworld.oracle import Oracle
from conceptor_nb.toyworld.render import render_dataset, render_glyph, render_word, sample_records
from conceptor_nb.toyworld.spec import SpecError, load_spec, parse_spec

SHIPPED = data_dir() / "toyworld"

TINY_SPEC = {
    "name": "tiny-test-world",
    "image_size": 32,
    "colours": {"red": [0.85, 0.1, 0.1], "blue": [0.15, 0.3, 0.9]},
    "glyphs": {
        "circle": [{"ellipse": [0, 0, 1, 1]}],
        "square": [{"rect": [-0.85, -0.85, 0.85, 0.85]}],
        "apple": [{"ellipse": [0, 0.2, 0.8, 0.8]}, {"rect": [-0.1, -1, 0.1, -0.45], "fill": "stem"}],
    },
    "fixed_colours": {"stem": [0.35, 0.2, 0.05]},
    "shapes": ["circle", "square"],
    "objects": {"apple": {"glyph": "apple", "colours": {"red": 1}}},
    "concepts": {
        "fruit": {"components": [{"object": "apple", "weight": 0.6}, {"shape": "circle", "colour": "blue", "weight": 0.4}]}
    },
}


@pytest.fixture(scope="module")
def spec():
    return load_spec()


# --------------------------------------------------------------------------- spec
def test_shipped_spec_is_valid(spec):
    assert len(spec.concepts) >= 6
    for w in spec.world_words:
        assert w.isalpha()
    for name, con in spec.concepts.items():
        assert abs(sum(c.weight for c in con.components) - 1) < 1e-9
        assert con.constituents, name
    assert spec.concepts["doctor"].bias == {"attribute": "colour", "majority": "blue", "minority": "red"}
    assert {c.weight for c in spec.concepts["fruit"].components} == {0.6, 0.4}


def test_tiny_spec_derives_constituents():
    s = parse_spec(copy.deepcopy(TINY_SPEC))
    assert s.concepts["fruit"].constituents == pytest.approx({"apple": 0.6, "blue": 0.4, "circle": 0.4})


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.pop("colours"), "missing the key 'colours'"),
        (lambda d: d["shapes"].append("hexagon"), "no glyph"),
        (lambda d: d["objects"]["apple"].update(glyph="pear"), "not in spec.glyphs"),
        (lambda d: d["concepts"]["fruit"]["components"].append({"object": "banana", "weight": 1}), "not an object word"),
        (lambda d: d["concepts"]["fruit"]["components"][0].update(weight=-1), "positive number"),
        (lambda d: d["glyphs"]["circle"][0].update(ellipse=[0, 0, 2, 1]), "leaves the glyph box"),
        (lambda d: d["glyphs"]["apple"][1].update(fill="gold"), "fill 'gold'"),
        (lambda d: d["colours"].update(red=[1.2, 0, 0]), "outside [0, 1]"),
        (lambda d: d["concepts"].update(red={"components": [{"object": "apple", "weight": 1}]}), "also a colour"),
        (lambda d: d.update(template="a photo"), "exactly one"),
    ],
)
def test_invalid_specs_raise_clear_errors(mutate, message):
    d = copy.deepcopy(TINY_SPEC)
    mutate(d)
    with pytest.raises(SpecError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_spec(d)


def test_multi_token_words_are_rejected(tmp_path):
    d = copy.deepcopy(TINY_SPEC)
    d["concepts"]["zorblefruitish"] = d["concepts"].pop("fruit")
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(d))
    with pytest.raises(SpecError, match="single CLIP token"):
        load_spec(path)
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "nope.json")


# --------------------------------------------------------------------------- renderer
def test_render_shapes_and_determinism(spec):
    imgs, recs = render_dataset(spec, 40, seed=3)
    assert imgs.shape == (40, 3, 32, 32) and imgs.dtype == np.uint8
    again, recs2 = render_dataset(spec, 40, seed=3)
    assert np.array_equal(imgs, again) and recs == recs2
    other, _ = render_dataset(spec, 40, seed=4)
    assert not np.array_equal(imgs, other)
    one = render_glyph(spec, "circle", "red", np.random.default_rng(0))
    assert one.shape == (32, 32, 3) and 0 <= one.min() and one.max() <= 1
    assert render_word(spec, "red circle", 3).shape == (3, 3, 32, 32)


def test_records_are_balanced(spec):
    recs = sample_records(spec, 4000, seed=0)
    for name, con in spec.concepts.items():
        mine = [r for r in recs if r.kind == "concept" and r.word == name]
        for i, comp in enumerate(con.components):
            share = sum(r.component == i for r in mine) / len(mine)
            assert abs(share - comp.weight) < 0.01, (name, comp.label, share)


# --------------------------------------------------------------------------- oracle
def test_oracle_is_near_perfect_on_rendered_images(spec):
    imgs, recs = render_dataset(spec, 300, seed=11)
    readings = Oracle(spec)(imgs)
    glyph = np.mean([r.glyph == q.glyph for r, q in zip(readings, recs)])
    colour = np.mean([r.colour == q.colour for r, q in zip(readings, recs)])
    assert glyph >= 0.98 and colour >= 0.98, (glyph, colour)
    # float tensors in [0, 1] work as well as uint8 arrays
    r = Oracle(spec)(torch.from_numpy(imgs[:5]).float() / 255)
    assert [x.glyph for x in r] == [q.glyph for q in recs[:5]]


def test_oracle_on_blank_image(spec):
    blank = np.full((32, 32, 3), 0.9, dtype=np.float32)
    assert Oracle(spec).read(blank).glyph is None


# --------------------------------------------------------------------------- scoring
class _FakeDecomposition:
    def __init__(self, concept, pairs):
        self.concept = concept
        self.tokens = [t for t, _ in pairs]
        self.coefficients = [c for _, c in pairs]

    def top(self, k):
        return list(zip(self.tokens, self.coefficients))[:k]


def test_score_decomposition(spec):
    dec = _FakeDecomposition("a photo of a doctor", [("blue</w>", 0.5), ("person", 0.3), ("xyz", 0.2), ("red", 0.1)])
    s = score_decomposition(dec, spec, k=3)
    assert s.concept == "doctor"
    assert s.found == ["person", "blue"] and s.missing == ["red"]
    assert s.recall_at_k == pytest.approx(2 / 3)
    assert -1 <= s.spearman <= 1
    perfect = _FakeDecomposition("fruit", [("apple", 0.6), ("lemon", 0.4)])
    assert score_decomposition(perfect, spec, k=5).spearman == pytest.approx(1.0)
    assert score_decomposition(perfect, spec, k=5).recall_at_k == 1.0
    assert np.isnan(spearman([1, 1], [1, 2]))
    with pytest.raises(KeyError):
        score_decomposition(_FakeDecomposition("cat", []), spec)


# --------------------------------------------------------------------------- shipped models
needs_toy = pytest.mark.skipif(
    not (SHIPPED / "pipeline" / "model_index.json").exists() or not (SHIPPED / "clip" / "config.json").exists(),
    reason="the trained toy world is not in conceptor_nb/data/toyworld (train it with python -m conceptor_nb.toyworld.train)",
)


@needs_toy
def test_shipped_pipeline_draws_red_circles(spec, monkeypatch):
    from conceptor_nb.models import load_pipeline
    from conceptor_nb.toyworld.evaluate import generate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    pipe = load_pipeline("toy", device="cpu")
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 32
    oracle = Oracle(spec)
    imgs = generate(pipe, "a photo of a red circle", n=8, seed=0, steps=12, guidance=4.0)
    assert imgs.shape == (8, 3, 32, 32)
    red = sum(r.colour == "red" for r in oracle(imgs))
    other = generate(pipe, "a photo of a blue square", n=8, seed=0, steps=12, guidance=4.0)
    red_other = sum(r.colour == "red" for r in oracle(other))
    # the shipped model is under-trained (see conceptor_nb/data/toyworld/README.md): it follows colour words
    # about half the time, so the check is "mostly red, and redder than for another prompt"
    assert red >= 4 and red > red_other, (red, red_other)
    emb = pipe.text_encoder.get_input_embeddings().weight
    assert emb.shape[0] == 49408


@needs_toy
def test_shipped_clip_matches_words(spec, monkeypatch):
    from conceptor_nb.models import load_clip

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    clip = load_clip("toy", device="cpu")
    imgs = torch.from_numpy(render_word(spec, "red circle", 8, seed=1))
    img = torch.nn.functional.normalize(clip.image_features(imgs).mean(0), dim=0)
    txt = clip.text_features(["a photo of a red circle", "a photo of a blue square", "a photo of a guitar"])
    assert int(torch.argmax(txt @ img)) == 0


# --------------------------------------------------------------------------- training
def test_train_quick_end_to_end(tmp_path):
    from diffusers import StableDiffusionPipeline

    from conceptor_nb.toyworld.train import main

    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(TINY_SPEC))
    out = tmp_path / "out"
    report = main(["--spec", str(spec_path), "--out", str(out), "--seed", "0", "--quick"])
    assert (out / "pipeline" / "model_index.json").exists()
    assert (out / "clip" / "preprocessor_config.json").exists()
    assert json.loads((out / "train_log.json").read_text())["spec"] == "tiny-test-world"
    assert report["vocab_norms"]["mean_norm_all"] > 0
    pipe = StableDiffusionPipeline.from_pretrained(out / "pipeline", torch_dtype=torch.float32)
    assert pipe.unet.config.sample_size == 16 and pipe.scheduler.config.prediction_type == "epsilon"
