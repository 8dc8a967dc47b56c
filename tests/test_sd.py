"""Stable Diffusion for real: loading SD 1.5, 2.1-base, 2.1 (v-prediction) and SDXL from Hugging Face caches,
and running Conceptor on them, offline, on fake caches (tests/fakehub.py: the repos' real config files with
random weights, shrunk widths and depths). Full shapes: ``-m slow``.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import fakehub  # noqa: E402  (tests/fakehub.py; the hub and offline_home fixtures are in conftest.py)

from conceptor_nb.method import fit as conceptor_mod  # noqa: E402
from conceptor_nb.config import settings  # noqa: E402
from conceptor_nb.errors import ConceptorError, ModelNotFoundError  # noqa: E402
from conceptor_nb.models import default_dtype, load_clip, load_pipeline  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(n_train=2, n_val=1, gen_steps=1, dict_size=12, n_tokens=3, steps=2, batch_size=1, val_every=2,
             val_steps=1, clip_templates=("a photo of a {}",))


# -- the fixtures themselves ----------------------------------------------------------------------
def test_fake_cache_has_the_hub_layout_and_every_real_config_key(offline_home):
    home = offline_home(fakehub.SD21)
    folder = home / "hub" / "models--stabilityai--stable-diffusion-2-1"
    rev = (folder / "refs" / "main").read_text()
    snap = folder / "snapshots" / rev
    for part in ("unet", "vae", "text_encoder"):
        real = json.loads((fakehub.FIXTURES / fakehub.SD21 / part / "config.json").read_text())
        fake = json.loads((snap / part / "config.json").read_text())
        assert set(fake) == set(real)  # every key kept; only widths/depths differ
    sched = json.loads((snap / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction"
    assert (snap / "unet" / "diffusion_pytorch_model.fp16.safetensors").exists()
    assert json.loads((snap / "tokenizer" / "special_tokens_map.json").read_text())["pad_token"] == "!"


# -- loading ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("repo,cls,prediction,size,pad", [
    (fakehub.SD15, "StableDiffusionPipeline", "epsilon", 64, "<|endoftext|>"),
    (fakehub.SD21_BASE, "StableDiffusionPipeline", "epsilon", 64, "!"),
    (fakehub.SD21, "StableDiffusionPipeline", "v_prediction", 96, "!"),
    (fakehub.SDXL, "StableDiffusionXLPipeline", "epsilon", 128, "<|endoftext|>"),
])
def test_each_repo_loads_offline_as_its_own_pipeline(offline_home, repo, cls, prediction, size, pad):
    offline_home(repo)
    pipe = load_pipeline(repo, device="cpu")
    assert type(pipe).__name__ == cls
    assert pipe.scheduler.config.prediction_type == prediction
    assert pipe.unet.config.sample_size == size and pipe.unet.dtype == torch.float32
    assert pipe.tokenizer.pad_token == pad
    if repo == fakehub.SDXL:  # the second text encoder is there, projected, with pad "!"
        assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
        assert pipe.tokenizer_2.pad_token == "!"
        assert pipe.unet.config.addition_embed_type == "text_time"
    assert not any(p.requires_grad for p in pipe.unet.parameters())


def test_a_cache_with_only_the_fp16_variant_loads(tmp_path, monkeypatch):
    home = fakehub.build(tmp_path, fakehub.SD21_BASE, variants=("fp16",))
    monkeypatch.setenv("HF_HOME", str(home))
    snap = fakehub.snapshot(home, fakehub.SD21_BASE)
    assert not (snap / "unet" / "diffusion_pytorch_model.safetensors").exists()
    pipe = load_pipeline(fakehub.SD21_BASE, device="cpu")
    assert pipe.unet.dtype == torch.float32  # fp16 files, cast to the CPU's float32
    from safetensors.torch import load_file

    stored = load_file(snap / "unet" / "diffusion_pytorch_model.fp16.safetensors")["conv_in.weight"]
    assert torch.equal(pipe.unet.conv_in.weight, stored.float())


def test_default_dtype_is_bf16_on_cuda_and_float32_elsewhere():
    assert default_dtype(torch.device("cpu")) == torch.float32
    assert default_dtype(torch.device("cuda"), bf16_supported=True) == torch.bfloat16
    assert default_dtype(torch.device("cuda"), bf16_supported=False) == torch.float32
    # with bf16 weights the fit's "auto" autocast has nothing to do, and says so in its history
    assert conceptor_mod.autocast_dtype("cpu", "auto", torch.bfloat16) is None


def test_loading_prints_nothing(hub):
    """No torchvision notice, no torch_dtype deprecation, no 'could not reach the hub' on a plain load."""
    home = hub.get(fakehub.SD15, fakehub.CLIP_B32)
    env = dict(os.environ, HF_HOME=str(home), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), PYTHONWARNINGS="default")
    code = ("from conceptor_nb import load_pipeline, load_clip; "
            f"load_pipeline({fakehub.SD15!r}, device='cpu'); load_clip({fakehub.CLIP_B32!r}, device='cpu')")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == "" and out.stdout.strip() == ""


def test_a_folder_missing_a_part_says_which_part_in_which_folder(offline_home, tmp_path):
    home = offline_home(fakehub.SD21_BASE)
    folder = tmp_path / "sd21"
    shutil.copytree(fakehub.snapshot(home, fakehub.SD21_BASE), folder)
    for f in (folder / "unet").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelNotFoundError, match=r"unet has no weights: expected diffusion_pytorch_model\.safetensors"):
        load_pipeline(str(folder), device="cpu")
    shutil.rmtree(folder / "unet")
    with pytest.raises(ModelNotFoundError, match=r"has no unet/") as err:
        load_pipeline(str(folder), device="cpu")
    assert str(folder) in str(err.value) and "stacktrace" not in str(err.value)
    (folder / "model_index.json").unlink()
    with pytest.raises(ModelNotFoundError, match="no model_index.json"):
        load_pipeline(str(folder), device="cpu")


def test_an_uncached_hub_id_names_the_cache(offline_home):
    home = offline_home(fakehub.CLIP_B32)
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache") as err:
        load_pipeline("someone/not-cached", device="cpu")
    assert str(home / "hub") in str(err.value)


def test_online_failures_name_the_root_cause_not_a_stacktrace(tmp_path, monkeypatch):
    import diffusers

    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def download(*a, **k):
        try:
            raise ConnectionError("Name or service not known: huggingface.co")
        except ConnectionError as e:
            raise EnvironmentError("Cannot load model x: the model is not fully cached locally. Please check out "
                                   "the root cause in the stacktrace above.") from e

    monkeypatch.setattr(diffusers.DiffusionPipeline, "download", classmethod(download))
    with pytest.raises(ModelNotFoundError) as err:
        load_pipeline("someone/not-cached", device="cpu")
    assert "ConnectionError: Name or service not known" in str(err.value) and "stacktrace" not in str(err.value)


def test_a_cached_repo_missing_weights_names_the_part(hub, tmp_path, monkeypatch):
    home = tmp_path / "hf"
    shutil.copytree(hub.get(fakehub.SD21_BASE) / "hub" / "models--stabilityai--stable-diffusion-2-1-base",
                    home / "hub" / "models--stabilityai--stable-diffusion-2-1-base")
    for f in (fakehub.snapshot(home, fakehub.SD21_BASE) / "text_encoder").glob("*.safetensors"):
        f.unlink()
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match=r"text_encoder has no weights: expected model\.safetensors"):
        load_pipeline(fakehub.SD21_BASE, device="cpu")


def test_a_pickle_checkpoint_that_does_not_unpickle_safely_is_refused_clearly(tmp_path):
    import datetime

    file = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "when": datetime.date(2024, 1, 1)}, file)
    with pytest.raises(ModelNotFoundError, match=r"weights_only=True.*safetensors"):
        load_pipeline(str(file), device="cpu")


def test_a_single_file_without_its_configs_says_what_to_put_where(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    file = tmp_path / "model.safetensors"  # enough of an SD 1.x checkpoint for diffusers to tell its type
    save_file({"model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 768)}, file)
    with pytest.raises(ModelNotFoundError) as err:
        load_pipeline(str(file), device="cpu")
    msg = str(err.value)
    assert "stable-diffusion-v1-5" in msg and str(tmp_path / "empty_home" / "hub") in msg and "config=" in msg
    with pytest.raises(ModelNotFoundError, match="neither a pipeline folder"):
        load_pipeline(str(file), device="cpu", config=str(tmp_path / "nowhere"))
    assert issubclass(ModelNotFoundError, ConceptorError)


@pytest.mark.parametrize("key,width,repo,cls", [
    ("model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight", 768, fakehub.SD15,
     "StableDiffusionPipeline"),
    ("model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight", 1024, fakehub.SD21,
     "StableDiffusionPipeline"),
    ("conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias", None, fakehub.SDXL,
     "StableDiffusionXLPipeline"),
])
def test_a_single_file_gets_the_configs_of_its_kind_from_the_local_cache(offline_home, tmp_path, monkeypatch,
                                                                         key, width, repo, cls):
    """diffusers' from_single_file is called offline with the cached snapshot of the checkpoint's repo as
    config (SD 1.x: diffusers names stable-diffusion-v1-5/..., the cache holds runwayml/...)."""
    import diffusers
    from safetensors.torch import save_file

    home = offline_home(repo)
    tensors = {"model.diffusion_model.out.2.bias": torch.zeros(4)}
    tensors[key] = torch.zeros(320, width) if width else torch.zeros(4)
    file = tmp_path / "model.safetensors"
    save_file(tensors, file)
    calls = []

    def fake_from_single_file(klass, path, **kw):
        calls.append((klass.__name__, path, kw))
        return klass.from_pretrained(kw["config"], dtype=kw["dtype"], **({} if "XL" in klass.__name__ else
                                     {"safety_checker": None, "requires_safety_checker": False}))

    for name in ("StableDiffusionPipeline", "StableDiffusionXLPipeline"):
        monkeypatch.setattr(getattr(diffusers, name), "from_single_file", classmethod(fake_from_single_file))
    pipe = load_pipeline(str(file), device="cpu")
    (name, path, kw), = calls
    assert name == cls and path == str(file)
    assert Path(kw["config"]) == fakehub.snapshot(home, repo) and kw["local_files_only"] is True
    assert pipe.conceptor_model == str(file)


@pytest.mark.parametrize("key,width,config", [
    ("model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight", 768, fakehub.SDXL),
    ("conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias", None, fakehub.SD15),
])
def test_a_single_file_with_configs_of_another_kind_is_refused_clearly(offline_home, tmp_path, key, width, config):
    """An SD 1.x file with SDXL configs (or the reverse) is named as such before diffusers fails inside."""
    from safetensors.torch import save_file

    offline_home(config)
    tensors = {"model.diffusion_model.out.2.bias": torch.zeros(4),
               key: torch.zeros(320, width) if width else torch.zeros(4)}
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ModelNotFoundError, match="configs in .* are for a StableDiffusion") as err:
        load_pipeline(str(tmp_path / "model.safetensors"), device="cpu", config=config)
    assert ("an SDXL model" in str(err.value)) == (config == fakehub.SD15)


@pytest.mark.parametrize("repo,config", [(fakehub.SD15, None), (fakehub.SD21_BASE, fakehub.SD21_BASE),
                                         (fakehub.SDXL, None)])
def test_a_real_single_file_loads_every_weight_and_generates_as_its_pipeline(offline_home, tmp_path, repo, config):
    """No stub: a (shrunk) pipeline written as one original-layout checkpoint (tests/ldm_checkpoint.py:
    model.diffusion_model / first_stage_model / cond_stage_model.transformer, or .model for 2.x's OpenCLIP;
    SDXL: conditioner.embedders.0.transformer (CLIP-L) and .1.model (OpenCLIP bigG, projected)) comes back
    through diffusers' from_single_file with every UNet, VAE and text-encoder weight equal, and generates
    the same image. SD 1.x and SDXL find their configs themselves; 2.x base is given them: the weights
    cannot tell 2.1-base (epsilon, 512 px) from 2.1 (v-prediction, 768 px). The shrunk SDXL's second text
    encoder has 2 layers, so diffusers' own test (a 10th one) calls it SD 1.x: load_single_file must not."""
    import ldm_checkpoint

    offline_home(repo)
    src = load_pipeline(repo, device="cpu", dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    parts = ("unet", "vae", "text_encoder") + (("text_encoder_2",) if repo == fakehub.SDXL else ())
    with torch.no_grad():  # every element distinct from its init: a weight left unloaded or misplaced shows
        for module in (getattr(src, part) for part in parts):
            for p in module.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
    file = tmp_path / "model.safetensors"
    ldm_checkpoint.save_ldm_checkpoint(src, file)

    pipe = load_pipeline(str(file), device="cpu", dtype=torch.float32, config=config)
    assert type(pipe) is type(src) and pipe.conceptor_model == str(file)
    for part in parts:
        want, got = getattr(src, part).state_dict(), getattr(pipe, part).state_dict()
        assert got.keys() == want.keys(), part
        unequal = [k for k in want if not torch.equal(want[k], got[k])]
        assert not unequal, f"{part}: {len(unequal)} weights differ, e.g. {unequal[:3]}"
    assert pipe.scheduler.config == src.scheduler.config
    assert pipe.tokenizer("a cat").input_ids == src.tokenizer("a cat").input_ids
    if repo == fakehub.SDXL:
        assert pipe.tokenizer_2("a cat").input_ids == src.tokenizer_2("a cat").input_ids

    def image(p):
        return p("a photo of a cat", height=64, width=64, num_inference_steps=2, guidance_scale=7.5,
                 generator=torch.Generator().manual_seed(0), output_type="pt").images

    # equal bits at 2 threads; at 1 thread (pytest -n 2) the file's pipeline rounds differently (up to 1.5e-6
    # seen), while a misplaced weight moves pixels by orders of magnitude more (the weights are equal, above)
    torch.testing.assert_close(image(pipe), image(src), rtol=0, atol=1e-5)
    if config is not None:  # without config= a 2.x file still gets 2.x configs (OpenCLIP keys), not SD 1.x's
        default = load_pipeline(str(file), device="cpu", dtype=torch.float32)
        assert default.unet.config.use_linear_projection
        got = default.text_encoder.state_dict()
        assert all(torch.equal(v, got[k]) for k, v in src.text_encoder.state_dict().items())
    else:  # a weight missing from the file is an error that says so, never a random weight
        from safetensors.torch import load_file, save_file

        state = load_file(str(file))
        # SDXL's first down block has no attention: the first input block that has one
        del state[next(k for k in state if k.startswith("model.diffusion_model.input_blocks.")
                       and k.endswith(".1.proj_in.weight"))]
        save_file(state, tmp_path / "incomplete.safetensors")
        with pytest.raises(ModelNotFoundError, match="lacks weights"):
            load_pipeline(str(tmp_path / "incomplete.safetensors"), device="cpu", dtype=torch.float32)


# -- the fit on each kind of model ------------------------------------------------------------------------
class TargetUNet(torch.nn.Module):
    """Returns the training target of the batch the fit drew (recorded by a wrapped sample_batch)."""

    def __init__(self, unet, scheduler, kind: str, record: dict):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.config, self.kind, self.record, self.sched, self.calls = unet.config, kind, record, scheduler, []

    @property
    def device(self):
        return self.dummy.device

    @property
    def dtype(self):
        return self.dummy.dtype

    def forward(self, noisy, t, encoder_hidden_states, added_cond_kwargs=None):
        self.calls.append((encoder_hidden_states, added_cond_kwargs))
        x0, noise, _ = self.record["batch"]
        target = noise if self.kind == "epsilon" else self.sched.get_velocity(x0, noise, t)
        # keep the graph connected to the pseudo-token, with a zero contribution
        return SimpleNamespace(sample=target + 0 * encoder_hidden_states.mean())


def _fit_with_target(pipe, kind, monkeypatch, s):
    from diffusers import DDPMScheduler

    record = {}
    real = conceptor_mod.sample_batch

    def recording(*a, **k):
        record["batch"] = real(*a, **k)
        return record["batch"]

    monkeypatch.setattr(conceptor_mod, "sample_batch", recording)
    stub = TargetUNet(pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config), kind, record)
    monkeypatch.setattr(pipe, "unet", stub)
    images = torch.rand(2, 3, 8 * pipe.unet.config.sample_size, 8 * pipe.unet.config.sample_size)
    _, history = conceptor_mod.fit(pipe, images, list(range(1000, 1012)), s, verbose=False)
    return history, stub


@pytest.mark.parametrize("repo,right,wrong", [(fakehub.SD21, "v_prediction", "epsilon"),
                                               (fakehub.SD21_BASE, "epsilon", "v_prediction")])
def test_the_fit_trains_against_the_models_own_target(offline_home, monkeypatch, repo, right, wrong):
    """A UNet that returns the scheduler's v (get_velocity) has loss 0 on the v-prediction model, and one
    returning the noise has loss 0 on the epsilon model: the target is the model's, not a fixed one."""
    offline_home(repo)
    s = settings("sd").replace(steps=2, batch_size=2, val_every=0, n_tokens=3)
    pipe = load_pipeline(repo, device="cpu")
    hist, _ = _fit_with_target(pipe, right, monkeypatch, s)
    assert max(hist["reconstruction"]) < 1e-10
    monkeypatch.undo()
    offline_home(repo)
    pipe = load_pipeline(repo, device="cpu")
    hist, _ = _fit_with_target(pipe, wrong, monkeypatch, s)
    assert min(hist["reconstruction"]) > 1e-3


def test_sdxl_fit_conditions_like_the_pipeline(offline_home, monkeypatch):
    """SDXL: one coefficient per token over both tables; the UNet gets both encoders' penultimate states
    (32 + 64 wide in the fixture), the pooled projection (64) and size/crop ids for 1024 px."""
    offline_home(fakehub.SDXL)
    pipe = load_pipeline(fakehub.SDXL, device="cpu")
    s = settings("sd").replace(steps=1, batch_size=2, val_every=0, n_tokens=3)
    hist, stub = _fit_with_target(pipe, "epsilon", monkeypatch, s)
    cond, added = stub.calls[0]
    assert cond.shape == (2, 77, 32 + 64)
    assert added["text_embeds"].shape == (2, 64)
    assert added["time_ids"].tolist() == [[1024, 1024, 0, 0, 1024, 1024]] * 2
    assert max(hist["reconstruction"]) < 1e-10
    # the pseudo-token reaches both encoders: changing only the second table's half changes the pooled output
    from conceptor_nb.method.inject import encode_template, tokenize, token_embeddings

    e = token_embeddings(pipe, [1000])[0]
    assert e.shape == (96,)
    ids = tokenize(pipe.tokenizer, "a photo of a sks")
    c1, a1 = encode_template(pipe, e, "a photo of a {}", ids)
    e2 = e.clone()
    e2[32:] += 1
    c2, a2 = encode_template(pipe, e2, "a photo of a {}", ids)
    assert torch.allclose(c1[..., :32], c2[..., :32]) and not torch.allclose(c1[..., 32:], c2[..., 32:])
    assert not torch.allclose(a1["text_embeds"], a2["text_embeds"])


def test_an_sdxl_decomposition_with_per_table_norms_saves_and_loads(tmp_path):
    from conceptor_nb import Decomposition
    from conceptor_nb.errors import ConceptorError

    dec = Decomposition(concept="a dog", tokens=["pet", "golden"], token_ids=[1000, 1001], coefficients=[0.5, 0.2],
                        n_tokens=2, norm=[[768, 0.4], [1280, 0.6]])
    dec.save(tmp_path)
    assert Decomposition.load(tmp_path).norm == [[768, 0.4], [1280, 0.6]]
    with pytest.raises((ConceptorError, ValueError), match="norm"):
        Decomposition(concept="a dog", tokens=["pet"], token_ids=[1000], coefficients=[0.5], n_tokens=1,
                      norm=[[768, -1.0]]).save(tmp_path / "bad")


def test_sdxl_rescales_each_table_to_its_own_norm():
    from conceptor_nb.method.fit import combine

    emb = torch.randn(5, 6)
    w = combine(torch.rand(5), emb, [[2, 3.0], [4, 0.5]])
    assert w[:2].norm() == pytest.approx(3.0) and w[2:].norm() == pytest.approx(0.5)


# -- end to end --------------------------------------------------------------------------------------------
def _cli(home, repo, out, cache):
    env = dict(os.environ, HF_HOME=str(home), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), CONCEPTOR_PROFILE="sd",
               CONCEPTOR_CACHE=str(cache), OMP_NUM_THREADS="1")
    args = ["--n-train", "2", "--n-val", "1", "--gen-steps", "1", "--dict-size", "12", "--n-tokens", "3",
            "--steps", "2", "--batch-size", "1", "--val-every", "2", "--val-steps", "1"]
    return subprocess.run([sys.executable, "-m", "conceptor_nb", "decompose", "a president", "--model", repo,
                           "--out", str(out), "--quiet", *args], env=env, capture_output=True, text=True, timeout=1800)


@pytest.mark.parametrize("repo", [
    fakehub.SD21_BASE,
    pytest.param(fakehub.SD15, marks=pytest.mark.slow),
    pytest.param(fakehub.SD21, marks=pytest.mark.slow),
    pytest.param(fakehub.SDXL, marks=pytest.mark.slow),
])
def test_cli_decompose_runs_offline_on_the_fake_cache(small_hub, tmp_path, repo):
    home = small_hub.get(repo, fakehub.CLIP_B32)  # 128 px images: the command line is tested here, not the shapes
    cache = tmp_path / "cache"
    # the vocabulary embedding of 27 templates is what takes time on a CPU: seed its cache with one template's
    _seed_vocab_cache(home, cache)
    out = _cli(home, repo, tmp_path / "run", cache)
    assert out.returncode == 0, out.stderr[-3000:]
    from conceptor_nb import Decomposition

    dec = Decomposition.load(tmp_path / "run")
    assert dec.model == repo and len(dec.tokens) == 12 and dec.clip == fakehub.CLIP_B32
    assert (tmp_path / "run" / "reconstruction.png").exists()


def _seed_vocab_cache(home, cache):
    """Write the cache entry for the sd profile's 27 templates from a one-template computation (the
    test checks the pipeline, not CLIP; the entry's key is what vocab_text_features computes)."""
    from conceptor_nb.method.vocab import vocab_cache_entry, vocab_text_features
    from conceptor_nb.io import save_verified

    env = {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        clip = load_clip(fakehub.CLIP_B32, device="cpu")
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    feats = vocab_text_features(clip, ("a photo of a {}",), cache_dir=cache, verbose=False)
    file, key = vocab_cache_entry(clip, settings("sd").clip_templates, cache, precision=settings("sd").vocab_precision)
    save_verified(file, {"features": feats}, key)


@pytest.mark.parametrize("repo", [
    fakehub.SD15,
    pytest.param(fakehub.SD21_BASE, marks=pytest.mark.slow),
    pytest.param(fakehub.SD21, marks=pytest.mark.slow),
    pytest.param(fakehub.SDXL, marks=pytest.mark.slow),
])
def test_every_application_runs_on_a_stable_diffusion_cache(small_offline_home, tmp_path, repo):
    from conceptor_nb import decompose, detect_bias, explain_image, mitigate_bias, panel, sweep

    small_offline_home(repo, fakehub.CLIP_B32)  # 128 px images (test_full_shape_* check the real shapes)
    pipe = load_pipeline(repo, device="cpu")
    clip = load_clip(fakehub.CLIP_B32, device="cpu")
    s = settings("sd").replace(**SMALL)
    dec = decompose(pipe, "a president", clip=clip, settings=s, cache_dir=tmp_path, verbose=False)
    assert len(dec.tokens) == 12
    ex = explain_image(pipe, dec, seed=0, clip=clip, n_tokens=2, steps=1, threshold=1.01)  # nothing drops
    ex.save(tmp_path / "ex")  # (failed on CPU: image and kept_image were one tensor)
    attr = {"man": ["man"], "woman": ["woman"]}
    rep = detect_bias(pipe, dec, attr, clip=clip, n=2, cache_dir=tmp_path)
    assert rep.n_images == 2
    mit = mitigate_bias(pipe, dec, attr, clip=clip, seeds=[0], steps=1, max_rounds=1)
    assert mit.mitigated.tokens
    sw = sweep(pipe, dec, dec.tokens[0], [0.0, 1.0], seeds=[0], steps=1)
    assert sw.images.shape[0] == 2
    pytest.importorskip("ipywidgets")
    panel(pipe, dec, k=2, seeds=(0,), steps=1)


def test_image_explanation_saves_when_no_token_was_dropped(tiny_pipe, tiny_clip, tmp_path):
    """On CPU, image and kept_image were one tensor when nothing dropped: safetensors refused to save."""
    from conceptor_nb import Decomposition, ImageExplanation, explain_image

    ids = [tiny_pipe.tokenizer(w, add_special_tokens=False).input_ids[0] for w in ("red", "circle")]
    dec = Decomposition(concept="thing", tokens=["red", "circle"], token_ids=ids, coefficients=[1.0, 0.5], n_tokens=2,
                        norm=None, settings={"gen_steps": 2, "guidance": 2.0, "gen_scheduler": "dpm"})
    ex = explain_image(tiny_pipe, dec, seed=0, clip=tiny_clip, threshold=1.01)
    assert ex.kept == ["red", "circle"]
    ex.save(tmp_path)
    back = ImageExplanation.load(tmp_path)
    assert torch.equal(back.image, ex.image) and torch.equal(back.kept_image, ex.image)


# -- the vocabulary embedding -----------------------------------------------------------------------------
def test_prefix_cached_vocabulary_embedding_equals_the_full_forward(offline_home):
    from conceptor_nb.method.vocab import _template_ids, template_features, word_token_ids

    offline_home(fakehub.CLIP_B32)
    clip = load_clip(fakehub.CLIP_B32, device="cpu")
    ids = word_token_ids(clip.tokenizer)[::499]
    for template in ("a photo of a {}", "a cropped photo of the {}", "{} on a table"):
        fast = template_features(clip, template, ids)
        full = clip.text_features_ids(_template_ids(clip.tokenizer, template, ids))
        assert torch.allclose(fast, full, atol=1e-5)
    # and the same as CLIP's own encoding of the text, for whole-word tokens
    words = ["dog", "table"]
    ids = torch.tensor([clip.tokenizer.convert_tokens_to_ids(w + "</w>") for w in words])
    ref = clip.text_features([f"a photo of a {w}" for w in words])
    assert torch.allclose(template_features(clip, "a photo of a {}", ids), ref, atol=1e-5)


def test_vocabulary_embedding_is_computed_once_per_clip(offline_home, tmp_path, monkeypatch):
    from conceptor_nb.method import vocab as dictionary

    offline_home(fakehub.CLIP_B32)
    clip = load_clip(fakehub.CLIP_B32, device="cpu")
    calls = []
    real = dictionary.template_features
    monkeypatch.setattr(dictionary, "template_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    a = dictionary.vocab_text_features(clip, ("a photo of a {}", "a rendering of a {}"), cache_dir=tmp_path, verbose=False)
    b = dictionary.vocab_text_features(clip, ("a photo of a {}", "a rendering of a {}"), cache_dir=tmp_path, verbose=False)
    assert len(calls) == 2 and torch.equal(a, b)


# -- full shapes ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_full_shape_sd21_base_fit_step(tmp_path, monkeypatch):
    """The real SD 2.1-base shapes (865M UNet, 1024-wide OpenCLIP text encoder): load and two fit steps."""
    home = fakehub.build(tmp_path, [fakehub.SD21_BASE], shrink=False, variants=("fp16",))
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = load_pipeline(fakehub.SD21_BASE, device="cpu")
    assert pipe.text_encoder.get_input_embeddings().weight.shape == (49408, 1024)
    s = settings("sd").replace(steps=2, batch_size=1, val_every=0)
    coef, hist = conceptor_mod.fit(pipe, torch.rand(1, 3, 512, 512), list(range(1000, 1100)), s, verbose=False)
    assert coef.shape == (100,) and all(torch.isfinite(torch.tensor(hist["loss"])))


@pytest.mark.slow
def test_the_gpu_check_script_runs_on_the_cpu_at_smoke_sizes(tmp_path):
    """scripts/sd_gpu_check.py (the first thing a lent GPU runs) makes every call it makes there, on shrunk weights:
    a broken import or signature shows here, not in device time. Its bench.json has every number, all finite."""
    env = dict(os.environ, SMOKE="1", OUT=str(tmp_path), FAKE_HF_HOME=str(tmp_path / "hf"),
               CONCEPTOR_CACHE=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "sd_gpu_check.py")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads((tmp_path / "bench.json").read_text())
    keys = ("gen_lms50_s_per_image", "fit_step_ms_mean12", "validation_20img_dpm50_s", "vocab_one_template_s", "total_s")
    assert res["loss_finite"] is True and all(res[k] > 0 and res[k] < float("inf") for k in keys), res
