"""Error bars (several fits on disjoint parts of the images) and the significance test of each top token."""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import pytest
import torch

from conceptor_nb import Decomposition, decompose, word_picture
from conceptor_nb.config import TINY
from conceptor_nb.errors import InvalidInputError
from conceptor_nb.method import decompose as decompose_module
from conceptor_nb.method.fit import removal_test, vocab_norm
from conceptor_nb.method.generate import image_seeds

FAST = TINY.replace(n_train=6, n_val=0, gen_steps=2, dict_size=16, n_tokens=4, steps=3, val_every=0, n_test=2,
                    test_draws=2)


def test_splits_are_disjoint_and_errors_bars_are_the_fits_statistics(tiny_pipe, tiny_clip, cache, monkeypatch):
    seen, fixed = [], torch.rand(3, FAST.dict_size)

    def fake_fit(pipe, images, token_ids, s, **kw):  # fit j returns row j of ``fixed``
        seen.append((images, s.seed))
        return fixed[len(seen) - 1].clone(), {"loss": [0.0], "validation": [], "timings": {"fit_s": 1.0}}

    monkeypatch.setattr(decompose_module, "fit", fake_fit)
    images = torch.rand(6, 3, 32, 32)
    dec = decompose(tiny_pipe, "a dog", clip=tiny_clip, settings=FAST.replace(fits=3), images=images, verbose=False)
    parts = [p for p, _ in seen]
    assert [len(p) for p in parts] == [2, 2, 2] and [s for _, s in seen] == [0, 1, 2]
    rows = {tuple(x.flatten()[:8].tolist()) for p in parts for x in p}
    assert len(rows) == 6  # every image in exactly one part
    order = torch.argsort(fixed.mean(0), descending=True)
    assert dec.coefficients == pytest.approx(fixed.mean(0)[order].tolist())
    assert dec.spread == pytest.approx(fixed.std(0)[order].tolist())
    top = torch.zeros_like(fixed).scatter_(1, torch.topk(fixed, FAST.n_tokens, dim=1).indices, 1.0)
    assert dec.kept == pytest.approx(top.mean(0)[order].tolist())
    assert dec.history["timings"]["fit_s"] == 3.0 and len(dec.history["fits"]) == 3


def test_one_fit_has_no_error_bars_and_too_many_fits_are_refused_before_work(tiny_pipe, tiny_clip, cache, monkeypatch):
    dec = decompose(tiny_pipe, "a dog", clip=tiny_clip, settings=FAST.replace(n_test=0), verbose=False)
    assert dec.spread == [] and dec.kept == [] and dec.delta_loss == [] and set(dec.supported()) == {None}
    monkeypatch.setattr(decompose_module, "concept_images", lambda *a, **k: pytest.fail("generated before the check"))
    with pytest.raises(InvalidInputError, match="fits=7"):
        decompose(tiny_pipe, "a dog", clip=tiny_clip, settings=FAST.replace(fits=7), verbose=False)


def test_significance_numbers_are_finite_reproducible_and_saved(tiny_pipe, tiny_clip, cache, tmp_path):
    a = decompose(tiny_pipe, "a dog", clip=tiny_clip, settings=FAST, verbose=False)
    b = decompose(tiny_pipe, "a dog", clip=tiny_clip, settings=FAST, verbose=False)
    assert len(a.delta_loss) == len(a.delta_se) == FAST.n_tokens
    assert all(math.isfinite(x) for x in a.delta_loss + a.delta_se) and all(x > 0 for x in a.delta_se)
    assert a.delta_loss == b.delta_loss and a.delta_se == b.delta_se
    u = a.history["unet_evals"]
    assert u["test"] == (FAST.n_tokens + 1) * FAST.n_test * FAST.test_draws and u["total"] == sum(
        v for k, v in u.items() if k != "total")
    a.save(tmp_path / "r")
    c = Decomposition.load(tmp_path / "r")
    assert c.delta_loss == a.delta_loss and c.supported() == a.supported()
    frame = a.to_frame()
    assert frame["supported"].tolist() == a.supported()[: a.n_tokens]


def test_removal_test_of_a_zero_coefficient_is_exactly_zero_and_held_out_images_are_new(tiny_pipe):
    images = torch.rand(2, 3, 32, 32)
    rise, se = removal_test(tiny_pipe, images, [320, 1929, 2368], [0.5, 0.3, 0.0], vocab_norm(tiny_pipe), FAST, 4)
    assert rise[2] == 0.0 and se[2] == 0.0 and rise[0] != 0.0
    assert not set(image_seeds(0, 100, "test")) & (set(image_seeds(0, 100)) | set(image_seeds(0, 100, "val")))


def fake(delta, se, spread=()) -> Decomposition:
    return Decomposition(concept="a dog", tokens=["red", "blue", "cat", "dog"], token_ids=[736, 1746, 2368, 1929],
                         coefficients=[0.5, 0.3, 0.1, 0.05], n_tokens=3, norm=0.5, delta_loss=list(delta),
                         delta_se=list(se), spread=list(spread))


def test_displays_mark_unsupported_tokens():
    dec = fake([0.01, 0.0001, 0.02], [0.001, 0.001, 0.001], spread=[0.1, 0.05, 0.02, 0.01])
    assert dec.supported() == [True, False, True, None]
    ax = dec.plot(k=3)
    colours = [p.get_facecolor() for p in ax.patches]
    grey = [c for c in colours if c[0] == c[1] == c[2]]
    assert len(colours) == 3 and len(grey) == 1 and colours[1] in grey and "not supported" in ax.get_title()
    assert ax.containers and any(c.has_xerr for c in ax.containers)  # the spread as error bars
    ax = word_picture(dec, k=3)
    styles = {t.get_text(): t.get_fontstyle() for t in ax.texts}
    assert styles == {"red": "normal", "blue": "italic", "cat": "normal"}
    plt.close("all")
    untested = fake([], [])
    assert "not supported" not in untested.plot(k=3).get_title()
    assert {t.get_fontstyle() for t in word_picture(untested, k=3).texts} == {"normal"}
    plt.close("all")


def test_faithfulness_rows_are_finite_and_the_floor_is_a_token_outside_the_explanation(tiny_pipe, tiny_clip, cache):
    dec = decompose(tiny_pipe, "a dog", clip=tiny_clip, settings=FAST.replace(n_test=0), verbose=False)
    f = dec.faithfulness(tiny_pipe, tiny_clip, n=2)
    assert len(f) == 3 and f[["similarity", "distance"]].notna().all().all()
    assert (f["similarity"].abs() <= 1 + 1e-5).all() and (f["distance"] >= 0).all()
    floor = f["images"][2]
    assert "(floor)" in floor and not any(repr(t) in floor for t in dec.tokens[: dec.n_tokens])
    assert f.equals(dec.faithfulness(tiny_pipe, tiny_clip, n=2))  # seeded: the same floor token and images
