"""Before/after equality for refactors: decompositions whose coefficients must not change.

Float bits depend on the machine as well as the code: the CPU's kernels (and, under the ``sd`` profile's "auto"
precision, whether it computes bf16 natively) change the last bits, which a few Adam steps amplify. So
``tests/fixtures/golden.json`` holds one set of results per machine kind (:func:`platform`): the first, the
reference, recorded at 9a1e649 before the thin-toolkit layout on CI's Intel Xeon; others recorded later from code
that reproduced the reference on its own machine. ``tests/test_golden.py`` recomputes every case and asserts the
same tokens, ids and float32 coefficients, bit for bit, as this machine's set (a machine without one: as any set's,
else the test skips, naming the machine). ``python tests/golden.py [--slow]`` records this machine's set, refusing
one whose tokens differ from the reference's. Replace a set only when a change is *meant* to change results, and
say so in the commit.
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


def platform() -> str:
    """The machine kind, as far as float bits go: CPU vendor, model, its AVX/AMX/FMA flags, and torch's version."""
    import torch

    info = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = sorted(f for f in info.get("flags", "").split() if f.startswith(("avx", "amx", "fma")))
    return f"{info.get('vendor_id', '?')} | {info.get('model name', '?')} | {' '.join(flags)} | torch {torch.__version__}"


def load_sets() -> list[dict]:
    """The recorded sets, the reference first: ``[{"platform": ..., "cases": {case: result}}, ...]``."""
    return json.loads(FILE.read_text())["sets"] if FILE.exists() else []


def expected(case: str) -> tuple[list[dict], bool]:
    """(the recorded results of ``case`` to compare with, whether one was recorded on this machine kind)."""
    sets = [s for s in load_sets() if case in s["cases"]]
    mine = [s["cases"][case] for s in sets if s["platform"] == platform()]
    return (mine, True) if mine else ([s["cases"][case] for s in sets], False)


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

    sets, here = load_sets(), platform()
    mine = next((s for s in sets if s["platform"] == here), None)
    if mine is None:
        mine = {"platform": here, "cases": {}}
        sets.append(mine)
    with tempfile.TemporaryDirectory() as home:
        os.environ.update(HF_HOME=home, HF_HUB_OFFLINE="1")
        for repo in (*FAKE.values(), "openai/clip-vit-base-patch32"):
            fakehub.build(home, repo)
        for case in CASES + (SLOW_CASES if "--slow" in argv else ()):
            got = compute(case)
            ref = sets[0]["cases"].get(case) if mine is not sets[0] else None
            if ref is not None and (got["token_ids"], got["tokens"]) != (ref["token_ids"], ref["tokens"]):
                print(f"refused: {case}'s tokens differ from the reference's: {got['tokens']} != {ref['tokens']}")
                return 1
            mine["cases"][case] = got
            print(case, got["tokens"][:5], flush=True)
    FILE.write_text(json.dumps({"sets": sets}, indent=1) + "\n")
    print(f"recorded for {here}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
