"""Batch decomposition: concept lists, claims, resume after a kill, accelerate ranks, concurrent jobs."""
import csv
import dataclasses
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
from conceptor_nb.errors import OutputError

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


def _starts(out, concepts=("a dog", "a cat", "a car", "a tree")):
    """How often each concept was started (by its text)."""
    names = {j.slug: j.concept for j in as_jobs(list(concepts))}
    return Counter(names.get(e["slug"], e["slug"]) for e in batch.read_log(out) if e["event"] == "start")


def _folder(out, concept: str) -> Path:
    return Path(out) / as_jobs([concept])[0].slug


# -- lists --------------------------------------------------------------------------------------------
def test_text_list_comments_blank_lines_and_unique_slugs(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("# my concepts\na dog\n\n  a cat   # a pet\na Dog\n#a car\n")
    jobs = as_jobs(f)
    assert [j.concept for j in jobs] == ["a dog", "a cat", "a Dog"]
    assert [j.slug[:-9] for j in jobs] == ["a-dog", "a-cat", "a-dog"]  # the words, then a hash of the exact text
    assert len({j.slug for j in jobs}) == 3 and all(j.overrides == {} for j in jobs)


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
def test_claim_is_exclusive_and_released(tmp_path):
    a, b = Claim(tmp_path, "x"), Claim(tmp_path, "x")
    assert a.acquire()
    assert not b.acquire()  # held by a live process (this one, through another open file)
    assert batch.claim_state(tmp_path, "x") == "live"
    b.release()  # not b's claim: must not remove a's
    assert a.path.exists() and batch.claim_state(tmp_path, "x") == "live"
    a.release()
    assert not a.path.exists() and batch.claim_state(tmp_path, "x") is None
    assert b.acquire()
    b.release()


def test_a_killed_processs_claim_is_free(tmp_path):
    code = f"from conceptor_nb.batch import Claim; c = Claim({str(tmp_path)!r}, 'x'); assert c.acquire(); print(1, flush=True); input()"
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=_env(tmp_path))
    assert p.stdout.readline().strip() == b"1"
    assert batch.claim_state(tmp_path, "x") == "live" and not Claim(tmp_path, "x").acquire()
    p.kill()
    p.wait()
    assert Claim(tmp_path, "x").path.exists()  # the dead process left its lock file, but not its lock
    assert batch.claim_state(tmp_path, "x") is None
    c = Claim(tmp_path, "x")
    assert c.acquire()
    c.release()


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
                                     steps=6, n_train=4, n_val=2, val_every=3, val_steps=2, gen_steps=3, n_test=2)
    finally:
        hook.remove()
    est = batch.unet_evaluations(dec.settings, dec.history)
    s = dec.settings
    assert est["unet_generation"] == (4 + 2 + s.n_test) * 3 * 2
    assert est["unet_fit"] == 6 * 2
    assert est["unet_validation"] == 2 * 2 * 2 * 2
    assert est["unet_test"] == (s.n_tokens + 1) * s.n_test * s.test_draws > 0
    assert sum(seen) == est["unet_total"]
    del dec.history["unet_evals"]  # an older result: counted from its settings and history, the same
    assert batch.unet_evaluations(s.to_dict(), dec.history) == est


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
    for slug in df.loc[[0, 2], "slug"]:
        assert sorted(p.name for p in (out / slug).iterdir()) == [
            "batch.json", "coefficients.safetensors", "concept.png", "decomposition.json", "reconstruction.png"]
    back = batch.load_runs(out)
    assert list(back["status"]) == ["done", "failed", "done"] and list(back["token_1"]) == list(df["token_1"])
    # the same batch again: the finished ones are skipped, the failed one is tried again
    mtime = (_folder(out, "a dog") / "decomposition.json").stat().st_mtime_ns
    batch.decompose_many(tiny_pipe, concepts, out, clip=tiny_clip, verbose=False, **TINY_KW)
    assert (_folder(out, "a dog") / "decomposition.json").stat().st_mtime_ns == mtime
    assert _starts(out, concepts) == {"a dog": 1, "a broken one": 2, "a cat": 1}  # the failed one was tried again
    # other settings: refused before any work unless --overwrite; then done again
    with pytest.raises(OutputError, match="finished results of other settings.*'a dog'.*--overwrite"):
        batch.decompose_many(tiny_pipe, ["a dog"], out, clip=tiny_clip, verbose=False, **{**TINY_KW, "seed": 1})
    assert (_folder(out, "a dog") / "decomposition.json").stat().st_mtime_ns == mtime
    df3 = batch.decompose_many(tiny_pipe, ["a dog"], out, clip=tiny_clip, verbose=False, overwrite=True,
                               **{**TINY_KW, "seed": 1})
    assert _starts(out)["a dog"] == 2 and df3.loc[0, "settings_hash"] != df.loc[0, "settings_hash"]
    assert batch.load_decompositions(out)["a dog"].settings.seed == 1


# -- processes ----------------------------------------------------------------------------------------
def test_killed_batch_resumes_without_recomputing(tmp_path):
    concepts = tmp_path / "concepts.txt"
    concepts.write_text("a dog\na cat\na car\n")
    out, env = tmp_path / "runs", _env(tmp_path / "cache")
    proc = subprocess.Popen(_batch_cmd(concepts, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = _folder(out, "a dog") / "batch.json"
    deadline = time.time() + 300
    while (not first.exists() or '"running"' in first.read_text()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists(), proc.stderr.read().decode()[-2000:]
    before = json.loads(first.read_text())
    assert not (out / "summary.csv").exists()  # killed before the end
    rerun = subprocess.run(_batch_cmd(concepts, out), env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert json.loads(first.read_text()) == before  # the first concept was not recomputed
    assert _starts(out)["a dog"] == 1
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
    assert starts == {"a dog": 1, "a cat": 1, "a car": 1, "a tree": 1}
    ranks = {json.loads((_folder(out, c) / "batch.json").read_text())["rank"] for c in starts}
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
    assert _starts(out) == {"a dog": 1, "a cat": 1, "a car": 1, "a tree": 1}
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


# -- issue 25: what a batch may judge done, replace, or write; faults of one concept --------------------------
# one fit of a few seconds: no validation, no significance test (where the settings have one)
FAST_KW = dict(steps=2, n_train=2, n_val=0, val_every=0, gen_steps=2, dict_size=8,
               **{"n_test": 0 for f in dataclasses.fields(conceptor_nb.Settings) if f.name == "n_test"})


@pytest.fixture(scope="module")
def _module_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("batch_cache")


@pytest.fixture
def shared_cache(_module_cache, monkeypatch):
    """One cache for this module's batch tests: the tiny CLIP's vocabulary features are computed once."""
    monkeypatch.setenv("CONCEPTOR_CACHE", str(_module_cache))
    return _module_cache


def _snapshot(folder) -> dict:
    return {str(p): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


def test_done_is_judged_by_the_concept_text_and_slugs_are_unique_in_any_script(tiny_pipe, tiny_clip, shared_cache,
                                                                               tmp_path):
    """Item 4: "a C++ programmer" after "a C programmer" was skipped as done (one slug); "🍎 🍋" and "日本の犬" both
    slugged to 'concept' (the second was refused). Now each text has its own folder (its words, in any script, and a
    hash of the exact text), and a folder an older version named without the hash is still used for its concept."""
    out = tmp_path / "runs"
    batch.decompose_many(tiny_pipe, [batch.Job("a C programmer", slug="a-c-programmer")], out, clip=tiny_clip,
                         verbose=False, **FAST_KW)  # as an older version named it
    df = batch.decompose_many(tiny_pipe, ["a C programmer", "a C++ programmer"], out, clip=tiny_clip, verbose=False,
                              **FAST_KW)
    assert list(df["status"]) == ["done"] * 2
    assert list(df["slug"]) == ["a-c-programmer", as_jobs(["a C++ programmer"])[0].slug]
    assert Counter(e["slug"] for e in batch.read_log(out) if e["event"] == "start") == {s: 1 for s in df["slug"]}
    assert sorted(batch.load_decompositions(out)) == sorted(df["concept"])
    slugs = [j.slug for j in as_jobs(["a C++ programmer", "🍎 🍋", "日本の犬", "🍎🍋", "a dog 2", "a dog"])]
    assert [s[:-9] for s in slugs] == ["a-c-programmer", "red-apple-lemon", "日本の犬", "red-apple-lemon", "a-dog-2",
                                       "a-dog"] and len(set(slugs)) == 6
    assert batch.done_hash(out / "a-c-programmer", "a C++ programmer") is None  # done for its own text only


def test_batch_never_overwrites_or_deletes_files_it_did_not_write(tiny_pipe, tiny_clip, shared_cache, tmp_path):
    """Item 3: a re-run with other settings replaced finished results, and files of the user in a concept's folder
    were overwritten. Now other settings are refused before any work unless overwrite=True (--overwrite), a folder
    holding files the batch did not write for its concept is never written, and the user's notes survive."""
    out = tmp_path / "runs"
    legacy = out / "a-dog"  # `conceptor decompose "a dog" --out runs/a-dog`: where an older batch put "a dog"
    legacy.mkdir(parents=True)
    (legacy / "decomposition.json").write_text('{"the user": "result"}')
    theirs = _folder(out, "a cat")  # the user's own concept.png, where this batch would put "a cat"
    theirs.mkdir()
    (theirs / "concept.png").write_bytes(b"the user's picture")
    before = _snapshot(out)
    with pytest.raises(OutputError, match="a-cat-.* did not write for that concept.*never overwrites them"):
        batch.decompose_many(tiny_pipe, ["a dog", "a cat"], out, clip=tiny_clip, verbose=False, **FAST_KW)
    assert _snapshot(out) == before
    shutil.rmtree(theirs)
    df = batch.decompose_many(tiny_pipe, ["a dog"], out, clip=tiny_clip, verbose=False, **FAST_KW)
    folder = out / df.loc[0, "slug"]
    assert df.loc[0, "status"] == "done" and folder != legacy
    assert (legacy / "decomposition.json").read_text() == '{"the user": "result"}'
    (folder / "notes.txt").write_text("my notes")
    done = _snapshot(out)
    with pytest.raises(OutputError, match=r"finished results of other settings for 1 concept\(s\) \('a dog'\): pass "
                                          "--overwrite"):
        batch.decompose_many(tiny_pipe, ["a dog"], out, clip=tiny_clip, verbose=False, **{**FAST_KW, "steps": 3})
    assert _snapshot(out) == done
    df = batch.decompose_many(tiny_pipe, ["a dog"], out, clip=tiny_clip, verbose=False, overwrite=True,
                              **{**FAST_KW, "steps": 3})
    assert df.loc[0, "status"] == "done" and batch.load_decompositions(out)["a dog"].settings.steps == 3
    assert (folder / "notes.txt").read_text() == "my notes"
    assert (legacy / "decomposition.json").read_text() == '{"the user": "result"}'


def test_cli_batch_with_other_settings_refuses_before_loading_a_model(shared_cache, tmp_path, capsys, monkeypatch):
    """Item 3: `conceptor batch --steps 3` after `--steps 2` replaced the results; now exit 2 naming --overwrite."""
    import conceptor_nb.cli as cli
    from conceptor_nb import Decomposition
    from conceptor_nb.config import TINY as TINY_SETTINGS

    out, concepts = tmp_path / "runs", tmp_path / "concepts.txt"
    concepts.write_text("a dog\n")
    folder = _folder(out, "a dog")  # a finished result of --steps 2, as a batch writes it
    Decomposition("a dog", ["red"], [736], [0.5], 1, 0.5, model="tiny",
                  settings=TINY_SETTINGS.replace(**FAST_KW)).save(folder)
    for name in ("concept.png", "reconstruction.png"):
        (folder / name).write_bytes(b"png")
    (folder / "batch.json").write_text(json.dumps({"concept": "a dog", "status": "done"}))
    monkeypatch.setattr(cli, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded before the check"))
    before = _snapshot(out)
    flags = [f for k, v in {**FAST_KW, "steps": 3}.items() for f in (f"--{k.replace('_', '-')}", str(v))]
    assert cli.main(["batch", str(concepts), "--out", str(out), "--model", "tiny", "--quiet", *flags]) == 2
    err = capsys.readouterr().err
    assert "finished results of other settings for 1 concept(s) ('a dog')" in err and "--overwrite" in err
    assert "Traceback" not in err and _snapshot(out) == before


def test_one_concepts_failure_never_stops_the_others_nor_the_summary(tiny_pipe, tiny_clip, shared_cache, tmp_path):
    """Item 5: a name the file system refuses (File name too long) aborted the whole batch with no summary."""
    out = tmp_path / "runs"
    jobs = [batch.Job("a dog", slug="x" * 300), "a " + "long " * 75 + "cat", "a car"]
    df = batch.decompose_many(tiny_pipe, jobs, out, clip=tiny_clip, verbose=False, **FAST_KW)
    assert list(df["status"]) == ["failed", "failed", "done"]
    assert "File name too long" in df.loc[0, "error"] and "context" in df.loc[1, "error"]
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["failed", "failed", "done"] and "File name too long" in rows[0]["error"]


def test_a_full_disk_loses_no_result_and_leaves_nothing_that_blocks_a_rerun(tiny_pipe, tiny_clip, shared_cache, tmp_path,
                                                                            monkeypatch, capsys):
    """Item 7: with the disk full after the fit ("could not write ..., nor .../rescued/...; the result is lost"),
    the decomposition is printed (tokens, ids, coefficients) as the last resort, no partial run file is left, and a
    re-run completes."""
    import conceptor_nb.io as io
    from conceptor_nb import Decomposition

    real = io.atomic_write

    def full(path, data):  # the first image fits, nothing after it does (here or in the cache's rescued/)
        if Path(path).name in ("reconstruction.png", "coefficients.safetensors", "decomposition.json"):
            raise OSError(28, "No space left on device")
        return real(path, data)

    out = tmp_path / "runs"
    monkeypatch.setattr(io, "atomic_write", full)
    df = batch.decompose_many(tiny_pipe, ["a dog"], out, clip=tiny_clip, verbose=False, **FAST_KW)
    assert df.loc[0, "status"] == "failed" and "printed above as JSON" in df.loc[0, "error"]
    printed = json.loads(next(ln for ln in capsys.readouterr().err.splitlines() if ln.startswith('{"concept"')))
    folder = out / df.loc[0, "slug"]
    assert not [f for f in io.RUN_FILES if (folder / f).exists()]  # concept.png was removed again
    assert not list(shared_cache.glob("rescued/*/*"))
    monkeypatch.setattr(io, "atomic_write", real)
    df = batch.decompose_many(tiny_pipe, ["a dog"], out, clip=tiny_clip, verbose=False, **FAST_KW)
    assert df.loc[0, "status"] == "done"
    dec = Decomposition.load(folder)
    assert printed["tokens"] == dec.tokens and printed["coefficients"] == pytest.approx(dec.coefficients, rel=1e-6)


def test_batch_summary_has_the_faithfulness_columns_when_asked(tiny_pipe, tiny_clip, cache, tmp_path):
    plain = batch.decompose_many(tiny_pipe, ["a dog"], tmp_path / "a", clip=tiny_clip, verbose=False, **TINY_KW)
    assert plain[["clip_similarity", "clip_ceiling", "clip_floor"]].isna().all().all()
    df = batch.decompose_many(tiny_pipe, ["a dog"], tmp_path / "b", clip=tiny_clip, verbose=False, faithfulness=2,
                              **TINY_KW)
    row = df.iloc[0]
    dec = conceptor_nb.Decomposition.load(tmp_path / "b" / row["slug"])
    assert [f["similarity"] for f in dec.history["faithfulness"]] == [row["clip_similarity"], row["clip_ceiling"],
                                                                      row["clip_floor"]]
    assert all(-1 <= row[c] <= 1 for c in ("clip_similarity", "clip_ceiling", "clip_floor"))
