"""The speed benchmark runs on the tiny pipeline and reports the expected fields (no timing assertions).

One torch thread per measurement: with two threads, a busy machine (another
training job) makes every small op wait on a descheduled OpenMP thread.
"""
import importlib
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load_script(path: Path):
    """A script beside the package (not part of it) as a module, without touching sys.path."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


bench = _load_script(ROOT / "benchmarks" / "bench.py")

pytestmark = pytest.mark.slow  # minutes of CPU: run with -m slow

ROW_FIELDS = {"variant", "ms_per_step", "ms_steps", "x_floor", "x_authors", "peak_mib", "peak_delta_mib",
              "memory_method", "method"}


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _check_model(result: dict, steps: int) -> None:
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == set(bench.VARIANTS)
    for row in rows.values():
        assert ROW_FIELDS <= set(row)
        assert _positive(row["ms_per_step"]) and len(row["ms_steps"]) == steps
        assert all(_positive(t) for t in row["ms_steps"])
        assert _positive(row["x_floor"]) and _positive(row["x_authors"]) and _positive(row["peak_mib"])
    assert rows["floor"]["x_floor"] == pytest.approx(1.0)
    assert rows["authors"]["x_authors"] == pytest.approx(1.0)
    assert rows["ours"]["method"].startswith("conceptor.fit")  # the real fit was timed, not the replica
    assert set(result["targets"]) >= {"ours_within_1.15x_floor", "peak_not_above_authors"}
    assert "ours_2.5x_faster_than_authors" not in result["targets"]  # set for SD shapes only


def test_bench_tiny_in_process(tmp_path, tiny_pipe):
    out_file = tmp_path / "bench.json"
    logs = []
    out = bench.run(["tiny"], device="cpu", json_path=out_file, log=logs.append, steps=2, warmup=1, isolate=False,
                    threads=1, e2e="on")
    result = out["models"]["tiny"]
    _check_model(result, steps=2)
    paired = result["paired"]  # the three steps interleaved in one process
    assert set(paired["rows"]) == set(bench.VARIANTS)
    assert all(_positive(paired["rows"][v]["ms_per_step"]) for v in bench.VARIANTS)
    assert _positive(paired["ours_over_floor"]) and _positive(paired["authors_over_ours"])
    e2e = result["e2e"]
    for name in ("cold", "warm_vocab"):
        for key in ("total_s", "images_s", "dictionary_s", "fit_s", "step_ms"):
            assert _positive(e2e[name][key]), (name, key)
    assert json.loads(out_file.read_text())["models"]["tiny"]["rows"][0]["variant"] == "floor"
    table = bench.format_table(out)
    assert "| floor |" in table and "| ours |" in table and "| authors |" in table and "cold" in table
    # the authors' loop writes into the embedding table; the pipeline is put back
    assert not any(p.requires_grad for p in tiny_pipe.text_encoder.parameters())


def test_bench_cli_subprocess(tmp_path):
    out_file = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--model", "tiny", "--steps", "2", "--warmup", "1",
         "--e2e", "off", "--paired", "off", "--threads", "1", "--json", str(out_file), "--markdown", str(md)],
        cwd=root, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(out_file.read_text())
    assert out["environment"]["torch"] and out["device"] == "cpu" and out["dtype"] is None  # per model
    result = out["models"]["tiny"]
    assert result["dtype"] == "fp32"  # the tiny profile does not autocast
    assert all(_positive(r["rss_peak_mib"]) and _positive(r["tensors_at_step_start_mib"]) for r in result["rows"])
    assert result["isolated"] is True and result["e2e"] is None and "paired" not in result
    _check_model(result, steps=2)
    assert "| ours |" in proc.stdout and md.read_text().startswith("device cpu")


def test_ours_in_bf16_times_the_fit_with_autocast(tiny_pipe):
    torch.set_num_threads(1)
    out = bench.run_variant("tiny", "ours", device="cpu", dtype="bf16", steps=1, warmup=1, batch=2)
    assert out["method"].startswith("conceptor.fit")  # the fit itself ran in bf16, not the replica
    assert _positive(out["peak_mib"]) and out["peak_delta_mib"] > 0


def test_live_tensor_count_sees_a_new_tensor():
    before = bench.live_tensor_mib(torch.device("cpu"))
    big = torch.ones(16, 2**20)  # 64 MiB
    after = bench.live_tensor_mib(torch.device("cpu"))
    assert after - before == pytest.approx(64, abs=1)
    del big


def test_profiled_step_peak_sees_a_temporary():
    mem = bench.Memory(torch.device("cpu"))
    mem.reset()
    kept = []

    def step():
        tmp = torch.ones(8, 2**20) * 2  # 32 MiB, twice at once (ones, then the product), then freed
        kept.append(tmp.sum())

    mem.profile_step(step)
    assert 64 <= mem.step_peak < 70
    rep = mem.report()
    assert rep["peak_mib"] == pytest.approx(rep["tensors_at_step_start_mib"] + rep["peak_delta_mib"])


def test_bench_dtype_follows_the_profile(monkeypatch):
    dmod = importlib.import_module("conceptor_nb.method.vocab")  # the package exports the function

    monkeypatch.setattr(dmod, "cpu_has_native_bf16", lambda: True)
    assert bench.fit_dtype("sd-shapes", "cpu") == "bf16" and bench.fit_dtype("toy", "cpu") == "fp32"
    monkeypatch.setattr(dmod, "cpu_has_native_bf16", lambda: False)
    assert bench.fit_dtype("sd-shapes", "cpu") == "fp32"


def test_toy_skipped_with_a_note_when_absent(monkeypatch):
    monkeypatch.setattr(bench, "toy_available", lambda: False)
    logs = []
    out = bench.run(["toy"], device="cpu", log=logs.append)
    assert "toy" in out["skipped"] and out["models"] == {} and any("skipped" in m for m in logs)
