"""The vocabulary embedding's fast paths (conceptor_nb.method.vocab): the last layer's EOS-only pass equals the
plain forward pass, bf16 agrees with fp32, and the two precisions never share a cache entry. Tiny shapes: the
fake CLIP ViT-B/32 of tests/fakehub.py (real config, shrunk widths, random weights)."""
import pytest
import torch
import torch.nn.functional as F

import fakehub  # tests/fakehub.py; the hub fixture is in conftest.py
from conceptor_nb.method import vocab as conceptor_mod  # noqa: E402
from conceptor_nb.method import vocab as dictionary  # noqa: E402
from conceptor_nb.clip import load_clip  # noqa: E402

TEMPLATES = ("a photo of a {}", "a cropped photo of the {}", "{} on a table")


@pytest.fixture(scope="module")
def clip(hub):
    with hub.env(fakehub.CLIP_B32):
        yield load_clip(fakehub.CLIP_B32, device="cpu")


def _ids(clip, step=997):
    return dictionary.word_token_ids(clip.tokenizer)[::step]


def test_eos_only_last_layer_equals_the_whole_last_layer_and_the_plain_forward(clip):
    ids = _ids(clip)
    for template in TEMPLATES:
        plain = clip.text_features_ids(dictionary._template_ids(clip.tokenizer, template, ids))
        fast = dictionary.template_features(clip, template, ids, eos_only_last=True)
        whole = dictionary.template_features(clip, template, ids, eos_only_last=False)
        assert torch.allclose(fast, plain, atol=1e-5) and torch.allclose(fast, whole, atol=1e-6)
    # small batches (the weights and the prefix's keys and values are shared between them) change nothing
    small = dictionary.template_features(clip, TEMPLATES[0], ids, batch_size=7)
    assert torch.allclose(small, dictionary.template_features(clip, TEMPLATES[0], ids), atol=1e-6)


def test_prefix_keys_values_match_the_model_and_are_reused(clip):
    pre, post = dictionary._template_parts(clip.tokenizer, TEMPLATES[1])
    suffixes = torch.cat([_ids(clip)[:, None], torch.tensor(post).expand(len(_ids(clip)), -1)], dim=1)
    kv = dictionary.prefix_keys_values(clip.model, pre)
    assert len(kv) == len(clip.model.text_model.encoder.layers) and kv[0][0].shape[2] == len(pre)
    a = dictionary.prefix_cached_text_features(clip.model, pre, suffixes)
    b = dictionary.prefix_cached_text_features(clip.model, pre, suffixes, prefix_kv=kv,
                                               weights=dictionary.layer_weights(clip.model, torch.float32))
    assert torch.equal(a, b)


def test_bf16_features_agree_with_fp32(clip):
    ids = _ids(clip, 211)
    for template in TEMPLATES[:2]:
        fp32 = dictionary.template_features(clip, template, ids, precision="fp32")
        bf16 = dictionary.template_features(clip, template, ids, precision="bf16")
        assert bf16.dtype == torch.float32 and bf16.shape == fp32.shape
        cos = (fp32 * bf16).sum(-1)
        assert float(cos.min()) > 0.995, float(cos.min())
        assert not torch.equal(fp32, bf16)  # it did compute in bf16


def test_bf16_quick_gelu_folding_is_the_same_function(clip):
    layer = clip.model.text_model.encoder.layers[0]
    w32, wbf = dictionary._layer_weights(layer, torch.float32), dictionary._layer_weights(layer, torch.bfloat16)
    assert w32["act"] is layer.mlp.activation_fn and wbf["act"] is F.silu
    x = torch.randn(64, w32["fc1"].shape[1])
    ref = layer.mlp(x)
    folded = F.linear(F.silu(F.linear(x, w32["fc1"] * 1.702, w32["fc1_b"] * 1.702)), w32["fc2"] / 1.702, w32["fc2_b"])
    assert torch.allclose(folded, ref, atol=1e-5)


def test_precisions_have_their_own_cache_entries(clip, tmp_path, monkeypatch):
    f32, k32 = dictionary.vocab_cache_entry(clip, TEMPLATES[:1], tmp_path, precision="fp32")
    fbf, kbf = dictionary.vocab_cache_entry(clip, TEMPLATES[:1], tmp_path, precision="bf16")
    assert f32 != fbf and k32["precision"] == "float32" and kbf["precision"] == "bfloat16-mixed"
    # "auto" is whichever the hardware gives: its entry is that precision's
    monkeypatch.setattr(conceptor_mod, "cpu_has_native_bf16", lambda: False)
    assert dictionary.vocab_cache_entry(clip, TEMPLATES[:1], tmp_path, precision="auto")[0] == f32
    monkeypatch.setattr(conceptor_mod, "cpu_has_native_bf16", lambda: True)
    assert dictionary.vocab_cache_entry(clip, TEMPLATES[:1], tmp_path, precision="auto")[0] == fbf
    # computed and cached apart: the bf16 call does not read the fp32 entry
    a = dictionary.vocab_text_features(clip, TEMPLATES[:1], precision="fp32", cache_dir=tmp_path, verbose=False)
    b = dictionary.vocab_text_features(clip, TEMPLATES[:1], precision="bf16", cache_dir=tmp_path, verbose=False)
    assert f32.exists() and fbf.exists() and not torch.equal(a, b)
    assert torch.equal(b, dictionary.vocab_text_features(clip, TEMPLATES[:1], precision="bf16", cache_dir=tmp_path,
                                                         verbose=False))


def test_unknown_precision_is_refused(clip):
    with pytest.raises(ValueError, match="precision"):
        dictionary.template_features(clip, TEMPLATES[0], _ids(clip), precision="fp16")


def test_the_sd_profile_embeds_the_vocabulary_in_bf16_where_native_and_the_others_in_fp32():
    from conceptor_nb.config import PROFILES

    assert PROFILES["sd"].settings.vocab_precision == "auto"
    assert all(PROFILES[name].settings.vocab_precision == "fp32" for name in ("toy", "ci", "tiny"))
