"""The contract every backend keeps, in the manner of diffusers' pipeline tests: one set of behaviour tests
(decompose, render, explain_image, detect_bias, save/load, resume) run over each backend of conftest.py's
``backend`` fixture: tiny, fake SD 1.5, fake SD 2.1 (v-prediction), fake SDXL (tests/fakehub.py: real configs,
shrunk random weights) and the toy world. Public API only (``import conceptor_nb``).
"""
import contextlib
import dataclasses
import math

import pytest
import torch

import conceptor_nb as cn


@contextlib.contextmanager
def _one_thread():
    """One torch thread: these models are small, and on a busy 2-core machine a second OpenMP thread makes
    every op wait for it (a render took 40 times longer)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _single_thread():
    with _one_thread():
        yield


@pytest.fixture(scope="session")
def contract_cache(tmp_path_factory):
    """The image and vocabulary cache the contract's runs share (so each backend generates once)."""
    return tmp_path_factory.mktemp("contract_cache")


def _decompose(backend, cache, **kw):
    return cn.decompose(backend.pipe, backend.concept, clip=backend.clip, settings=backend.settings, cache_dir=cache,
                        verbose=False, **kw)


@pytest.fixture(scope="session")
def decomposition(backend, contract_cache):
    with _one_thread():
        return _decompose(backend, contract_cache)


def _readable(tokenizer, token_id: int) -> set[str]:
    """The forms a vocabulary token may be shown as: decoded, or its BPE piece without the word end."""
    return {tokenizer.decode([token_id]).strip(), tokenizer.convert_ids_to_tokens(token_id).replace("</w>", "")}


def _images(x, n, size):
    assert x.shape == (n, 3, size, size) and x.dtype == torch.float32
    assert torch.isfinite(x).all() and float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_the_backend_is_the_kind_it_names(backend):
    pipe = backend.pipe
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == backend.size
    assert (pipe.scheduler.config.get("prediction_type", "epsilon") == "v_prediction") == (backend.name == "sd21v")
    assert (type(pipe).__name__ == "StableDiffusionXLPipeline") == (backend.name == "sdxl")


# -- decompose ---------------------------------------------------------------------------------------------------
def test_decompose_gives_vocabulary_tokens_with_sorted_non_negative_coefficients(backend, decomposition):
    dec, s, tok = decomposition, backend.settings, backend.pipe.tokenizer
    assert dec.concept == backend.concept and dec.model == backend.model and dec.settings == s
    assert len(dec.tokens) == len(dec.token_ids) == len(dec.coefficients) == s.dict_size
    special = set(tok.all_special_ids)
    for token, token_id in zip(dec.tokens, dec.token_ids):
        assert isinstance(token_id, int) and 0 <= token_id < len(tok) and token_id not in special
        assert token in _readable(tok, token_id), (token, token_id)
    assert len(set(dec.token_ids)) == len(dec.token_ids)  # no token twice
    assert not set(tok(backend.word, add_special_tokens=False).input_ids) & set(dec.token_ids)  # the concept's own
    c = dec.coefficients
    assert all(isinstance(x, float) and math.isfinite(x) and x >= 0.0 for x in c)
    assert c == sorted(c, reverse=True) and c[0] > 0.0
    assert dec.n_tokens == s.n_tokens and dec.top() == list(zip(dec.tokens[:s.n_tokens], c[:s.n_tokens]))
    assert [v["step"] for v in dec.history["validation"]] == [2, 4] and len(dec.history["loss"]) == s.steps


# -- render ------------------------------------------------------------------------------------------------------
def test_render_is_an_image_per_seed_and_the_same_for_the_same_seeds(backend, decomposition):
    pipe = backend.pipe
    a = decomposition.render(pipe, seeds=[0, 1])
    _images(a, 2, backend.size)
    assert torch.equal(a, decomposition.render(pipe, seeds=[0, 1]))
    assert float((a[0] - a[1]).abs().mean()) > 0.01  # each seed its own image
    alone = decomposition.render(pipe, seeds=[1])
    diff = float((alone[0] - a[1]).abs().max())
    # a seed's image does not depend on the rest of the batch (up to float noise of batch-size-dependent
    # kernels, measured 1e-4 at 512 px: below half an 8-bit level)
    assert diff < 0.5 / 255, diff
    # the explanation is the top n_tokens: a pseudo-token of every dictionary token draws another image
    assert not torch.equal(decomposition.render(pipe, seeds=[1], n_tokens=len(decomposition.tokens)), alone)


# -- explain_image -----------------------------------------------------------------------------------------------
def test_explain_image_keeps_tokens_of_the_decomposition(backend, decomposition):
    dec, top = decomposition, decomposition.tokens[:decomposition.n_tokens]
    kw = dict(seed=0, clip=backend.clip, duplicate_threshold=None)
    # a threshold no similarity reaches: nothing is dropped
    whole = cn.explain_image(backend.pipe, dec, threshold=1.01, **kw)
    assert whole.kept == top and whole.kept_coefficients == pytest.approx(dec.coefficients[:len(top)], rel=1e-6)
    _images(whole.image[None], 1, backend.size)
    assert torch.equal(whole.kept_image, whole.image) and len(whole.token_images) == len(top)
    # a threshold every similarity passes: each pass drops the weakest token, until one is left
    strict = cn.explain_image(backend.pipe, dec, threshold=-2.0, **kw)
    dropped = [t["token"] for t in strict.trace if t["dropped"]]
    assert strict.kept == top[:1] and dropped == top[:0:-1]
    assert set(strict.kept) <= set(top) and strict.kept_coefficients == pytest.approx(dec.coefficients[:1], rel=1e-6)
    assert torch.equal(strict.image, whole.image)  # the same seed's image of the whole explanation
    _images(strict.kept_image[None], 1, backend.size)


# -- detect_bias ---------------------------------------------------------------------------------------------------
def test_detect_bias_shares_add_up(backend, decomposition, contract_cache):
    dec = decomposition
    attribute = {"first": [dec.tokens[0]], "second": [dec.tokens[1]]}
    rep = cn.detect_bias(backend.pipe, dec, attribute, clip=backend.clip, n=2, cache_dir=contract_cache)
    assert rep.n_images == 2 and len(rep.labels) == 2 and set(rep.labels) <= set(attribute)
    assert sum(rep.image_share.values()) == pytest.approx(1.0)  # every image is one of the values
    for value, share in rep.image_share.items():
        low, high = rep.image_ci[value]
        assert 0.0 <= low <= share <= high <= 1.0
        assert share == rep.labels.count(value) / 2
    top = dec.top()
    total = sum(c for _, c in top)
    for value, words in attribute.items():  # each value's share of the top tokens' coefficient mass
        assert rep.coefficient_share[value] == pytest.approx(sum(c for t, c in top if t in words) / total)
    assert rep.coefficient_share["first"] > 0.0


# -- save and load -------------------------------------------------------------------------------------------------
def test_save_load_round_trip_is_exact(backend, decomposition, tmp_path):
    decomposition.save(tmp_path / "dec")
    back = cn.Decomposition.load(tmp_path / "dec")
    for f in dataclasses.fields(cn.Decomposition):
        assert getattr(back, f.name) == getattr(decomposition, f.name), f.name
    assert back.coefficients == decomposition.coefficients  # float32 values, bit for bit
    assert torch.equal(back.render(backend.pipe, seeds=[0]), decomposition.render(backend.pipe, seeds=[0]))


# -- resume ---------------------------------------------------------------------------------------------------------
def _count_fit_steps(pipe, stop_at=None):
    """A UNet hook counting the fit's steps (the UNet calls with gradients: generation and validation run
    without), raising KeyboardInterrupt at the ``stop_at``-th; remove it with ``.remove()``."""
    calls = []

    def hook(module, args):
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == stop_at:
                raise KeyboardInterrupt

    handle = pipe.unet.register_forward_pre_hook(hook)
    handle.calls = calls
    return handle


def test_an_interrupted_fit_resumes_to_the_uninterrupted_result(backend, decomposition, contract_cache, tmp_path):
    s, ck = backend.settings, tmp_path / "checkpoint"
    hook = _count_fit_steps(backend.pipe, stop_at=s.val_every + 1)  # Ctrl-C in the step after the checkpoint
    try:
        with pytest.raises(KeyboardInterrupt):
            _decompose(backend, contract_cache, checkpoint_dir=ck)
    finally:
        hook.remove()
    assert ck.is_dir() and any(ck.iterdir())  # the checkpoint is there
    hook = _count_fit_steps(backend.pipe)
    try:
        resumed = _decompose(backend, contract_cache, checkpoint_dir=ck)
    finally:
        hook.remove()
    assert len(hook.calls) == s.steps - s.val_every  # it went on from the checkpoint, it did not start over
    assert resumed.token_ids == decomposition.token_ids and resumed.coefficients == decomposition.coefficients
    for key in ("loss", "reconstruction", "sparsity", "validation", "best_step", "best_score"):
        assert resumed.history[key] == decomposition.history[key], key
