"""Batch decomposition: concept lists, claims, resume after a kill, accelerate ranks, concurrent jobs."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

import conceptor_nb
from conceptor_nb import batch
from conceptor_nb.batch import Claim, as_jobs, read_concepts

ROOT = Path(conceptor_nb.__file__).resolve().parents[1]
TINY = ["--model", "tiny", "--steps", "4", "--n-train", "4", "--val-every", "2", "--quiet"]
TINY_KW = dict(steps=4, n_train=4, val_every=2)


def _env(cache):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", CONCEPTOR_CACHE=str(cache),
               OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    env.pop("CONCEPTOR_PROFILE", None)
    return env


def _batch_cmd(concepts, out):
    return [sys.executable, "-m", "conceptor_nb", "batch", str(concepts), "--out", str(out), *TINY]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _starts(out):
    return Counter(e["slug"] for e in batch.read_log(out) if e["event"] == "start")


# -- lists --------------------------------------------------------------------------------------------
def test_text_list_comments_blank_lines_and_unique_slugs(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("# my concepts\na dog\n\n  a cat   # a pet\na Dog\n#a car\n")
    jobs = as_jobs(f)
    assert [j.concept for j in jobs] == ["a dog", "a cat", "a Dog"]
    assert [j.slug for j in jobs] == ["a-dog", "a-cat", "a-dog-2"]
    assert all(j.overrides == {} for j in jobs)


def test_csv_list_overrides_are_typed_and_checked(tmp_path):
    f = tmp_path / "c.csv"
    f.write_text("concept,seed,sparsity,flip\na dog,3,,no\na cat,,0.01,\n")
    jobs = read_concepts(f)
    assert jobs[0].overrides == {"seed": 3, "flip": False}
    assert jobs[1].overrides == {"sparsity": 0.01}
    (tmp_path / "bad.csv").write_text("concept,colour\na dog,red\n")
    with pytest.raises(ValueError, match="colour"):
        read_concepts(tmp_path / "bad.csv")
    (tmp_path / "model.csv").write_text("concept,model\na dog,toy\n")
    with pytest.raises(ValueError, match="one model"):
        read_concepts(tmp_path / "model.csv")


# -- claims -------------------------------------------------------------------------------------------
def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_claim_is_exclusive_and_released(tmp_path):
    a, b = Claim(tmp_path, "x"), Claim(tmp_path, "x")
    assert a.acquire()
    assert not b.acquire()  # held by a live process (this one)
    assert batch.claim_state(tmp_path, "x") == "live"
    b.release()  # not b's claim: must not remove a's
    assert a.path.exists()
    a.release()
    assert not a.path.exists()
    assert b.acquire()
    b.release()


def test_stale_claims_are_taken_over_and_foreign_ones_respected(tmp_path):
    c = Claim(tmp_path, "x")
    c.folder.mkdir(parents=True)
    # a dead process on this host: stale
    c.path.write_text(json.dumps({"host": os.uname().nodename, "pid": _dead_pid(), "token": "old"}))
    assert batch.claim_state(tmp_path, "x") == "stale"
    assert c.acquire()
    assert json.loads(c.path.read_text())["pid"] == os.getpid()
    c.release()
    # another host, fresh: cannot be judged, so respected; not refreshed for too long: stale
    c.path.write_text(json.dumps({"host": "elsewhere.invalid", "pid": 1, "token": "far"}))
    assert not Claim(tmp_path, "x").acquire()
    old = time.time() - batch.STALE_AFTER_S - 10
    os.utime(c.path, (old, old))
    assert Claim(tmp_path, "x").acquire()


def test_batch_command_takes_every_decompose_flag():
    from conceptor_nb.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    flags = {name: {o for a in p._actions for o in a.option_strings} for name, p in sub.items()}
    # a batch always continues interrupted work (no --resume) and skips finished concepts (--recompute, not --overwrite)
    missing = flags["decompose"] - flags["batch"] - {"--show", "--overwrite", "--resume"}
    assert not missing, missing
    assert {"--val-patience", "--seed", "--steps", "--model", "--device"} <= flags["batch"]
    args = sub["batch"].parse_args(["list.txt", "--val-patience", "2", "--no-flip", "--null-threshold", "none"])
    from conceptor_nb.cli import settings_overrides

    assert settings_overrides(args) == {"val_patience": 2, "flip": False, "null_threshold": None}


# -- UNet cost and early stopping -------------------------------------------------------------------
def test_unet_evaluation_count_matches_the_unet_calls(tiny_pipe, tiny_clip, cache):
    seen = []  # images per UNet call
    hook = tiny_pipe.unet.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    try:
        dec = conceptor_nb.decompose(tiny_pipe, "a dog", clip=tiny_clip, verbose=False, cache_dir=cache,
                                     steps=6, n_train=4, n_val=2, val_every=3, val_steps=2, gen_steps=3)
    finally:
        hook.remove()
    est = batch.unet_evaluations(dec.settings, dec.history)
    assert est["unet_generation"] == (4 + 2) * 3 * 2
    assert est["unet_fit"] == 6 * 2
    assert est["unet_validation"] == 2 * 2 * 2 * 2
    assert sum(seen) == est["unet_total"]


def test_val_patience_stops_the_fit(tiny_pipe, tiny_clip, cache):
    # lr=1e-30: every AdamW update is below a float32 ulp of its weight, so the MLP never changes and no
    # validation round can beat the first: the early stop is certain (with lr 1e-3 it depended on the scores)
    kw = dict(clip=tiny_clip, verbose=False, cache_dir=cache, steps=12, n_train=4, n_val=2, val_every=2, val_steps=2,
              lr=1e-30)
    full = conceptor_nb.decompose(tiny_pipe, "a dog", **kw)
    early = conceptor_nb.decompose(tiny_pipe, "a dog", val_patience=2, **kw)
    scores = [v["score"] for v in full.history["validation"]]
    # the first round after which two rounds bring no better score
    best, stop = -1e9, None
    for i, sc in enumerate(scores):
        if sc > best:
            best, best_i = sc, i
        elif i - best_i >= 2:
            stop = i + 1
            break
    assert full.history.get("stopped_at") is None and len(full.history["loss"]) == 12 and len(scores) == 6
    assert stop == 3, scores  # rounds 2 and 3 did not beat round 1
    assert early.history["stopped_at"] == stop * 2  # the step of the third round (val_every=2)
    assert len(early.history["loss"]) == stop * 2
    assert [v["score"] for v in early.history["validation"]] == pytest.approx(scores[:stop])
    assert early.history["best_step"] == (best_i + 1) * 2  # the best of the rounds it ran


# -- in-process batch ---------------------------------------------------------------------------------
def test_decompose_many_records_failures_and_skips_finished(tiny_pipe, tiny_clip, cache, tmp_path):
    out = tmp_path / "runs"
    concepts = ["a dog", {"concept": "a broken one", "n_train": 0}, {"concept": "a cat", "seed": 3}]
    df = batch.decompose_many(tiny_pipe, concepts, out, clip=tiny_clip, verbose=False, **TINY_KW)
    assert list(df["concept"]) == ["a dog", "a broken one", "a cat"]
    assert list(df["status"]) == ["done", "failed", "done"]
    assert "n_train must be an integer >= 1" in df.loc[1, "error"]
    assert df.loc[0, "token_1"] and df.loc[0, "coef_1"] >= df.loc[0, "coef_2"] > 0
    assert df.loc[0, "seed"] == 0 and df.loc[2, "seed"] == 3
    assert df.loc[0, "settings_hash"] != df.loc[2, "settings_hash"]  # the per-concept seed is part of the settings
    for slug in ("a-dog", "a-cat"):
        assert sorted(p.name for p in (out / slug).iterdir()) == [
            "batch.json", "coefficients.safetensors", "concept.png", "decomposition.json", "reconstruction.png"]
    back = batch.load_runs(out)
    assert list(back["status"]) == ["done", "failed", "done"] and list(back["token_1"]) == list(df["token_1"])
    # the same batch again: the finished ones are skipped, the failed one is tried again
    mtime = (out / "a-dog" / "decomposition.json").stat().st_mtime_ns
    batch.decompose_many(tiny_pipe, concepts, out, clip=tiny_clip, verbose=False, **TINY_KW)
    assert (out / "a-dog" / "decomposition.json").stat().st_mtime_ns == mtime
    assert _starts(out) == {"a-dog": 1, "a-broken-one": 2, "a-cat": 1}
    # other settings: not the same decomposition, so it is done again
    df3 = batch.decompose_many(tiny_pipe, ["a dog"], out, clip=tiny_clip, verbose=False, **{**TINY_KW, "seed": 1})
    assert _starts(out)["a-dog"] == 2 and df3.loc[0, "settings_hash"] != df.loc[0, "settings_hash"]
    assert batch.load_decompositions(out)["a dog"].settings.seed == 1


# -- processes ----------------------------------------------------------------------------------------
def test_killed_batch_resumes_without_recomputing(tmp_path):
    concepts = tmp_path / "concepts.txt"
    concepts.write_text("a dog\na cat\na car\n")
    out, env = tmp_path / "runs", _env(tmp_path / "cache")
    proc = subprocess.Popen(_batch_cmd(concepts, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = out / "a-dog" / "batch.json"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists(), proc.stderr.read().decode()[-2000:]
    before = json.loads(first.read_text())
    assert not (out / "summary.csv").exists()  # killed before the end
    rerun = subprocess.run(_batch_cmd(concepts, out), env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert json.loads(first.read_text()) == before  # the first concept was not recomputed
    assert _starts(out)["a-dog"] == 1
    summary = batch.load_runs(out)
    assert len(summary) == 3 and list(summary["status"]) == ["done"] * 3
    assert list(summary["concept"]) == ["a dog", "a cat", "a car"]
    assert not list((out / ".claims").glob("*.lock"))  # the dead run's claim was taken over and released


def test_accelerate_two_ranks_share_the_list(tmp_path):
    if shutil.which("accelerate") is None:
        pytest.skip("the accelerate command is not on PATH")
    concepts = tmp_path / "concepts.txt"
    concepts.write_text("a dog\na cat\na car\na tree\n")
    out = tmp_path / "runs"
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "conceptor_nb", "batch", str(concepts), "--out", str(out), "--device", "cpu", *TINY[:-1]]
    r = subprocess.run(cmd, env=_env(tmp_path / "cache"), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    starts = _starts(out)
    assert starts == {"a-dog": 1, "a-cat": 1, "a-car": 1, "a-tree": 1}
    ranks = {json.loads((out / s / "batch.json").read_text())["rank"] for s in starts}
    assert ranks == {0, 1}
    summary = batch.load_runs(out)
    assert list(summary["status"]) == ["done"] * 4 and sorted(summary["rank"]) == [0, 0, 1, 1]


def test_two_jobs_at_once_do_each_concept_once(tmp_path):
    concepts = tmp_path / "concepts.txt"
    concepts.write_text("a dog\na cat\na car\na tree\n")
    out, env = tmp_path / "runs", _env(tmp_path / "cache")
    procs = [subprocess.Popen(_batch_cmd(concepts, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read().decode()[-2000:]
    assert _starts(out) == {"a-dog": 1, "a-cat": 1, "a-car": 1, "a-tree": 1}
    pids = {e["pid"] for e in batch.read_log(out) if e["event"] == "start"}
    summary = batch.load_runs(out)
    assert list(summary["status"]) == ["done"] * 4
    assert len(pids) in (1, 2)  # (two when both got going in time; the point is: no concept twice)


@pytest.mark.parametrize("concept", ['=HYPERLINK("http://example.invalid","x")', "@SUM(1+1)", "+cmd|' /C calc'!A0",
                                     "-2+3", "\tx", "\rx"])
def test_summary_csv_escapes_cells_a_spreadsheet_would_run_and_the_json_keeps_them(tmp_path, concept):
    batch.write_summary(tmp_path, batch.as_jobs([concept, "a dog"]))
    with (tmp_path / "summary.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["concept"] == "'" + concept and rows[1]["concept"] == "a dog"
    assert json.loads((tmp_path / "summary.json").read_text())["rows"][0]["concept"] == concept
