"""Faults: an interrupted fit resumes to exactly the coefficients of an uninterrupted one; the caches
cannot lie (other weights under the same name, damaged bytes) and survive concurrent writers."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

import conceptor_nb.method.fit as conceptor_mod
from conceptor_nb import concept_images, decompose, load_pipeline
from conceptor_nb.config import TINY
from conceptor_nb.errors import CacheError, FitDivergedError
from conceptor_nb.io import load_verified, save_verified

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
    from conceptor_nb.method.vocab import vocab_text_features

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


# -- the command line, in subprocesses: killed, interrupted, resumed; concurrent runs --------------------

ROOT = Path(__file__).resolve().parents[1]
CLI_ARGS = ["--model", "tiny", "--quiet", "--n-train", "3", "--n-val", "0", "--steps", "12", "--val-every", "3",
            "--gen-steps", "2", "--dict-size", "16"]
# the CLI, with each fit step slowed by $SLOW seconds so that a test can interrupt it mid-fit
SLOW_CLI = """
import os, sys, time
import conceptor_nb.method.fit as C
real = C.step_loss
def slow(*a, **k):
    time.sleep(float(os.environ.get("SLOW", "0")))
    return real(*a, **k)
C.step_loss = slow
from conceptor_nb.cli import main
sys.exit(main(sys.argv[1:]))
"""


_HASH_SEEDS = iter(range(1, 10**6))


def _cli(tmp_path, cache, out, *extra, slow=0.0):
    """The CLI in a new process, each with another PYTHONHASHSEED (a resume must not depend on it)."""
    script = tmp_path / "slow_cli.py"
    script.write_text(SLOW_CLI)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CONCEPTOR_CACHE": str(cache), "SLOW": str(slow),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": str(next(_HASH_SEEDS))}
    # SIGINT as a user's Ctrl-C: default handling in the child, whatever this process inherited or set
    return subprocess.Popen([sys.executable, str(script), "decompose", "a dog", *CLI_ARGS, "--out", str(out), *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _checkpoint_step(out) -> int:
    from conceptor_nb.io import load_verified

    file = out / ".checkpoint" / "fit_state.safetensors"
    if not file.exists():
        return 0
    try:
        return json.loads(load_verified(file)[1]["state"])["step"]
    except Exception:  # noqa: BLE001 - mid-rename on some systems: try again
        return 0


def _interrupt_after(proc, out, step, sig, timeout=240):
    t0 = time.time()
    while _checkpoint_step(out) < step:
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, "no checkpoint in time"
        time.sleep(0.1)
    proc.send_signal(sig)
    return proc.communicate(timeout=120)



def test_killed_and_interrupted_cli_run_resumes_to_the_same_coefficients(tmp_path, cache):
    ref = _cli(tmp_path, cache, tmp_path / "ref")
    assert ref.wait(timeout=300) == 0, ref.communicate()
    entries = len(list(cache.glob("images/*/images.safetensors")))  # one a split of images the run uses
    out = tmp_path / "run"
    # 1. killed outright (no chance to clean up) after the checkpoint of step 3
    _interrupt_after(_cli(tmp_path, cache, out, slow=1.0), out, 3, signal.SIGKILL)
    assert not (out / "decomposition.json").exists()
    # killed before its next checkpoint (3 s later), or the re-run below would find a checkpoint of step 6 already
    # and be interrupted while it starts, where a library's bare `except:` may swallow the KeyboardInterrupt
    assert _checkpoint_step(out) == 3
    # 2. re-run: continues from step 3; Ctrl-C after step 6 -> one line, exit 130
    proc = _cli(tmp_path, cache, out, slow=1.0)  # 6 s left after step 6: room for a loaded machine to notice it
    _, err = _interrupt_after(proc, out, 6, signal.SIGINT)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted: its last checkpoint")
    assert "continuing it" in err  # it said it resumed the killed run
    assert "of another run" not in err  # ... and did, in a process with another hash seed
    # 3. --resume finishes
    proc = _cli(tmp_path, cache, out, "--resume")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "of another run" not in err
    assert len(list(cache.glob("images/*/images.safetensors"))) == entries  # four processes, four hash seeds, no new entry
    assert (out / "coefficients.safetensors").read_bytes() == (tmp_path / "ref" / "coefficients.safetensors").read_bytes()
    a = json.loads((out / "decomposition.json").read_text())
    b = json.loads((tmp_path / "ref" / "decomposition.json").read_text())
    assert a["coefficients"] == b["coefficients"] and a["history"]["loss"] == b["history"]["loss"]
    assert not (out / ".checkpoint").exists()
    for entry in cache.glob("images/*/images.safetensors"):  # the cache stayed readable
        load_verified(entry)


def test_two_concurrent_runs_share_a_cache(tmp_path, cache):
    procs = [_cli(tmp_path, cache, tmp_path / f"run{i}") for i in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert (tmp_path / "run0" / "coefficients.safetensors").read_bytes() == \
        (tmp_path / "run1" / "coefficients.safetensors").read_bytes()
    entries = list(cache.glob("images/*/images.safetensors"))
    assert entries and all(load_verified(e) for e in entries)
    assert not [p for p in cache.rglob("*.tmp")]  # no temp file left behind


def test_other_clip_weights_under_the_same_name_miss_the_vocabulary_cache(tiny_clip, cache):
    from conceptor_nb import load_clip
    from conceptor_nb.method.vocab import vocab_text_features

    other = load_clip("tiny", device="cpu", seed=1)
    assert other.name == tiny_clip.name
    a, b = vocab_text_features(tiny_clip, verbose=False), vocab_text_features(other, verbose=False)
    assert not torch.equal(a, b) and len(list(cache.glob("vocab/*.safetensors"))) == 2


# -- kill and resume across processes on fake Stable Diffusion (issue 25: resume and the image cache must not depend
# on the process or its hash seed): three processes a model, each with another PYTHONHASHSEED ---------------------
SD_RUN = """
import json, sys
import conceptor_nb as cn
import conceptor_nb.method.fit as F
model, ck, stop, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
s = cn.settings("sd")
s = s.replace(n_train=2, n_val=0, gen_steps=1, dict_size=12, n_tokens=3, steps=6, batch_size=1, val_every=2,
              clip_templates=s.clip_templates[:1], n_test=0)
real, calls = F.step_loss, []
def step(*a, **k):
    calls.append(1)
    if len(calls) == stop:
        raise KeyboardInterrupt
    return real(*a, **k)
F.step_loss = step
pipe = cn.load_pipeline(model, device="cpu")
clip = cn.load_clip("openai/clip-vit-base-patch32", device="cpu")
try:
    dec = cn.decompose(pipe, "a president", clip=clip, settings=s, verbose=False, checkpoint_dir=ck if ck != "-" else None)
except KeyboardInterrupt:
    sys.exit(130)
json.dump({"coefficients": dec.coefficients, "token_ids": dec.token_ids, "loss": dec.history["loss"]}, open(out, "w"))
"""


@pytest.mark.slow
@pytest.mark.parametrize("model", ["runwayml/stable-diffusion-v1-5", "stabilityai/stable-diffusion-2-1",
                                   "stabilityai/stable-diffusion-xl-base-1.0"])
def test_killed_fit_resumes_in_a_new_process_on_fake_stable_diffusion(model, small_hub, tmp_path):
    """Interrupted at step 5 (checkpoint at step 4) in one process, resumed in another with another hash seed: the
    coefficients equal an uninterrupted run's (a third process), and the three share one image-cache entry."""
    import fakehub

    home, cache = small_hub.get(model, fakehub.CLIP_B32), tmp_path / "cache"
    script = tmp_path / "run.py"
    script.write_text(SD_RUN)

    def run(hash_seed, ck, stop):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "CONCEPTOR_CACHE": str(cache), "HF_HOME": str(home),
               "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": str(hash_seed)}
        env.pop("HF_HUB_CACHE", None)
        out = tmp_path / f"result-{hash_seed}.json"
        proc = subprocess.run([sys.executable, str(script), model, str(ck), str(stop), str(out)], env=env,
                              capture_output=True, text=True, timeout=600)
        return proc, out

    ref, ref_out = run(1, "-", 0)
    assert ref.returncode == 0, ref.stderr[-3000:]
    ck = tmp_path / "ck"
    killed, _ = run(2, ck, 5)
    assert killed.returncode == 130 and (ck / "fit_state.safetensors").exists(), killed.stderr[-3000:]
    resumed, out = run(3, ck, 0)
    assert resumed.returncode == 0 and "of another run" not in resumed.stderr, resumed.stderr[-3000:]
    a, b = json.loads(out.read_text()), json.loads(ref_out.read_text())
    assert a == b  # the same coefficients, token ids and losses, steps 5-6 recomputed in the new process
    assert len(list(cache.glob("images/*/images.safetensors"))) == 1  # a cache hit in processes 2 and 3
