"""The committed figures are what the code draws today (issue 26). Notebook 01 saves the fruit decomposition's top
tokens beside its figure; ``scripts/make_figures.py`` regenerates figures/ whenever the method or the toy world
changes, and this test fails when that was forgotten."""
import json
from pathlib import Path

import golden

FIGURES = Path(__file__).resolve().parents[1] / "figures"


def test_every_committed_figure_is_listed_in_the_figures_readme():
    listed = (FIGURES / "README.md").read_text()
    missing = [p.name for p in sorted(FIGURES.glob("*.png")) if f"`{p.name}`" not in listed]
    assert not missing, f"figures/README.md does not list {missing}"


def test_the_committed_fruit_figure_shows_the_recorded_toy_decomposition():
    """figures/ == golden.json's toy case here (each machine kind's); test_golden's slow case proves golden.json == the code, bit for
    bit (same concept, seed and toy settings; its n_test=0 only skips the significance test, which runs after
    the fit). Together: the figure shows what the code gives, without a third toy fit in CI."""
    meta = json.loads((FIGURES / "01_fruit_decomposition.json").read_text())
    assert (meta["profile"], meta["concept"], meta["seed"]) == ("toy", "a fruit", 0), meta
    for toy in golden.expected("toy")[0]:  # this machine kind's recorded toy case, else every machine's
        assert toy["concept"] == meta["concept"]
        ranked = [t for _, t in sorted(zip(toy["coefficients"], toy["tokens"]), key=lambda p: -p[0])]
        assert ranked[:5] == meta["top"], (
            f"figures/ is stale: it shows {meta['top']}, the code gives {ranked[:5]}; run python scripts/make_figures.py")
