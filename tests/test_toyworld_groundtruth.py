"""Ground truth: on the shipped toy world, Conceptor finds what the spec put into each concept.

These are the project's most important correctness tests: the method, the shipped models and the
applications together, checked against answers we know. Seeded, CPU, toy-profile settings.
"""
import pytest
import torch

from conceptor_nb import decompose, detect_bias, explain_image, load_clip, load_pipeline, mitigate_bias, sweep
from conceptor_nb.apps.bias import shares
from conceptor_nb.config import settings
from conceptor_nb.method.dictionary import build_dictionary
from conceptor_nb.toyworld import Oracle, colour_oracle, colour_share, score_decomposition, toy_spec

TOY = settings("toy")

pytestmark = pytest.mark.slow  # decompositions of the shipped toy world: minutes of CPU (CI runs -m slow too)


@pytest.fixture(scope="module")
def toy():
    torch.set_num_threads(max(1, torch.get_num_threads()))
    pipe = load_pipeline("toy", device="cpu")
    clip = load_clip("toy", device="cpu")
    return pipe, clip, None  # the default cache (CONCEPTOR_CACHE): CI's default-profile notebooks reuse these images


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
    # issue 11 target 2 rests on this: no token outside the world's words survives the toy filter
    # (the shipped CLIP, trained longer with 256 text-only negatives, reads every one of them as no word)
    assert set(kept.tokens) <= set(spec.world_words), set(kept.tokens) - set(spec.world_words)


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
    """For bass images, the kept tokens name the object or the colour the pixels show (an object word names
    its one colour: "fish" names blue). An explanation that could drop nothing explains nothing: no credit."""
    pipe, clip, _ = toy
    spec = toy_spec()
    oracle = Oracle(spec)
    colour_of = {w: next(iter(o["colours"])) for w, o in spec.objects.items() if len(o["colours"]) == 1}
    agree, seen = 0, []
    for seed in range(4):
        e = explain_image(pipe, decs["bass"], seed, clip=clip)
        assert 1 <= len(e.kept) <= decs["bass"].n_tokens
        named = set(e.kept) | {colour_of[w] for w in e.kept if w in colour_of}
        shown = oracle.read(e.image).words(spec)
        seen.append((sorted(shown), e.kept))
        agree += len(e.kept) < decs["bass"].n_tokens and bool(shown & named)
    assert agree >= 2, seen


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


# --------------------------------------------------------------------------- issue 11 targets, cheaper subset
# Three concepts (a mixture, the biased one, a colour mixture), two runs whose seeds pick disjoint concept
# images (conceptor_nb.method.generate.image_seeds), 150 fit steps instead of the profile's 300. The full measurement
# is `python -m conceptor_nb.toyworld.evaluate --decompose --seeds 0,1,2` (conceptor_nb/data/toyworld/README.md).
TARGET_CONCEPTS = ("fruit", "doctor", "leaf")
CHEAP = TOY.replace(steps=150)


@pytest.fixture(scope="module")
def runs(toy):
    from conceptor_nb.toyworld.metrics import drawn_constituents, mixture_proportions

    pipe, clip, cache = toy
    spec, oracle = toy_spec(), Oracle(toy_spec())
    out = {}
    for seed in (0, 1):
        for c in TARGET_CONCEPTS:
            dec = decompose(pipe, c, clip=clip, settings=CHEAP.replace(seed=seed), cache_dir=cache, verbose=False)
            gen = mixture_proportions(pipe, spec, c, oracle=oracle, images=dec.concept_images(pipe, cache_dir=cache)).generated
            out[c, seed] = (dec, drawn_constituents(spec, c, gen))
    return out


def _words(dec, k):
    return [t.replace("</w>", "") for t in dec.tokens[:k]]


@pytest.mark.slow
def test_runs_use_disjoint_images(runs):
    a, b = runs["fruit", 0][0], runs["fruit", 1][0]
    assert not set(a.seeds(48)) & set(b.seeds(48))


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="issue 11 target 1 is missed on the shipped weights: recall@5 of drawn "
                   "constituents 98% in the full evaluation (17 of 18 runs perfect), and lower on this cheaper subset")
def test_target1_top5_holds_every_drawn_constituent(runs):
    missed = {key: sorted(set(drawn) - set(_words(dec, 5))) for key, (dec, drawn) in runs.items()}
    assert not any(missed.values()), missed


@pytest.mark.slow
def test_target2_no_meaningless_token_in_top5(runs):
    world = set(toy_spec().world_words)
    outside = {key: [w for w in _words(dec, 5) if w not in world] for key, (dec, _) in runs.items()}
    assert not any(outside.values()), outside


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="issue 11 target 3 is missed on the shipped weights: top-10 stability "
                   "0.87 across three runs in the full evaluation, against a chance overlap of 0.48")
def test_target3_top10_stable_across_runs(runs):
    from conceptor_nb.toyworld.metrics import chance_overlap, top_overlap

    for c in TARGET_CONCEPTS:
        a, b = runs[c, 0][0], runs[c, 1][0]
        overlap = top_overlap(_words(a, 10), _words(b, 10))
        assert overlap > chance_overlap(10, len(a.tokens)), (c, overlap)
    mean = sum(top_overlap(_words(runs[c, 0][0], 10), _words(runs[c, 1][0], 10)) for c in TARGET_CONCEPTS) / 3
    assert mean >= 0.9, mean


# --------------------------------------------------------------------------- issue 23: the significance test
# The same runs (the toy profile's test: 8 held-out images x 8 draws, top 10). The full measurement, 18 runs and the
# same on seeds 3-5, is in conceptor_nb/data/toyworld/README.md; these are the targets on the cheaper subset.
def _supported(dec):
    return [w for w, ok in zip(_words(dec, dec.n_tokens), dec.supported()) if ok]


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="issue 23: in the full evaluation (18 runs) 46% of supported tokens are drawn "
                   "constituents (target 95%): the toy model's loss rewards tokens the spec does not name")
def test_issue23_supported_tokens_are_drawn_constituents(runs):
    sup = [(w, w in drawn) for dec, drawn in runs.values() for w in _supported(dec)]
    assert sup and sum(ok for _, ok in sup) / len(sup) >= 0.95, sup


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="issue 23: in the full evaluation drawn constituents are supported in 51% of "
                   "the runs that draw them (target: each in at least 17 of 18)")
def test_issue23_every_drawn_constituent_is_supported(runs):
    missed = {key: sorted(set(drawn) - set(_supported(dec))) for key, (dec, drawn) in runs.items()}
    assert not any(missed.values()), missed


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="issue 23: the supported sets of a concept's runs agree with a mean Jaccard "
                   "of 0.23 in the full evaluation (target 0.9)")
def test_issue23_supported_sets_agree_across_runs(runs):
    jac = []
    for c in TARGET_CONCEPTS:
        a, b = set(_supported(runs[c, 0][0])), set(_supported(runs[c, 1][0]))
        jac.append(len(a & b) / max(1, len(a | b)))
    assert sum(jac) / len(jac) >= 0.9, jac


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="issue 23: R-precision 0.87 in the full evaluation (target 0.95)")
def test_issue23_r_precision(runs):
    spec = toy_spec()
    rp = [len(set(_words(dec, len(spec.concepts[c].constituents))) & set(spec.concepts[c].constituents))
          / len(spec.concepts[c].constituents) for (c, _), (dec, _) in runs.items()]
    assert sum(rp) / len(rp) >= 0.95, rp
