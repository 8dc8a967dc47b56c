"""The core method on a tiny random SD-shaped pipeline (CPU, offline, seconds)."""
import hashlib
import importlib
import json
import math

import pytest
import torch

from conceptor_nb import Decomposition, build_dictionary, concept_images, decompose, generate, load_pipeline
from conceptor_nb.config import TINY
from conceptor_nb.method.fit import CoefficientMLP, combine, diffusion_loss, encode_latents, vocab_norm
from conceptor_nb.errors import CacheError, ModelNotFoundError
from conceptor_nb.method.inject import pseudo_token, template_prompt, tokenize

FAST = TINY.replace(n_train=4, n_val=2, gen_steps=3, dict_size=32, n_tokens=5, steps=6, val_every=3, val_steps=2)


def _fingerprint(pipe):
    h = hashlib.sha256()
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        for name, p in module.state_dict().items():
            h.update(name.encode())
            h.update(p.detach().cpu().float().numpy().tobytes())
    flags = [p.requires_grad for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters()]
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in pipe.text_encoder.modules())
    return h.hexdigest(), tuple(flags), hooks, type(pipe.scheduler).__name__, dict(pipe.scheduler.config)


def test_tokenizer_ids_match_stable_diffusion(tiny_pipe):
    tok = tiny_pipe.tokenizer
    assert len(tok) == 49408
    assert tok("president", add_special_tokens=False).input_ids == [1940]
    assert tok("obama", add_special_tokens=False).input_ids == [4276]
    assert tok("a photo of a president").input_ids == [49406, 320, 1125, 539, 320, 1940, 49407]


def test_decompose_end_to_end(tiny_pipe, tiny_clip, cache):
    dec = decompose(tiny_pipe, "a dog", clip=tiny_clip, settings=FAST, verbose=False)
    assert len(dec.tokens) == FAST.dict_size and dec.n_tokens == FAST.n_tokens
    assert "dog" not in dec.tokens  # the concept's own token is excluded
    assert dec.coefficients == sorted(dec.coefficients, reverse=True) and min(dec.coefficients) >= 0
    losses = dec.history["loss"]
    assert len(losses) == FAST.steps and all(math.isfinite(x) for x in losses)
    assert [v["step"] for v in dec.history["validation"]] == [3, 6]
    assert dec.history["best_step"] in (3, 6)
    # the pseudo-token is rescaled to the mean norm of the vocabulary embeddings
    w = dec.vector(tiny_pipe)
    assert torch.isfinite(w).all()
    assert float(w.norm()) == pytest.approx(vocab_norm(tiny_pipe), rel=1e-4)
    assert dec.to_frame()["share"].sum() == pytest.approx(1.0)


def test_v_prediction_pipeline_fits():
    from conceptor_nb.models import tiny_pipeline

    pipe = tiny_pipeline(prediction_type="v_prediction")
    pipe.unet.requires_grad_(False), pipe.text_encoder.requires_grad_(False), pipe.vae.requires_grad_(False)
    images = torch.rand(3, 3, 32, 32)
    # fit directly with a given dictionary (no CLIP needed): a v-prediction scheduler takes the v target
    from conceptor_nb.method.fit import fit

    coef, hist = fit(pipe, images, [320, 1929, 2368], FAST.replace(val_every=0, n_tokens=2), verbose=False)
    assert coef.shape == (3,) and all(math.isfinite(x) for x in hist["loss"])
    assert pipe.scheduler.config.prediction_type == "v_prediction"


def test_fit_in_bf16_autocast_stays_close_to_float32(tiny_pipe):
    from conceptor_nb.method.fit import fit

    images = torch.rand(3, 3, 32, 32)
    ids = [320, 1929, 2368, 4276, 1125, 539]
    s = FAST.replace(val_every=0, n_tokens=3, steps=4)
    c32, h32 = fit(tiny_pipe, images, ids, s, verbose=False)
    c16, h16 = fit(tiny_pipe, images, ids, s.replace(autocast="bf16"), verbose=False)
    assert h32["autocast"] == "off" and h16["autocast"] == "bfloat16"
    assert c16.dtype == torch.float32  # the MLP and its coefficients stay float32
    assert not torch.equal(c16, c32)  # the model passes did run in bf16 ...
    torch.testing.assert_close(c16, c32, rtol=2e-2, atol=1e-4)  # ... and barely moved the coefficients
    assert all(math.isfinite(x) for x in h16["loss"])


def test_autocast_modes(monkeypatch):
    dmod = importlib.import_module("conceptor_nb.method.vocab")  # the package exports the function

    f = dmod.autocast_dtype
    assert f("cpu", "off", torch.float32) is None and f("cpu", None, torch.float32) is None
    assert f("cpu", "bf16", torch.float32) == torch.bfloat16
    monkeypatch.setattr(dmod, "cpu_has_native_bf16", lambda: True)
    assert f("cpu", "auto", torch.float32) == torch.bfloat16
    assert f("cpu", "auto", torch.float16) is None  # half weights already: nothing to autocast
    monkeypatch.setattr(dmod, "cpu_has_native_bf16", lambda: False)
    assert f("cpu", "auto", torch.float32) is None  # emulated bf16 would be slower
    assert f("mps", "auto", torch.float32) is None
    with pytest.raises(ValueError, match="autocast must be"):
        f("cpu", "fp16-please", torch.float32)
    with pytest.raises(ValueError, match="not on mps"):
        f("mps", "bf16", torch.float32)


def test_min_timestep_restricts_the_fits_noise_levels(tiny_pipe, monkeypatch):
    """``min_timestep`` (a toy-world option; 0 is the authors' uniform t) keeps every drawn t in the upper range,
    and the fit draws its batches through it."""
    import conceptor_nb.method.fit as conceptor_mod
    from conceptor_nb.method.fit import fit, sample_batch

    latents = torch.randn(2, 5, 4, 4, 4)
    gen = torch.Generator().manual_seed(0)
    assert int(sample_batch(latents, 200, gen, 1000, "cpu")[2].min()) < 100
    t = sample_batch(latents, 200, torch.Generator().manual_seed(0), 1000, "cpu", 0.4)[2]
    assert int(t.min()) >= 400 and int(t.max()) < 1000
    drawn = []
    real = conceptor_mod.sample_batch

    def recording(*a, **kw):
        out = real(*a, **kw)
        drawn.append(out[2])
        return out

    monkeypatch.setattr(conceptor_mod, "sample_batch", recording)
    s = TINY.replace(steps=6, val_every=0, min_timestep=0.5)
    fit(tiny_pipe, torch.rand(2, 3, 32, 32), [320, 1929, 2368], s, verbose=False)
    assert len(drawn) == 6 and int(torch.cat(drawn).min()) >= 500


def test_gradient_reaches_the_mlp_and_not_the_model(tiny_pipe):
    table = tiny_pipe.text_encoder.get_input_embeddings().weight
    ids = [320, 1929, 2368, 4276]
    emb = table[ids].detach().float()
    mlp = CoefficientMLP(emb.shape[1], 16)
    latents = encode_latents(tiny_pipe.vae, torch.rand(2, 3, 32, 32))
    ac = tiny_pipe.scheduler.alphas_cumprod
    prompt_ids = tokenize(tiny_pipe.tokenizer, template_prompt("a photo of a {}"))
    loss = diffusion_loss(tiny_pipe, combine(mlp(emb), emb, vocab_norm(tiny_pipe)), latents, torch.randn_like(latents),
                          torch.tensor([100, 700]), prompt_ids, "a photo of a {}", "epsilon", ac)
    loss.backward()
    grads = [p.grad for p in mlp.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for p in tiny_pipe.unet.parameters())
    assert all(p.grad is None for p in tiny_pipe.text_encoder.parameters())


def test_one_hot_decomposition_renders_like_the_prompt(tiny_pipe):
    """The key check of the injection: the token 'dog' put in as a pseudo-token == the prompt 'a photo of a dog'."""
    dog = tiny_pipe.tokenizer("dog", add_special_tokens=False).input_ids[0]
    dec = Decomposition(concept="dog", tokens=["dog"], token_ids=[dog], coefficients=[1.0], n_tokens=1, norm=None,
                        settings={"gen_steps": 4, "guidance": 3.0, "gen_scheduler": "dpm"})
    seeds = [11, 12]
    from_pseudo = dec.render(tiny_pipe, seeds, rescale=False)
    from_prompt = generate(tiny_pipe, "a photo of a dog", seeds, steps=4, guidance=3.0, sampler="dpm", verbose=False)
    torch.testing.assert_close(from_pseudo, from_prompt, atol=1e-5, rtol=0)
    # and the check can fail: another token gives another image
    cat = tiny_pipe.tokenizer("cat", add_special_tokens=False).input_ids[0]
    other = Decomposition(concept="cat", tokens=["cat"], token_ids=[cat], coefficients=[1.0], n_tokens=1, norm=None,
                          settings=dec.settings)
    assert (other.render(tiny_pipe, seeds, rescale=False) - from_prompt).abs().max() > 1e-3


def test_pseudo_token_touches_only_the_template_prompt(tiny_pipe):
    te, tok = tiny_pipe.text_encoder, tiny_pipe.tokenizer
    ids = tokenize(tok, ["a photo of a sks", "", "a photo of a dog"])
    before = te(ids)[0]
    with pseudo_token(tiny_pipe, torch.randn(te.config.hidden_size)):
        during = te(ids)[0]
    after = te(ids)[0]
    assert not torch.allclose(during[0], before[0])
    torch.testing.assert_close(during[1:], before[1:])
    torch.testing.assert_close(after, before)
    with pytest.raises(ValueError, match="width"):
        with pseudo_token(tiny_pipe, torch.randn(7)):
            pass


def test_pipeline_unchanged_after_fit(tiny_pipe, tiny_clip, cache):
    before = _fingerprint(tiny_pipe)
    decompose(tiny_pipe, "a cat", clip=tiny_clip, settings=FAST.replace(steps=3), verbose=False)
    assert _fingerprint(tiny_pipe) == before


def test_save_load_roundtrip(tiny_pipe, tiny_clip, cache, tmp_path):
    dec = decompose(tiny_pipe, "a dog", clip=tiny_clip, settings=FAST, verbose=False)
    dec.save(tmp_path / "d")
    back = Decomposition.load(tmp_path / "d")
    assert back == dec
    assert torch.equal(back.vector(tiny_pipe), dec.vector(tiny_pipe))
    meta = json.loads((tmp_path / "d" / "decomposition.json").read_text())
    assert {"tokens", "coefficients", "settings", "history"} <= set(meta)
    with pytest.raises(FileExistsError):
        dec.save(tmp_path / "d")
    assert Decomposition.load(tmp_path / "d") == dec  # nothing was overwritten


def test_concept_images_cache_hit_skips_generation(tiny_pipe, cache, monkeypatch):
    kw = dict(steps=2, guidance=2.0, sampler="dpm", verbose=False)
    first = concept_images(tiny_pipe, "a photo of a dog", 3, 5, **kw)
    import conceptor_nb.method.generate as g

    def boom(*a, **k):
        raise AssertionError("generated again despite the cache")

    monkeypatch.setattr(g, "generate", boom)
    again = concept_images(tiny_pipe, "a photo of a dog", 3, 5, **kw)
    torch.testing.assert_close(again, first)
    with pytest.raises(AssertionError):  # another key misses the cache
        concept_images(tiny_pipe, "a photo of a dog", 3, 6, **kw)


def test_corrupt_cache_is_a_miss_with_a_warning(tiny_pipe, cache):
    kw = dict(steps=2, guidance=2.0, sampler="dpm", verbose=False)
    first = concept_images(tiny_pipe, "a photo of a cat", 2, 0, **kw)
    (file,) = cache.glob("images/*/images.safetensors")
    file.write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="bad image-cache entry"):
        again = concept_images(tiny_pipe, "a photo of a cat", 2, 0, **kw)
    assert torch.equal(again, first)  # regenerated, and the entry repaired
    assert torch.equal(concept_images(tiny_pipe, "a photo of a cat", 2, 0, refresh=True, **kw), first)


def test_empty_concept(tiny_pipe):
    with pytest.raises(ValueError, match="empty"):
        decompose(tiny_pipe, "   ", settings=FAST, verbose=False)


def test_prompt_longer_than_context(tiny_pipe):
    with pytest.raises(ValueError, match="context"):
        decompose(tiny_pipe, "dog " * 100, settings=FAST, verbose=False)


def test_unknown_model_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE"):
        load_pipeline("no-such-org/no-such-model-xyz", device="cpu")
    with pytest.raises(ValueError, match="empty"):
        load_pipeline("", device="cpu")


def test_no_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        load_pipeline("tiny", device="cuda")


@pytest.mark.parametrize("size", [0, 49408, -3])
def test_dictionary_size_out_of_range(tiny_clip, size, cache):
    with pytest.raises(ValueError, match="dictionary size"):
        build_dictionary(tiny_clip, torch.rand(2, 3, 32, 32), "dog", size)


def test_dictionary_excludes_the_concept(tiny_clip, cache):
    d = build_dictionary(tiny_clip, torch.rand(2, 3, 32, 32), "dog", 49405 - 10, exclude_threshold=None, verbose=False)
    assert "dog" in d.excluded and "dog" not in d.tokens and 1929 not in d.token_ids


def test_cache_folder_that_cannot_be_created(tiny_pipe, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(CacheError, match="cannot create"):
        concept_images(tiny_pipe, "a photo of a dog", 1, steps=1, cache_dir=blocker / "sub", verbose=False)


def test_cache_folder_without_write_permission(tiny_pipe, tmp_path):
    import os

    if os.geteuid() == 0:
        pytest.skip("root ignores file permissions")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(CacheError, match="not writable|cannot create"):
            concept_images(tiny_pipe, "a photo of a dog", 1, steps=1, cache_dir=ro, verbose=False)
    finally:
        ro.chmod(0o700)


def test_cli_decompose(tmp_path, cache, capsys):
    from conceptor_nb.cli import main

    out = tmp_path / "run"
    args = ["decompose", "a dog", "--model", "tiny", "--out", str(out), "--quiet", "--n-train", "4", "--n-val", "2",
            "--steps", "4", "--val-every", "2", "--gen-steps", "2", "--val-steps", "2", "--dict-size", "16"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    dec = Decomposition.load(out)
    assert dec.tokens[0] in printed and "ms/step" in printed
    assert (out / "concept.png").exists() and (out / "reconstruction.png").exists()
    stamp = (out / "decomposition.json").read_bytes()
    assert main(args) == 2  # refuses to overwrite
    assert (out / "decomposition.json").read_bytes() == stamp
    assert main(args[:1] + [" "] + args[2:]) == 2  # empty concept: a clear error, not a traceback
