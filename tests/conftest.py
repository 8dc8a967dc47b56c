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


@pytest.fixture(scope="session")
def _fake_hub_home(tmp_path_factory):
    import fakehub

    home = tmp_path_factory.mktemp("hf_home")
    for repo in (fakehub.SD15, fakehub.SD21, fakehub.SDXL, fakehub.CLIP_B32):
        fakehub.build(home, repo)
    return home


@pytest.fixture
def fake_hub(_fake_hub_home, monkeypatch):
    """HF_HOME pointing at a fake hub cache holding SD 1.5, SD 2.1 (v), SDXL and CLIP ViT-B/32 (shrunk)."""
    monkeypatch.setenv("HF_HOME", str(_fake_hub_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return _fake_hub_home
