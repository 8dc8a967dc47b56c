"""The paper-reproduction script: its comparison with the reported tokens, and (GPU) the run itself."""
import importlib.util
from pathlib import Path

import pytest

import fakehub  # tests/fakehub.py; the offline_home fixture is in conftest.py
from conceptor_nb import Decomposition

_spec = importlib.util.spec_from_file_location("reproduce_paper", Path(__file__).parents[1] / "scripts" / "reproduce_paper.py")
reproduce = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reproduce)
PAPER, comparison_table, main, overlap = reproduce.PAPER, reproduce.comparison_table, reproduce.main, reproduce.overlap


def _dec(concept, tokens):
    return Decomposition(concept=concept, tokens=tokens, token_ids=list(range(len(tokens))),
                         coefficients=[1.0 / (i + 1) for i in range(len(tokens))], n_tokens=len(tokens), norm=None,
                         history={"timings": {"total_s": 120.0}})


def test_overlap_counts_reported_tokens_in_the_top_k_only():
    tokens = ["Obama", "flag", "lincoln</w>", "suit", "man", "white", "house", "tie", "desk", "podium", "trump"]
    n, found = overlap(tokens, PAPER["a president"], k=10)
    assert (n, found) == (2, ["obama", "lincoln"])  # trump is 11th
    assert overlap(tokens, PAPER["a president"], k=11)[0] == 3


def test_comparison_table_has_one_row_per_concept():
    decs = {"a snail": _dec("a snail", ["ladybug", "shell", "winding"]), "a camel": _dec("a camel", ["sand"])}
    t = comparison_table(decs)
    assert list(t["concept"]) == ["a snail", "a camel"]
    assert list(t["overlap@10"]) == [2, 0] and list(t["reported_found"]) == [1.0, 0.0]
    assert t["fit_minutes"].tolist() == [2.0, 2.0]


@pytest.mark.slow
def test_reproduce_runs_on_a_fake_cache(offline_home, tmp_path, monkeypatch):
    offline_home(fakehub.SD21_BASE, fakehub.CLIP_B32)
    monkeypatch.setenv("CONCEPTOR_CACHE", str(tmp_path / "cache"))
    rc = main(["a snail", "--out", str(tmp_path / "out"), "--device", "cpu", "--quiet", "--n-train", "2", "--n-val", "1",
               "--gen-steps", "1", "--dict-size", "12", "--n-tokens", "3", "--steps", "2", "--batch-size", "1",
               "--val-every", "2", "--val-steps", "1"])
    assert rc == 0
    assert (tmp_path / "out" / "reproduction.csv").exists() and (tmp_path / "out" / "reproduction.png").exists()
    assert Decomposition.load(tmp_path / "out" / "a_snail").concept == "a snail"


@pytest.mark.gpu
def test_reproduce_the_paper_on_a_gpu(tmp_path):
    """The authors' settings on the real SD 2.1-base (in the HF cache): president and snail; the paper's
    robustness figure is 72-80% of the top-10 surviving a change of seeds, so expect some, not all."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    _, table = reproduce.run(
        ["a president", "a snail"], out=tmp_path, device="cuda", verbose=False)
    assert table["overlap@10"].sum() >= 2
