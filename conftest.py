"""Loaded by every pytest run here (tests and notebooks): settings the test processes and notebook kernels share."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n N`: N workers share the cores; each worker and what it starts (subprocesses, notebook kernels)
    # gets its share of threads, set before torch is imported (torch reads it once). Without it two kernels of
    # two threads each on two cores ran a notebook cell 13x slower (113 s against 8.8 s).
    _share = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(_share)
