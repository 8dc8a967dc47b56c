"""Regenerate every figure in figures/ by running the notebooks' sources on the toy world.

    python scripts/make_figures.py            # all notebooks
    python scripts/make_figures.py 01 03      # some

The percent-format .py of a notebook is plain Python, so it runs as a script.
"""
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(which: list[str]) -> int:
    env = {**os.environ, "MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1"}
    env.setdefault("CONCEPTOR_PROFILE", "toy")
    env["CONCEPTOR_FIGURES"] = str(ROOT / "figures")
    status = 0
    for nb in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py")):
        if which and not any(nb.name.startswith(w) for w in which):
            continue
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, nb.name], cwd=nb.parent, env=env)
        print(f"{nb.name}: {'ok' if rc == 0 else f'FAILED ({rc})'} in {time.perf_counter() - t0:.0f} s", flush=True)
        status |= rc
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
