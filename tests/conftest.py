import contextlib
import shutil
from types import SimpleNamespace

import pytest
import torch

import fakehub  # tests/ is on sys.path: pytest puts each conftest's folder there


@pytest.fixture(scope="session")
def tiny_pipe():
    from conceptor_nb import load_pipeline

    return load_pipeline("tiny", device="cpu")


@pytest.fixture(scope="session")
def tiny_clip():
    from conceptor_nb import load_clip

    return load_clip("tiny", device="cpu")


@pytest.fixture(scope="session")
def _tiny_vocab(tmp_path_factory, tiny_clip):
    """The tiny CLIP's vocabulary features (one template, float32: what the tiny profile uses), computed once."""
    from conceptor_nb.config import TEMPLATE
    from conceptor_nb.method.vocab import vocab_text_features

    folder = tmp_path_factory.mktemp("vocab-cache")
    vocab_text_features(tiny_clip, (TEMPLATE,), cache_dir=folder, verbose=False)
    return folder / "vocab"


@pytest.fixture
def cache(tmp_path, monkeypatch, _tiny_vocab):
    """A private cache folder for the test, holding a copy of the tiny CLIP's vocabulary features (about 17 s
    each to compute on this CPU)."""
    folder = tmp_path / "cache"
    shutil.copytree(_tiny_vocab, folder / "vocab")
    monkeypatch.setenv("CONCEPTOR_CACHE", str(folder))
    return folder


@pytest.fixture
def one_thread():
    """Torch on one thread for the test (small models on a busy 2-core machine: fastest); restored after it by
    ``_seed_and_threads``."""
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Every test starts seeded, and torch's thread count is restored after it (some tests change it)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _fake_hub(home, **build_kw):
    """A fake HF_HOME (tests/fakehub.py: real configs, shrunk random weights) at ``home``.

    ``hub.get(*repos)`` builds the repos into it on first use and returns the folder; ``with
    hub.env(*repos):`` also points HF_HOME at it (offline) inside the block, for session-scoped fixtures.
    """
    built = set()

    def get(*repos):
        for repo in repos:
            if repo not in built:
                fakehub.build(home, repo, **build_kw)
                built.add(repo)
        return home

    @contextlib.contextmanager
    def env(*repos):
        with pytest.MonkeyPatch.context() as mp:
            _use_home(mp, get(*repos))
            yield home

    return SimpleNamespace(home=home, get=get, env=env)


@pytest.fixture(scope="session")
def hub(tmp_path_factory):
    """The session's fake hub, the repos' real shapes but for shrunk widths and depths (see _fake_hub)."""
    return _fake_hub(tmp_path_factory.mktemp("hf_home"))


@pytest.fixture(scope="session")
def small_hub(tmp_path_factory):
    """A fake hub whose pipelines draw 128 px images (16 px latents), fp32 files only: behaviour tests."""
    return _fake_hub(tmp_path_factory.mktemp("hf_home_small"), sample_size=16, variants=("fp32",))


def _use_home(mp, home):
    mp.setenv("HF_HOME", str(home))
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.delenv("HF_HUB_CACHE", raising=False)


def _offline(hub, monkeypatch):
    def use(*repos):
        home = hub.get(*repos)
        _use_home(monkeypatch, home)
        return home

    return use


@pytest.fixture
def offline_home(hub, monkeypatch):
    """``offline_home(*repos)``: builds the repos into the session's fake hub and points HF_HOME at it
    (offline) for this test; returns the folder."""
    return _offline(hub, monkeypatch)


@pytest.fixture
def small_offline_home(small_hub, monkeypatch):
    """``offline_home`` over ``small_hub`` (128 px images): for behaviour that does not depend on the image size."""
    return _offline(small_hub, monkeypatch)


@pytest.fixture
def fake_hub(offline_home):
    """HF_HOME pointing at a fake hub cache holding SD 1.5, SD 2.1 (v), SDXL and CLIP ViT-B/32 (shrunk)."""
    return offline_home(fakehub.SD15, fakehub.SD21, fakehub.SDXL, fakehub.CLIP_B32)


# -- the backends of the contract tests (tests/test_contract.py): each built once per session ----------------
# sizes that run in seconds per backend on a CPU; 4 fit steps with a validation (and a checkpoint) at step 2
CONTRACT_SIZES = dict(n_train=2, n_val=1, gen_steps=1, dict_size=12, n_tokens=3, steps=4, batch_size=1,
                      val_every=2, val_steps=1)
# name: (model, CLIP, profile, concept, image size in pixels); the fake SD pipelines come from small_hub (128 px)
BACKENDS = {
    "tiny": ("tiny", "tiny", "tiny", "a dog", 32),
    "sd15": (fakehub.SD15, fakehub.CLIP_B32, "sd", "a president", 128),
    "sd21v": (fakehub.SD21, fakehub.CLIP_B32, "sd", "a president", 128),
    "sdxl": (fakehub.SDXL, fakehub.CLIP_B32, "sd", "a president", 128),
    "toy": ("toy", "toy", "ci", "a fruit", 32),
}


@pytest.fixture(scope="session", params=list(BACKENDS))
def backend(request, small_hub):
    """One backend (tiny, fake SD 1.5, fake SD 2.1 v-prediction, fake SDXL, the toy world) with its CLIP and
    the contract's settings (its profile's, at CONTRACT_SIZES; one CLIP template)."""
    import conceptor_nb as cn

    model, clip, prof, concept, size = BACKENDS[request.param]
    repos = [r for r in (model, clip) if r in fakehub.ALL]
    with small_hub.env(*repos):
        pipe, clip = cn.load_pipeline(model, device="cpu"), cn.load_clip(clip, device="cpu")
    s = cn.settings(prof)
    s = s.replace(**CONTRACT_SIZES, clip_templates=s.clip_templates[:1])
    return SimpleNamespace(name=request.param, model=model, pipe=pipe, clip=clip, settings=s, concept=concept,
                           word=concept.split()[-1], size=size)
