"""pyproject.toml, environment.yml, README and .ci/run tell the same story."""
import re
import tomllib
from pathlib import Path

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
