"""Single-image decomposition, bias, manipulation: the mechanics, on the tiny random pipeline.

What they find on a trained model is checked on the toy world (tests/test_toyworld_groundtruth.py).
"""
import pytest
import torch

from conceptor_nb import (BiasReport, Decomposition, ImageExplanation, Mitigation, Sweep, decompose, detect_bias,
                          explain_image, mitigate_bias, panel, set_coefficient, sweep)
from conceptor_nb.apps.bias import coefficient_mass, wilson
from conceptor_nb.config import TINY
from conceptor_nb.method.fit import combine

FAST = TINY.replace(n_train=4, n_val=2, gen_steps=3, dict_size=32, n_tokens=5, steps=4, val_every=2, val_steps=2)


@pytest.fixture(scope="module")
def dec(tiny_pipe, tiny_clip, tmp_path_factory):
    return decompose(tiny_pipe, "a dog", clip=tiny_clip, settings=FAST, verbose=False,
                     cache_dir=tmp_path_factory.mktemp("cache"))


def _hand(tokenizer, words, coefs, n=None):
    ids = [tokenizer(w, add_special_tokens=False).input_ids[0] for w in words]
    return Decomposition(concept="thing", tokens=list(words), token_ids=ids, coefficients=list(coefs),
                         n_tokens=n or len(words), norm=None, settings={"gen_steps": 2, "guidance": 2.0, "gen_scheduler": "dpm"})


# -- manipulation ---------------------------------------------------------------------------------
def test_set_coefficient_semantics(tiny_pipe):
    tok = tiny_pipe.tokenizer
    d = _hand(tok, ["red", "circle", "blue", "tail"], [3.0, 2.0, 1.0, 0.5], n=3)
    up = set_coefficient(d, "blue", 5.0)
    assert up.top() == [("blue", 5.0), ("red", 3.0), ("circle", 2.0)] and up.n_tokens == 3
    gone = set_coefficient(d, "red", 0.0)
    assert dict(gone.top())["red"] == 0.0 and gone.n_tokens == 3
    tail = set_coefficient(d, "tail", 1.5)  # from the dictionary's tail into the explanation
    assert tail.n_tokens == 4 and ("tail", 1.5) in tail.top()
    new = set_coefficient(d, "green", 0.7, tokenizer=tok)
    assert ("green", 0.7) in new.top() and new.token_ids[new.tokens.index("green")] == tok("green", add_special_tokens=False).input_ids[0]
    with pytest.raises(ValueError, match="tokenizer"):
        set_coefficient(d, "green", 0.7)
    with pytest.raises(ValueError, match="non-negative"):
        set_coefficient(d, "red", -1)
    assert d.top() == [("red", 3.0), ("circle", 2.0), ("blue", 1.0)]  # the original is untouched
    # the pseudo-token is the weighted sum of the edited coefficients
    table = tiny_pipe.text_encoder.get_input_embeddings().weight
    want = combine(torch.tensor([5.0, 3.0, 2.0]), table[torch.tensor(up.token_ids[:3])].float(), None)
    torch.testing.assert_close(up.vector(tiny_pipe), want)


def test_sweep_renders_each_value_with_the_same_seeds(tiny_pipe, dec, tmp_path):
    token = dec.tokens[0]
    sw = sweep(tiny_pipe, dec, token, [0.0, dec.coefficients[0], 4 * dec.coefficients[0]], seeds=[1, 2],
               measure={"mean": lambda im: im.mean()})
    assert sw.images.shape[:2] == (3, 2) and len(sw.scores["mean"]) == 3
    base = dec.render(tiny_pipe, [1, 2])
    torch.testing.assert_close(sw.images[1], base, atol=1e-5, rtol=0)  # the unchanged value gives dec's own images
    assert (sw.images[0] - sw.images[2]).abs().max() > 1e-3
    sw.save(tmp_path)
    back = Sweep.load(tmp_path)
    assert back.values == sw.values and back.scores == sw.scores and torch.equal(back.images, sw.images)


def test_panel_without_front_end(tiny_pipe, dec):
    p = panel(tiny_pipe, dec, k=3, seeds=(0, 1), debounce=0, steps=2)
    first = p.image.value
    assert first[:4] == b"\x89PNG"
    p.sliders[0].value = p.sliders[0].max
    assert p.current().top(3)[0] == (dec.tokens[0], pytest.approx(p.sliders[0].max))
    assert p.image.value != first
    p.seed.value = "x,y"
    assert "integers" in p.status.value


# -- single image ---------------------------------------------------------------------------------
def test_explain_image_passes_are_batched_and_consistent(tiny_pipe, tiny_clip, dec, monkeypatch):
    import conceptor_nb.apps.explain as ex

    calls = []
    real = ex.generate
    monkeypatch.setattr(ex, "generate", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    res = explain_image(tiny_pipe, dec, seed=3, clip=tiny_clip, threshold=-2.0, duplicate_threshold=None, steps=2)
    # threshold below any similarity: every pass drops its weakest token until one is left
    assert len(res.kept) == 1
    passes = max(r["pass"] for r in res.trace)
    assert passes == dec.n_tokens - 1
    assert len(calls) == 1 + passes + 1  # original, one batch per pass, the kept tokens' own images
    assert res.token_images.shape[0] == 1
    strict = explain_image(tiny_pipe, dec, seed=3, clip=tiny_clip, threshold=1.01, steps=2)
    assert strict.kept == dec.tokens[: dec.n_tokens]
    assert not any(r["dropped"] for r in strict.trace) and len(strict.trace) == len(strict.kept)
    torch.testing.assert_close(strict.kept_image, strict.image)


def test_explain_image_save_load(tiny_pipe, tiny_clip, dec, tmp_path):
    res = explain_image(tiny_pipe, dec, seed=4, clip=tiny_clip, threshold=0.5, steps=2)
    res.save(tmp_path)
    back = ImageExplanation.load(tmp_path)
    assert back.kept == res.kept and back.trace == res.trace
    torch.testing.assert_close(back.token_images, res.token_images)
    assert len(res.to_frame()) == len(res.trace)


# -- bias -----------------------------------------------------------------------------------------
def test_wilson_interval():
    lo, hi = wilson(8, 10)
    assert lo == pytest.approx(0.490, abs=1e-3) and hi == pytest.approx(0.943, abs=1e-3)
    assert wilson(0, 0) == (0.0, 1.0)


def test_coefficient_mass(tiny_pipe):
    d = _hand(tiny_pipe.tokenizer, ["red", "crimson", "blue", "circle"], [2.0, 1.0, 1.0, 1.0])
    mass = coefficient_mass(d, {"red": ["red", "crimson"], "blue": ["blue"]})
    assert mass == {"red": pytest.approx(0.6), "blue": pytest.approx(0.2)}
    with pytest.raises(ValueError, match="two values"):
        coefficient_mass(d, {"red": ["red"]})


def test_detect_bias_report(tiny_pipe, tiny_clip, dec, tmp_path):
    images = torch.rand(10, 3, 32, 32)
    oracle = lambda im: ["a"] * 7 + ["b"] * (len(im) - 7)  # noqa: E731
    rep = detect_bias(tiny_pipe, dec, {"a": ["red"], "b": ["blue"]}, clip=tiny_clip, images=images, oracle=oracle)
    assert rep.n_images == 10 and sum(rep.image_share.values()) == pytest.approx(1.0)
    assert rep.oracle_share == {"a": 0.7, "b": 0.3}
    for v in rep.values:
        assert rep.image_ci[v][0] <= rep.image_share[v] <= rep.image_ci[v][1]
    rep.save(tmp_path)
    assert BiasReport.load(tmp_path) == rep
    assert list(rep.to_frame()["value"]) == ["a", "b"]


def test_mitigation_loop_meets_the_target(tiny_pipe, monkeypatch, tmp_path):
    """The calibration loop, on a stand-in renderer whose share of 'blue' grows with blue's coefficient."""
    d = _hand(tiny_pipe.tokenizer, ["red", "circle"], [2.0, 1.0])

    def fake_render(self, pipe, seeds, **kw):
        c = dict(self.top()).get("blue", 0.0)
        share = c / (c + 2.0)
        return torch.tensor([[1.0 if i < share * len(seeds) else 0.0] for i in range(len(seeds))])

    monkeypatch.setattr(Decomposition, "render", fake_render)
    classify = lambda x: ["blue" if float(v) > 0.5 else "red" for v in x.flatten()]  # noqa: E731
    m = mitigate_bias(tiny_pipe, d, {"red": ["red"], "blue": ["blue"]}, classifier=classify, n=40, tolerance=0.05)
    assert m.before == {"red": 1.0, "blue": 0.0}
    assert m.token == "blue" and m.success and abs(m.after["blue"] - 0.5) <= 0.05
    assert ("blue", pytest.approx(m.coefficient_after)) in m.mitigated.top()
    assert len(m.rounds) >= 2
    m.save(tmp_path)
    assert Mitigation.load(tmp_path) == m
    with pytest.raises(ValueError, match="target"):
        mitigate_bias(tiny_pipe, d, {"red": ["red"], "blue": ["blue"]}, target={"red": 0.9}, classifier=classify)


def test_mitigation_never_returns_a_coefficient_that_breaks_the_concept(tiny_pipe, monkeypatch, tmp_path):
    """With ``identity``: the stand-in renderer draws 'blue' more often as blue's coefficient grows, but past 1.0
    it stops drawing the concept; 50% blue needs 2.0, so the target cannot be met while the concept survives."""
    d = _hand(tiny_pipe.tokenizer, ["red", "circle"], [2.0, 1.0])

    def fake_render(self, pipe, seeds, **kw):
        c = dict(self.top()).get("blue", 0.0)
        share, concept = c / (c + 2.0), 1.0 if c < 1.0 else -1.0
        return torch.tensor([[1.0 if i < share * len(seeds) else 0.0, concept] for i in range(len(seeds))])

    monkeypatch.setattr(Decomposition, "render", fake_render)
    classify = lambda x: ["blue" if float(v) > 0.5 else "red" for v in x[:, 0]]  # noqa: E731
    identity = lambda x: float((x[:, 1] > 0).float().mean())  # noqa: E731
    m = mitigate_bias(tiny_pipe, d, {"red": ["red"], "blue": ["blue"]}, classifier=classify, identity=identity,
                      n=40, tolerance=0.05)
    assert any(r["identity"] == 0.0 for r in m.rounds), m.rounds  # the search went past the concept's edge ...
    assert m.coefficient_after < 1.0 and m.identity_before == m.identity_after == 1.0  # ... and did not keep it
    assert not m.success and 0 < m.after["blue"] < 0.5 - 0.05
    assert list(m.to_frame()["value"]) == ["red", "blue", "identity"]
    m.save(tmp_path)
    assert Mitigation.load(tmp_path) == m


def test_result_plots_take_an_axes(tiny_pipe, tiny_clip, dec):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from conceptor_nb.viz import word_picture

    fig, axes = plt.subplots(1, 4)
    assert dec.plot(ax=axes[0]) is axes[0]
    assert word_picture(dec, ax=axes[1]) is axes[1]
    rep = detect_bias(tiny_pipe, dec, {"a": ["red"], "b": ["blue"]}, clip=tiny_clip, images=torch.rand(4, 3, 32, 32))
    assert rep.plot(ax=axes[2]) is axes[2]
    sw = sweep(tiny_pipe, dec, dec.tokens[0], [0.0, 1.0], seeds=[0], steps=2)
    assert sw.plot(ax=axes[3]) is axes[3]
    plt.close(fig)
