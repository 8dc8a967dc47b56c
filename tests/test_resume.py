"""Faults: an interrupted fit resumes to exactly the coefficients of an uninterrupted one; the caches
cannot lie (other weights under the same name, damaged bytes) and survive concurrent writers."""
from __future__ import annotations

import threading
import warnings

import pytest
import torch

import conceptor_nb.conceptor as conceptor_mod
from conceptor_nb import concept_images, decompose, load_pipeline
from conceptor_nb.config import TINY
from conceptor_nb.errors import CacheError, FitDivergedError
from conceptor_nb.results import load_verified, save_verified

# no validation images: the result is the MLP's final state, so every resumed step must be exact
RESUME = TINY.replace(n_train=3, n_val=0, steps=9, val_every=3, gen_steps=2, val_steps=2, dict_size=16)


def test_interrupted_fit_resumes_to_the_same_coefficients(tiny_pipe, tiny_clip, cache, tmp_path, monkeypatch):
    ref = decompose(tiny_pipe, "a dog", clip=tiny_clip, settings=RESUME, verbose=False)
    ck = tmp_path / "ck"
    real, calls = conceptor_mod.step_loss, []

    def interrupt_at_step_5(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(conceptor_mod, "step_loss", interrupt_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        decompose(tiny_pipe, "a dog", clip=tiny_clip, settings=RESUME, verbose=False, checkpoint_dir=ck)
    assert (ck / "fit_state.safetensors").exists()
    monkeypatch.setattr(conceptor_mod, "step_loss", real)
    resumed = decompose(tiny_pipe, "a dog", clip=tiny_clip, settings=RESUME, verbose=False, checkpoint_dir=ck)
    assert resumed.coefficients == ref.coefficients and resumed.token_ids == ref.token_ids
    assert resumed.history["loss"] == ref.history["loss"]  # steps 4-9 were recomputed exactly
    # a checkpoint of other settings is not resumed from
    with pytest.warns(UserWarning, match="another run"):
        other = decompose(tiny_pipe, "a dog", clip=tiny_clip, settings=RESUME.replace(lr=2e-3), verbose=False,
                          checkpoint_dir=ck)
    assert other.coefficients != ref.coefficients and len(other.history["loss"]) == RESUME.steps


def test_nan_loss_stops_the_fit(tiny_pipe, tiny_clip, cache, monkeypatch):
    real = conceptor_mod.step_loss

    def nan_loss(*a, **k):
        loss, rec, sparse = real(*a, **k)
        return loss * float("nan"), rec, sparse

    monkeypatch.setattr(conceptor_mod, "step_loss", nan_loss)
    with pytest.raises(FitDivergedError, match="loss became nan at step 1.*Lower lr"):
        decompose(tiny_pipe, "a dog", clip=tiny_clip, settings=RESUME, verbose=False)


# -- caches ---------------------------------------------------------------------------------------
KW = dict(steps=2, guidance=2.0, sampler="dpm", verbose=False)


def test_other_weights_under_the_same_name_miss_the_cache(tiny_pipe, cache):
    other = load_pipeline("tiny", device="cpu", seed=1)
    assert other.conceptor_model == tiny_pipe.conceptor_model  # same name, other weights
    a = concept_images(tiny_pipe, "a photo of a dog", 2, **KW)
    b = concept_images(other, "a photo of a dog", 2, **KW)
    assert not torch.equal(a, b)
    assert len(list(cache.glob("images/*/images.safetensors"))) == 2


def test_garbled_cache_bytes_are_a_warned_miss(tiny_pipe, cache):
    first = concept_images(tiny_pipe, "a photo of a cat", 2, **KW)
    (file,) = cache.glob("images/*/images.safetensors")
    data = bytearray(file.read_bytes())
    data[-100:] = bytes(255 - b for b in data[-100:])  # damage pixels, keep the header readable
    file.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="checksum"):
        load_verified(file)
    with pytest.warns(UserWarning, match="bad image-cache entry"):
        again = concept_images(tiny_pipe, "a photo of a cat", 2, **KW)
    assert torch.equal(again, first)
    load_verified(file)  # repaired
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(concept_images(tiny_pipe, "a photo of a cat", 2, **KW), first)


def test_garbled_vocabulary_cache_is_recomputed(tiny_clip, cache):
    from conceptor_nb.dictionary import vocab_text_features

    first = vocab_text_features(tiny_clip, verbose=False)
    (file,) = cache.glob("vocab/*.safetensors")
    data = bytearray(file.read_bytes())
    data[-8:] = b"\x7f" * 8
    file.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="bad vocabulary-cache entry"):
        again = vocab_text_features(tiny_clip, verbose=False)
    assert torch.equal(again, first)


def test_sixty_concurrent_writers_of_one_entry(tmp_path):
    target = tmp_path / "entry.safetensors"
    errors = []

    def write(i):
        try:
            save_verified(target, {"x": torch.full((64, 64), float(i))}, {"writer": str(i)})
        except Exception as err:  # noqa: BLE001 - the test counts every failure
            errors.append(err)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(60)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    tensors, meta = load_verified(target)
    assert torch.equal(tensors["x"], torch.full((64, 64), float(meta["writer"])))
    assert [p.name for p in tmp_path.iterdir()] == ["entry.safetensors"]  # no temp file left behind
