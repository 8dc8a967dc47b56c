import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pipe():
    from conceptor_nb import load_pipeline

    return load_pipeline("tiny", device="cpu")


@pytest.fixture(scope="session")
def tiny_clip():
    from conceptor_nb import load_clip

    return load_clip("tiny", device="cpu")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private cache folder for the test."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("CONCEPTOR_CACHE", str(folder))
    return folder


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Every test starts seeded, and torch's thread count is restored after it (some tests change it)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
