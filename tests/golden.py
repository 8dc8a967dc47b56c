"""Before/after equality for refactors: decompositions whose coefficients must not change.

``python tests/golden.py [--slow]`` writes ``tests/fixtures/golden.json`` from the code as it is;
``tests/test_golden.py`` recomputes every case and asserts the same tokens, ids and float32
coefficients, bit for bit. Regenerate the file only when a change is *meant* to change results,
and say so in the commit.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
FILE = HERE / "fixtures" / "golden.json"
SMALL = dict(n_train=2, n_val=1, gen_steps=1, dict_size=12, n_tokens=3, steps=2, batch_size=1, val_every=2,
             val_steps=1, clip_templates=("a photo of a {}",), n_test=0)  # (the significance test: not a fit)
FAKE = {"sd15": "runwayml/stable-diffusion-v1-5", "sd21v": "stabilityai/stable-diffusion-2-1",
        "sdxl": "stabilityai/stable-diffusion-xl-base-1.0"}
CASES = ("tiny", "sd15", "sd21v", "sdxl", "toy-ci")
SLOW_CASES = ("toy",)


def compute(case: str, hf_home=None) -> dict:
    """One case's decomposition as {concept, token_ids, tokens, coefficients}."""
    import torch

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the recorded values were computed with 2 threads; float sums depend on the split
    try:
        return _compute(case)
    finally:
        torch.set_num_threads(threads)


def _compute(case: str) -> dict:
    from conceptor_nb import decompose, load_clip, load_pipeline, settings

    with tempfile.TemporaryDirectory() as cache:
        if case == "tiny":
            pipe, clip = load_pipeline("tiny", device="cpu"), load_clip("tiny", device="cpu")
            dec = decompose(pipe, "a dog", clip=clip, settings=settings("tiny"), cache_dir=cache, verbose=False,
                            **SMALL)
        elif case in FAKE:
            pipe = load_pipeline(FAKE[case], device="cpu")
            clip = load_clip("openai/clip-vit-base-patch32", device="cpu")
            dec = decompose(pipe, "a president", clip=clip, settings=settings("sd"), cache_dir=cache, verbose=False,
                            **SMALL)
        else:
            prof = "ci" if case == "toy-ci" else "toy"
            pipe, clip = load_pipeline("toy", device="cpu"), load_clip("toy", device="cpu")
            dec = decompose(pipe, "a fruit", clip=clip, settings=settings(prof).replace(n_test=0), cache_dir=cache,
                            verbose=False)
    return dict(concept=dec.concept, token_ids=dec.token_ids, tokens=dec.tokens, coefficients=dec.coefficients)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    sys.path.insert(0, str(HERE))
    import fakehub

    out = json.loads(FILE.read_text()) if FILE.exists() else {}
    with tempfile.TemporaryDirectory() as home:
        os.environ.update(HF_HOME=home, HF_HUB_OFFLINE="1")
        for repo in (*FAKE.values(), "openai/clip-vit-base-patch32"):
            fakehub.build(home, repo)
        for case in CASES + (SLOW_CASES if "--slow" in argv else ()):
            out[case] = compute(case)
            print(case, out[case]["tokens"][:5], flush=True)
    FILE.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
