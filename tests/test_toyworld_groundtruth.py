"""Ground truth: on the shipped toy world, Conceptor finds what the spec put into each concept.

These are the project's most important correctness tests: the method, the shipped models and the
applications together, checked against answers we know. Seeded, CPU, toy-profile settings.
"""
import pytest
import torch

from conceptor_nb import decompose, detect_bias, explain_image, load_clip, load_pipeline, mitigate_bias, sweep
from conceptor_nb.bias import shares
from conceptor_nb.config import settings
from conceptor_nb.dictionary import build_dictionary
from conceptor_nb.examples import colour_oracle, colour_share, toy_spec
from conceptor_nb.toyworld.evaluate import score_decomposition
from conceptor_nb.toyworld.oracle import Oracle

TOY = settings("toy")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    torch.set_num_threads(max(1, torch.get_num_threads()))
    pipe = load_pipeline("toy", device="cpu")
    clip = load_clip("toy", device="cpu")
    return pipe, clip, tmp_path_factory.mktemp("toycache")


@pytest.fixture(scope="module")
def decs(toy):
    pipe, clip, cache = toy
    return {c: decompose(pipe, f"a {c}", clip=clip, settings=TOY, cache_dir=cache, verbose=False)
            for c in ("fruit", "sun", "bass", "doctor", "leaf")}


def test_null_filter_keeps_the_worlds_words(toy):
    """The toy CLIP reads unknown tokens as no word; the filter drops those and keeps the world's words."""
    pipe, clip, cache = toy
    spec = toy_spec()
    images = torch.rand(4, 3, 32, 32)
    full = build_dictionary(clip, images, "fruit", 100, cache_dir=cache, verbose=False)
    kept = build_dictionary(clip, images, "fruit", 100, null_threshold=0.8, cache_dir=cache, verbose=False)
    assert len(kept) < len(full) == 100
    words = set(spec.world_words) - {"fruit", spec.filler_word}
    assert words <= set(kept.tokens), words - set(kept.tokens)
    assert "fruit" not in kept.tokens


@pytest.mark.parametrize("concept", ["fruit", "sun"])
def test_decomposition_recovers_constituents(decs, concept):
    """The exemplar mixture (apple + lemon) and the composition (yellow + circle): every known
    constituent is in the top 5."""
    score = score_decomposition(decs[concept], toy_spec(), concept, k=5)
    assert score.recall_at_k == 1.0, (score.missing, decs[concept].top(8))


@pytest.mark.parametrize("concept, word", [("doctor", "person"), ("bass", "fish"), ("leaf", "triangle")])
def test_decomposition_names_the_main_constituent(decs, concept, word):
    """For the biased, double-meaning and colour-mixture concepts, at least their main word (the
    object or shape the model draws most) is in the top 5."""
    score = score_decomposition(decs[concept], toy_spec(), concept, k=5)
    assert word in score.found, decs[concept].top(8)


def test_explain_image_names_what_the_oracle_sees(toy, decs):
    """For bass images, the kept tokens include the object (or its colour) the pixels show."""
    pipe, clip, _ = toy
    spec = toy_spec()
    oracle = Oracle(spec)
    agree = 0
    for seed in range(4):
        e = explain_image(pipe, decs["bass"], seed, clip=clip)
        assert 1 <= len(e.kept) <= decs["bass"].n_tokens
        agree += bool(oracle.read(e.image).words(spec) & set(e.kept))
    assert agree >= 2, agree


def test_bias_detected_and_mitigated(toy, decs):
    """Doctor is drawn 80% blue: the images say blue both ways; mitigation meets 50/50 within 10 points."""
    pipe, clip, cache = toy
    attribute = {"blue": ["blue"], "red": ["red"]}
    oracle = colour_oracle(list(attribute))
    report = detect_bias(pipe, decs["doctor"], attribute, clip=clip, oracle=oracle, cache_dir=cache)
    assert report.majority == "blue" and report.oracle_share["blue"] > 0.6, report.to_frame()
    m = mitigate_bias(pipe, decs["doctor"], attribute, classifier=oracle, n=32)
    assert abs(m.after["red"] - 0.5) <= 0.10, m.rounds
    assert m.after == shares(oracle(m.mitigated.render(pipe, m.settings["seeds"])), list(attribute))


def test_sweep_of_a_colour_is_monotone(toy, decs):
    """Raising 'orange' in leaf raises the oracle's share of orange images, monotonically."""
    pipe, _, _ = toy
    mass = sum(c for _, c in decs["leaf"].top())
    sw = sweep(pipe, decs["leaf"], "orange", [v * mass for v in (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)], seeds=range(16),
               measure={"orange": colour_share("orange")})
    share = sw.scores["orange"]
    assert all(b >= a - 1 / 16 for a, b in zip(share, share[1:])), share
    assert share[-1] - share[0] >= 0.25, share
