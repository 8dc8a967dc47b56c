"""What error bars and the significance test cost: ``python benchmarks/evidence_cost.py``.

1. On the toy world, in one process and one thread count: one decomposition of "a fruit" without the test,
   with it (the toy profile's default), and with ``fits=3``; wall seconds and UNet evaluations (one image
   through the UNet once) from each result's ``history["unet_evals"]``. The concept images are generated
   once, before the timed runs (every run reads them from the cache).
2. Under the ``sd`` settings (no GPU needed: counted, not run), the UNet evaluations of the authors' one fit
   against three fits on thirds of the images with early stopping (``val_patience``), for the rounds after
   which validation stops.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

import conceptor_nb as cn
from conceptor_nb.config import settings
from conceptor_nb.method.decompose import unet_evaluations

CHEAP_VAL_SD = dict(val_every=50, n_val=10, val_steps=10, val_sampler="dpm", val_patience=3)  # batch_throughput.py's


def toy(threads: int) -> None:
    torch.set_num_threads(threads)
    s = cn.setup("toy")
    base = s.settings
    with tempfile.TemporaryDirectory() as cache:
        cn.decompose(s.pipe, "a fruit", clip=s.clip, settings=base.replace(n_test=0), cache_dir=cache, verbose=False)
        print(f"toy world, 'a fruit', {threads} thread(s), images cached; settings: the toy profile's")
        print("| run | seconds | UNet evaluations (fit + validation + test) |\n| --- | --- | --- |")
        for name, kw in (("one fit, no test", dict(n_test=0)), ("one fit + test (default)", {}),
                         ("fits=3 + test", dict(fits=3))):
            t = time.perf_counter()
            dec = cn.decompose(s.pipe, "a fruit", clip=s.clip, settings=base.replace(**kw), cache_dir=cache, verbose=False)
            u = dec.history["unet_evals"]
            print(f"| {name} | {time.perf_counter() - t:.1f} | {u['fit'] + u['validation'] + u['test']:,} "
                  f"({u['fit']:,} + {u['validation']:,} + {u['test']:,}) |")


def sd_counts() -> None:
    sd = settings("sd")

    def count(s, steps, rounds):
        per = {"loss": [0.0] * steps, "validation": [{}] * rounds}
        return unet_evaluations(s, {"fits": [per] * s.fits} if s.fits > 1 else per, s.n_tokens)

    authors = count(sd.replace(n_test=0), 500, 10)
    print(f"\nsd settings, counted: the authors' one fit, validation every 50 steps: {authors['total']:,} UNet evaluations "
          f"({authors})")
    k3 = sd.replace(fits=3, **CHEAP_VAL_SD)
    print(f"fits=3, with the batch benchmark's cheap validation {CHEAP_VAL_SD} and the test (8 held-out images x 4 "
          "draws, top 50):")
    print("| validation stops after round | UNet evaluations | of the authors' |\n| --- | --- | --- |")
    for rounds in (4, 6, 8, 10):
        c = count(k3, 50 * rounds, rounds)
        print(f"| {rounds} (step {50 * rounds}) | {c['total']:,} | {c['total'] / authors['total']:.2f} |")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--counts-only", action="store_true", help="only the sd counts (no toy runs)")
    a = p.parse_args()
    if not a.counts_only:
        toy(a.threads)
    sd_counts()
