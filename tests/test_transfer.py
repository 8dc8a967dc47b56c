"""Issue 24: the pseudo-token as a textual-inversion file (diffusers loads it and draws exactly the
decomposition's renders), LoRAs and fine-tunes as the explained model (their identity keys the caches), and
the comparison of two decompositions; bad inputs refused before any work."""
import copy
import math

import matplotlib
import pandas as pd
import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import conceptor_nb as cn
from conceptor_nb.cli import main
from conceptor_nb.method.dictionary import token_text
from conceptor_nb.method.fit import vocab_norm
from conceptor_nb.method.generate import SCHEDULERS, weights_fingerprint

WORDS = ["red", "blue", "person", "apple", "square", "circle"]
COEFS = [0.5, 0.3, 0.2, 0.1, 0.05, 0.01]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy_pipe():
    return cn.load_pipeline("toy", device="cpu")


def make_dec(pipe, settings=None, concept="a doctor", coefs=COEFS, words=WORDS, **kw):
    """A decomposition of ``words`` on ``pipe`` (no fit needed: export and compare read only its fields)."""
    ids = [pipe.tokenizer(w, add_special_tokens=False).input_ids[0] for w in words]
    settings = settings or cn.settings("tiny")
    kw = {"model": cn.models.model_name(pipe), **kw}
    return cn.Decomposition(concept, [token_text(pipe.tokenizer, i) for i in ids], ids, list(coefs), 3,
                            vocab_norm(pipe), template=settings.template, settings=settings, **kw)


def plain_diffusers(pipe, prompt, seeds, s):
    """What a diffusers user runs: the prompt, one generator per seed, the fit's steps, guidance and sampler."""
    if s.sampler:
        pipe.scheduler = SCHEDULERS[s.sampler].from_config(pipe.scheduler.config)
    gens = [torch.Generator("cpu").manual_seed(x) for x in seeds]
    return pipe([prompt] * len(seeds), num_inference_steps=s.gen_steps, guidance_scale=s.guidance, generator=gens,
                output_type="pt").images.float().clamp(0, 1)


# -- 1. the textual-inversion file: diffusers draws exactly the renders ----------------------------------------

@pytest.mark.parametrize("backend", ["tiny", "toy", pytest.param("sd21v", marks=pytest.mark.slow),
                                     pytest.param("sdxl", marks=pytest.mark.slow)], indirect=True)
def test_diffusers_load_textual_inversion_draws_exactly_the_renders(backend, tmp_path):
    s = backend.settings.replace(gen_steps=3)
    dec = make_dec(backend.pipe, s)
    seeds = dec.seeds(2)
    path = dec.save_embedding(tmp_path / "doctor.safetensors", backend.pipe)
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    vec, xl = dec.vector(backend.pipe), backend.name == "sdxl"
    widths = [e.get_input_embeddings().weight.shape[1] for e in (backend.pipe.text_encoder,
                                                                  getattr(backend.pipe, "text_encoder_2", None)) if e]
    keys = ["clip_l", "clip_g"] if xl else ["<doctor>"]
    assert sorted(tensors) == sorted(keys) and [tensors[k].shape for k in keys] == [(1, w) for w in widths]
    assert torch.equal(torch.cat([tensors[k][0] for k in keys]), vec)  # the rescaled pseudo-token, float32
    assert meta["token"] == "<doctor>" and meta["prompt"] == "a photo of a <doctor>" and meta["concept"] == "a doctor"

    ref = dec.render(backend.pipe, seeds)
    plain = copy.deepcopy(backend.pipe)  # the session's pipeline stays as it is
    if xl:  # the README's two-encoder form
        sd = load_file(path)
        plain.load_textual_inversion(sd["clip_l"], token="<doctor>", text_encoder=plain.text_encoder,
                                     tokenizer=plain.tokenizer)
        plain.load_textual_inversion(sd["clip_g"], token="<doctor>", text_encoder=plain.text_encoder_2,
                                     tokenizer=plain.tokenizer_2)
        # SDXL's second encoder has the legacy eos_token_id=2: it pools at the highest id, the added token ...
        assert not torch.equal(plain_diffusers(plain, "a photo of a <doctor>", seeds, s), ref)
        plain.text_encoder_2.text_model.eos_token_id = plain.tokenizer_2.eos_token_id  # ... until told the EOS id
    else:
        plain.load_textual_inversion(str(path))  # the token is the file's key
    assert torch.equal(plain_diffusers(plain, "a photo of a <doctor>", seeds, s), ref)
    mine = copy.deepcopy(backend.pipe)  # cn.load_embedding does both encoders and the EOS id
    assert torch.equal(plain_diffusers(mine, cn.load_embedding(mine, path, token="<doc>"), seeds, s), ref)


def test_export_refuses_another_models_vocabulary_and_bad_tokens(tiny_pipe, toy_pipe, tmp_path):
    dec = make_dec(tiny_pipe)
    with pytest.raises(cn.InvalidInputError, match="not this model's"):  # same tokenizer, other embeddings
        dec.save_embedding(tmp_path / "a.safetensors", toy_pipe)
    other = copy.deepcopy(dec)
    other.tokens[1] = "green"  # token ids that read as other words: another tokenizer
    with pytest.raises(cn.InvalidInputError, match="another tokenizer"):
        other.save_embedding(tmp_path / "a.safetensors", tiny_pipe)
    other.token_ids[0] = 10 ** 6
    with pytest.raises(cn.InvalidInputError, match="vocabulary has"):
        other.save_embedding(tmp_path / "a.safetensors", tiny_pipe)
    for token in ("doctor", "two words", ""):
        with pytest.raises(cn.InvalidInputError, match="token"):
            dec.save_embedding(tmp_path / "a.safetensors", tiny_pipe, token=token)
    with pytest.raises(cn.InvalidInputError, match=r"\.safetensors"):
        dec.save_embedding(tmp_path / "a.pt", tiny_pipe)
    assert not list(tmp_path.iterdir())
    dec.save_embedding(tmp_path / "a.safetensors", tiny_pipe)
    with pytest.raises(FileExistsError):
        dec.save_embedding(tmp_path / "a.safetensors", tiny_pipe)


def test_load_embedding_refuses_another_models_file_before_changing_the_pipeline(tiny_pipe, toy_pipe, tmp_path):
    path = make_dec(tiny_pipe).save_embedding(tmp_path / "e.safetensors", tiny_pipe)
    toy = copy.deepcopy(toy_pipe)
    n = len(toy.tokenizer)
    with pytest.raises(cn.InvalidInputError, match="width 32.*take 64"):
        cn.load_embedding(toy, path)
    with pytest.raises(cn.InvalidInputError, match="does not exist"):
        cn.load_embedding(toy, tmp_path / "missing.safetensors")
    with safe_open(str(path), "pt") as f:  # the same width from a model with another vocabulary (e.g. 32,000 words)
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, tmp_path / "v.safetensors", metadata={**meta, "vocab_size": "32000"})
    tiny = copy.deepcopy(tiny_pipe)
    with pytest.raises(cn.InvalidInputError, match="vocabulary has 32000 tokens"):
        cn.load_embedding(tiny, tmp_path / "v.safetensors")
    assert len(toy.tokenizer) == n and len(tiny.tokenizer) == n  # nothing was added


def test_export_command(tiny_pipe, tmp_path, capsys):
    run = tmp_path / "run"
    make_dec(tiny_pipe).save(run)
    out = tmp_path / "e.safetensors"
    assert main(["export", str(run), "--embedding", str(out), "--token", "<doc>"]) == 0
    assert "a photo of a <doc>" in capsys.readouterr().out
    assert list(load_file(out)) == ["<doc>"]
    assert main(["export", str(run), "--embedding", str(out)]) == 2  # exists: refused before loading a model
    assert "exists" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nothing"), "--embedding", str(tmp_path / "x.safetensors")]) == 2
    assert main(["export", str(run), "--embedding", str(tmp_path / "x.bin")]) == 2


# -- 2. LoRAs and fine-tunes: the explained model's identity --------------------------------------------------

@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """Two random LoRAs (rank 2 on the attention projections) for the tiny model, one for a wider model."""
    root = tmp_path_factory.mktemp("loras")

    def write(name, seed, pipe):
        unet = copy.deepcopy(pipe.unet)
        unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        gen = torch.Generator().manual_seed(seed)
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.data = torch.randn(p.shape, generator=gen) * 0.2
        cn.models.StableDiffusionPipeline.save_lora_weights(root / name, unet_lora_layers=get_peft_model_state_dict(unet))
        return root / name / "pytorch_lora_weights.safetensors"

    tiny = cn.load_pipeline("tiny", device="cpu")
    wide = cn.models.tiny_pipeline()
    wide.unet = cn.models.UNet2DConditionModel(**{**tiny.unet.config, "cross_attention_dim": 48})
    return {"a": write("a", 1, tiny), "b": write("b", 2, tiny), "wide": write("wide", 3, wide)}


def test_lora_is_fused_and_its_file_and_scale_are_the_models_identity(tiny_pipe, loras, tmp_path):
    base = weights_fingerprint(tiny_pipe)
    a = cn.load_pipeline("tiny", device="cpu", lora=loras["a"])
    assert a.conceptor_lora["lora"] == str(loras["a"]) and a.conceptor_lora["scale"] == 1.0
    assert len(a.conceptor_lora["sha256"]) == 64
    assert list(a.unet.state_dict()) == list(tiny_pipe.unet.state_dict())  # fused: no adapter layers left
    assert not torch.equal(a.unet.state_dict()["mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight"],
                           tiny_pipe.unet.state_dict()["mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight"])
    prints = {name: weights_fingerprint(cn.load_pipeline("tiny", device="cpu", lora=lora, lora_scale=scale))
              for name, lora, scale in (("a again", loras["a"].parent, 1.0), ("a x0.5", loras["a"], 0.5),
                                        ("a x0", loras["a"], 0.0), ("b", loras["b"], 1.0))}
    assert prints["a again"] == weights_fingerprint(a)  # the same adapter (given as its folder) reuses the cache
    assert len({base, *prints.values()}) == 5  # scale 0 draws as the base model but is recorded apart
    # the image cache: a LoRA never reads the base model's images
    kw = dict(steps=1, cache_dir=tmp_path, verbose=False)
    x0, x1 = cn.concept_images(tiny_pipe, "a photo of a dog", 1, **kw), cn.concept_images(a, "a photo of a dog", 1, **kw)
    assert not torch.equal(x0, x1) and len(list((tmp_path / "images").iterdir())) == 2


def test_a_text_encoder_lora_of_mlp_layers_only_loads(tiny_pipe, tmp_path):
    """diffusers reads a text encoder LoRA's format from its attention keys, so one of MLP layers only, in peft's names
    (what peft's get_peft_model_state_dict writes), failed with "made for another base model?": it loads now."""
    name = next(n for n, _ in tiny_pipe.text_encoder.named_modules() if n.endswith("layers.0.mlp.fc1"))
    fc1 = dict(tiny_pipe.text_encoder.named_modules())[name]
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, fc1.in_features, generator=gen), torch.randn(fc1.out_features, 2, generator=gen)
    save_file({f"text_encoder.{name}.lora_A.weight": a, f"text_encoder.{name}.lora_B.weight": b}, tmp_path / "mlp.safetensors")
    tuned = cn.load_pipeline("tiny", device="cpu", lora=tmp_path / "mlp.safetensors", lora_scale=0.5)
    after = dict(tuned.text_encoder.named_parameters())
    torch.testing.assert_close(after[f"{name}.weight"] - fc1.weight, 0.5 * b @ a, atol=1e-6, rtol=1e-5)
    assert [n for n, p in tiny_pipe.text_encoder.named_parameters() if not torch.equal(p, after[n])] == [f"{name}.weight"]
    save_file({f"text_encoder.{name}.lora_A.weight": a[:, :-1].contiguous(), f"text_encoder.{name}.lora_B.weight": b},
              tmp_path / "narrow.safetensors")
    with pytest.raises(cn.InvalidInputError, match="does not fit model 'tiny'"):
        cn.load_pipeline("tiny", device="cpu", lora=tmp_path / "narrow.safetensors")


def test_bad_loras_are_refused_with_what_is_wrong(loras, tmp_path):
    with pytest.raises(cn.InvalidInputError, match="does not fit model 'tiny'.*size mismatch"):
        cn.load_pipeline("tiny", device="cpu", lora=loras["wide"])
    with pytest.raises(cn.ModelNotFoundError, match="does not exist"):
        cn.load_pipeline("no-such-model", lora=tmp_path / "missing.safetensors")  # before the model is looked for
    with pytest.raises(cn.ModelNotFoundError, match="not in the local Hugging Face cache"):
        cn.load_pipeline("tiny", lora="someone/no-such-lora")
    (tmp_path / "l.bin").write_bytes(b"x")
    with pytest.raises(cn.InvalidInputError, match="only .safetensors"):
        cn.load_pipeline("tiny", lora=tmp_path / "l.bin")
    with pytest.raises(cn.InvalidInputError, match="lora_scale"):
        cn.load_pipeline("tiny", lora=loras["a"], lora_scale=float("nan"))
    save_file({"text_encoder.nothing.lora_A.weight": torch.zeros(2, 3)}, tmp_path / "none.safetensors")
    with pytest.raises(cn.InvalidInputError, match="another base model"):
        cn.load_pipeline("tiny", lora=tmp_path / "none.safetensors")
    assert main(["decompose", "a dog", "--model", "tiny", "--lora", str(tmp_path / "gone.safetensors"),
                 "--out", str(tmp_path / "run")]) == 1
    assert not (tmp_path / "run" / "decomposition.json").exists()


def test_a_fine_tuned_pipeline_folder_loads_as_any_model(tiny_pipe, tmp_path):
    tuned = copy.deepcopy(tiny_pipe)
    with torch.no_grad():
        tuned.unet.conv_out.bias += 0.1
    tuned.save_pretrained(tmp_path / "tuned")
    loaded = cn.load_pipeline(str(tmp_path / "tuned"), device="cpu")
    # a saved scheduler config names no defaults, so another sampler made from it takes the saved values (DPM:
    # "leading" timesteps, not its own "linspace"): the same weights draw otherwise, and the fingerprint says so
    assert len({weights_fingerprint(loaded), weights_fingerprint(tuned), weights_fingerprint(tiny_pipe)}) == 3
    tuned.scheduler = type(tuned.scheduler).from_config(loaded.scheduler.config)
    assert weights_fingerprint(loaded) == weights_fingerprint(tuned)
    x = cn.generate(loaded, "a dog", [0], steps=2, verbose=False)
    assert torch.equal(x, cn.generate(tuned, "a dog", [0], steps=2, verbose=False))


@pytest.mark.slow
def test_decompose_command_records_the_lora(loras, tmp_path):
    out = tmp_path / "run"
    args = ["decompose", "a dog", "--model", "tiny", "--lora", str(loras["a"]), "--lora-scale", "0.5", "--out", str(out),
            "--n-train", "2", "--n-val", "1", "--gen-steps", "1", "--dict-size", "8", "--n-tokens", "3", "--steps", "2",
            "--val-every", "2", "--val-steps", "1", "--quiet"]
    env = dict(CONCEPTOR_CACHE=str(tmp_path / "cache"))
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        assert main(args) == 0
    lora = cn.Decomposition.load(out).history["lora"]
    assert lora["scale"] == 0.5 and lora["lora"] == str(loras["a"])


# -- 3. comparing two decompositions ---------------------------------------------------------------------------

def test_compare_shares_differences_and_error_bars(tiny_pipe, tmp_path):
    a = make_dec(tiny_pipe, model="base", coefs=[0.5, 0.3, 0.2, 0.1, 0.05, 0.01])
    b = make_dec(tiny_pipe, model="base + LoRA", words=["blue", "red", "square", "person", "apple", "circle"],
                 coefs=[1.0, 0.6, 0.4, 0.3, 0.2, 0.1])
    c = cn.compare(a, b)
    f = c.to_frame()
    assert (c.label_a, c.label_b) == ("base", "base + LoRA") and f.attrs == {"a": "base", "b": "base + LoRA"}
    assert set(f["token"]) == {"red", "blue", "person", "square"}  # the union of both top 3
    row = f.set_index("token")
    assert math.isclose(row.loc["red", "a"], 0.5) and math.isclose(row.loc["red", "b"], 0.6 / 2.0)  # top-3 shares
    assert math.isclose(row.loc["square", "a"], 0.05) and math.isclose(row.loc["blue", "diff"], 0.5 - 0.3)
    assert list(f["diff"]) == sorted(f["diff"], reverse=True)
    assert f["error"].isna().all() and f["exceeds_spread"].isna().all()  # no error bars: said, not invented
    assert "no error bars" in c.plot().get_title()

    a.spread, b.spread = [0.01] * 6, [0.02] * 6  # error bars on both sides (K fits)
    f = cn.compare(a, b).to_frame().set_index("token")
    err = 2 * math.sqrt((0.01 / 1.0) ** 2 + (0.02 / 2.0) ** 2)
    assert math.isclose(f.loc["red", "error"], err)
    assert bool(f.loc["blue", "exceeds_spread"]) and math.isclose(f.loc["blue", "diff"], 0.2)  # 2 sd: 0.028
    b.coefficients = [0.5, 0.3, 0.2, 0.1, 0.05, 0.01]
    b.tokens, b.token_ids = list(a.tokens), list(a.token_ids)
    assert not cn.compare(a, b).to_frame()["exceeds_spread"].any()  # the same coefficients: nothing beyond spread
    a.spread = []  # one side without: none
    assert cn.compare(a, b).to_frame()["exceeds_spread"].isna().all()
    cmp = cn.compare(a, b)
    cmp.save(tmp_path / "c")
    assert cn.Comparison.load(tmp_path / "c") == cmp


def test_compare_two_concepts_on_one_model_and_refuses_two_vocabularies(tiny_pipe):
    dog, cat = make_dec(tiny_pipe, concept="a dog"), make_dec(tiny_pipe, concept="a cat", words=["cat", "red", "tree"],
                                                              coefs=[1, 0.5, 0.1])
    c = cn.compare(dog, cat, k=2)
    assert (c.label_a, c.label_b) == ("a dog", "a cat")
    f = c.to_frame().set_index("token")
    assert set(f.index) == {"red", "blue", "cat"} and f.loc["cat", "a"] == 0 and pd.isna(f.loc["cat", "rank_a"])
    other = copy.deepcopy(cat)
    other.tokens[1] = "rouge"  # the same id read as another word: another tokenizer
    with pytest.raises(cn.InvalidInputError, match="different vocabularies"):
        cn.compare(dog, other)
    with pytest.raises(cn.InvalidInputError, match="k must be"):
        cn.compare(dog, cat, k=0)
    with pytest.raises(cn.InvalidInputError, match="Decomposition"):
        cn.compare(dog, {"tokens": []})
    disjoint = make_dec(tiny_pipe, words=["tree", "cat", "car"], coefs=[1, 1, 1])
    assert "could not be checked" in cn.compare(dog, disjoint).note


def test_compare_plot_is_a_diverging_bar_chart(tiny_pipe):
    matplotlib.use("Agg")
    a, b = make_dec(tiny_pipe, model="x"), make_dec(tiny_pipe, model="y", coefs=[0.1, 0.3, 0.5, 0.2, 0.05, 0.01])
    ax = cn.compare(a, b).plot()
    widths = [p.get_width() for p in ax.patches]
    assert len(widths) == 3 and min(widths) < 0 < max(widths)
    assert [t.get_text() for t in ax.get_yticklabels()][0] == cn.compare(a, b).to_frame()["token"].iloc[0]
