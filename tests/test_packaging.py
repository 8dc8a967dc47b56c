"""pyproject.toml, environment.yml, README and .ci/run tell the same story."""
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_reqs():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = meta["dependencies"] + meta["optional-dependencies"]["dev"]
    return {Requirement(r).name.lower(): Requirement(r) for r in reqs}


def _environment_reqs():
    text = (ROOT / "environment.yml").read_text()
    assert re.search(r"^\s*-\s*python=3\.11\s*$", text, re.M), "environment.yml must pin python 3.11"
    pip = text.split("- pip:", 1)[1]
    lines = [ln.strip()[2:].strip() for ln in pip.splitlines() if ln.strip().startswith("- ")]
    return {Requirement(r).name.lower(): Requirement(r) for r in lines if not r.startswith("-e")}


def test_environment_yml_agrees_with_pyproject():
    py, env = _pyproject_reqs(), _environment_reqs()
    assert set(py) == set(env)
    for name, req in py.items():
        if name == "torch":  # environment.yml pins the tested CPU build, inside pyproject's range
            (pin,) = env[name].specifier
            assert pin.operator == "==" and req.specifier.contains(pin.version)
        else:
            assert env[name].specifier == req.specifier, name


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S)


def test_ci_runs_the_readme_test_command():
    blocks = _readme_commands()
    test_cmd = [ln for b in blocks for ln in b.splitlines() if "pytest" in ln][0].strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci


def test_readme_installs_the_tested_torch():
    first = _readme_commands()[0]
    assert "torch==2.13.0" in first and "conceptor decompose" in first


@pytest.mark.slow
def test_wheel_ships_the_toy_world_and_works_outside_the_checkout(tmp_path):
    """A non-editable install (a built wheel) carries the embedded default: toy world + tokenizer."""
    import subprocess
    import sys
    import zipfile

    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(ROOT)], check=True, capture_output=True, text=True)
    (wheel,) = dist.glob("conceptor_nb-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for part in ("data/toyworld/pipeline/unet/diffusion_pytorch_model.safetensors",
                 "data/toyworld/pipeline/text_encoder/model.safetensors", "data/toyworld/clip/model.safetensors",
                 "data/toyworld/clip/preprocessor_config.json", "data/toyworld/spec.json",
                 "data/clip_tokenizer/vocab.json", "data/clip_tokenizer/merges.txt"):
        assert f"conceptor_nb/{part}" in names, part
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, text=True)
    code = ("import conceptor_nb, sys; from conceptor_nb import load_pipeline, load_clip; "
            "assert conceptor_nb.__file__.startswith(sys.argv[1]), conceptor_nb.__file__; "
            "p = load_pipeline('toy', device='cpu'); c = load_clip('toy', device='cpu'); "
            "print(p.tokenizer('a photo of a fruit').input_ids)")
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    out = subprocess.run([sys.executable, "-c", code, str(site)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "[49406, 320, 1125, 539, 320, 5190, 49407]" in out.stdout
