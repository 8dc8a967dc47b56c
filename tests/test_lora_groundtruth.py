"""Issue 24, item 4: a LoRA whose effect is known, the ground truth for ``compare``.

The shipped ``doctor_red_lora.safetensors`` (``scripts/toyworld_lora.py``: a rank-4 LoRA on the toy text encoder,
self-distilled so that "a photo of a doctor" draws what the base model draws for "a photo of a red person" while
the world's other captions keep their predictions) turns the toy world's doctor (80% blue persons in the spec)
into mostly red persons. The pixel oracle checks that. Decomposing "a doctor" with and without it should show red
rising and blue falling more than any other world word moves: measured, it does not (strict xfail with the
numbers). Minutes of CPU: slow set.
"""
import pytest
import torch

import conceptor_nb as cn
from conceptor_nb.method.generate import image_seeds
from conceptor_nb.toyworld import Oracle, shipped_lora, toy_spec

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

LORA = shipped_lora()
TOY = cn.settings("toy")
N = 64  # images per prompt for the oracle


@pytest.fixture(scope="module")
def pipes():
    return cn.load_pipeline("toy", device="cpu"), cn.load_pipeline("toy", device="cpu", lora=LORA)


def shares(pipe, prompt):
    """{"colour glyph": share} the oracle reads in N images of ``prompt`` at the toy settings (the script's seeds)."""
    images = cn.generate(pipe, prompt, image_seeds(9, N), steps=TOY.gen_steps, guidance=TOY.guidance,
                         sampler=TOY.sampler, verbose=False, batch_size=64)
    labels = [f"{r.colour} {r.glyph}" for r in Oracle(toy_spec())(images)]
    return {k: labels.count(k) / N for k in set(labels)}


def test_the_shipped_lora_is_small_and_fused_in(pipes):
    assert LORA.is_file() and LORA.stat().st_size < 100_000
    base, tuned = pipes
    assert tuned.conceptor_lora["scale"] == 1.0 and tuned.conceptor_lora["sha256"]
    changed = [n for (n, p), q in zip(base.text_encoder.named_parameters(), tuned.text_encoder.parameters())
               if not torch.equal(p, q)]
    assert changed and all("embeddings" not in n for n in changed)  # the vocabulary the decomposition reads is kept
    assert all(torch.equal(p, q) for p, q in zip(base.unet.parameters(), tuned.unet.parameters()))


def test_the_lora_turns_the_doctor_red_and_keeps_the_other_prompts(pipes):
    base, tuned = pipes
    before, after = shares(base, "a photo of a doctor"), shares(tuned, "a photo of a doctor")
    assert before.get("blue person", 0) >= 0.5 and before.get("red person", 0) <= 0.4, before
    assert after.get("red person", 0) >= 0.75 and after.get("blue person", 0) <= 0.1, after
    for prompt, key in (("a photo of a blue person", "blue person"), ("a photo of a red person", "red person"),
                        ("a photo of a fruit", "red apple"), ("a photo of a fruit", "yellow lemon")):
        b, a = shares(base, prompt).get(key, 0), shares(tuned, prompt).get(key, 0)
        assert abs(a - b) <= 0.15, (prompt, key, b, a)


@pytest.fixture(scope="module")
def comparison(pipes):
    """"a doctor" decomposed with and without the LoRA (toy profile, seed 0), compared: {token: diff}."""
    base, tuned = pipes
    s = TOY.replace(seed=0)
    clip = cn.load_clip("toy", device="cpu")
    a = cn.decompose(base, "a doctor", clip=clip, settings=s, verbose=False)
    b = cn.decompose(tuned, "a doctor", clip=clip, settings=s, verbose=False)
    f = cn.compare(a, b, labels=("base", "LoRA")).to_frame()
    return dict(zip(f["token"], f["diff"]))


def test_compare_shows_red_rising_and_blue_falling(comparison):
    """Seed 0: red +0.037, blue -0.047 (shares of the top-10 mass). Not in every seed: seed 1 gave red -0.009,
    blue -0.002; seed 2 red +0.011, blue -0.098 (scripts/toyworld_lora.py's STATUS)."""
    assert comparison.get("red", 0.0) > 0 > comparison.get("blue", 0.0), comparison


@pytest.mark.xfail(strict=True, reason=(
    "issue 24 item 4's criterion, no other world word changing by more than red and blue, does not hold with one "
    "toy-profile fit per side: measured (diff of shares, LoRA - base) seed 0 red +0.037 blue -0.047, largest other "
    "triangle -0.048 (purple +0.043, yellow -0.046); seed 1 red -0.009 blue -0.002, green +0.047; seed 2 red +0.011 "
    "blue -0.098, person -0.168. One fit's noise is as large as the LoRA's effect on the coefficients; three fits a side do "
    "not help either (benchmarks/compare_lora.py: red -0.014/+0.015/+0.014, square +0.096 on seed 0)"))
def test_compare_no_other_world_word_moves_more(comparison):
    words = set(toy_spec().world_words) - {"red", "blue"}
    red, blue = comparison.get("red", 0.0), comparison.get("blue", 0.0)
    other = max((abs(v) for k, v in comparison.items() if k in words), default=0.0)
    assert other < min(red, -blue), comparison
