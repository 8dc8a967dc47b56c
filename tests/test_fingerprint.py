"""The weights' fingerprint (the key of the image cache and of a fit's checkpoint) is the same in every process,
whatever Python's hash seed, and changes when any single weight value changes (issue 25, items 1 and 2)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conceptor_nb import load_pipeline
from conceptor_nb.method.generate import weights_fingerprint

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["tiny", "toy", "runwayml/stable-diffusion-v1-5", "stabilityai/stable-diffusion-2-1",
          "stabilityai/stable-diffusion-xl-base-1.0"]


def _in_process(model, hash_seed, hf_home):
    env = dict(os.environ, PYTHONHASHSEED=str(hash_seed), HF_HOME=str(hf_home), HF_HUB_OFFLINE="1",
               PYTHONPATH=str(ROOT))
    code = ("from conceptor_nb import load_pipeline; from conceptor_nb.method.generate import weights_fingerprint; "
            f"print(weights_fingerprint(load_pipeline({model!r}, device='cpu')))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


# two fresh processes a model: the fake Stable Diffusion caches run in the slow set (CI runs both)
ACROSS = [m if m in ("tiny", "toy") else pytest.param(m, marks=pytest.mark.slow) for m in MODELS]


@pytest.mark.parametrize("model", ACROSS)
def test_fingerprint_is_equal_across_processes_with_other_hash_seeds(model, fake_hub):
    assert _in_process(model, 1, fake_hub) == _in_process(model, 2, fake_hub)


@pytest.mark.parametrize("model", MODELS)
def test_fingerprint_changes_when_any_single_weight_value_changes(model, fake_hub):
    pipe = load_pipeline(model, device="cpu")
    before = weights_fingerprint(pipe)
    assert weights_fingerprint(pipe) == before  # memoised, same answer
    gen = torch.Generator().manual_seed(0)
    parts = [pipe.unet, pipe.vae, pipe.text_encoder] + ([pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) else [])
    params = [p for m in parts for p in m.parameters()]
    seen = {before}
    for _ in range(3):  # a random value of a random tensor, then back
        p = params[int(torch.randint(len(params), (1,), generator=gen))]
        i = int(torch.randint(p.numel(), (1,), generator=gen))
        with torch.no_grad():
            old = p.view(-1)[i].item()
            p.view(-1)[i] = old + 1.0
            changed = weights_fingerprint(pipe)
            p.view(-1)[i] = old
        assert changed not in seen
        seen.add(changed)
        assert weights_fingerprint(pipe) == before
    with torch.no_grad():  # one row of the token-embedding table: a fine-tune of one word
        pipe.text_encoder.get_input_embeddings().weight[1234] += 1e-3
    assert weights_fingerprint(pipe) not in seen
