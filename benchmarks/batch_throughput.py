"""Batch throughput and the cost of validation, on this machine's CPU (a script that prints numbers).

Part 1, UNet evaluations per concept (one image through the UNet once; see
``conceptor_nb.batch.unet_evaluations``):
  * counted for the authors' settings (the ``sd`` profile) with their validation and with the cheap one;
  * measured on the toy world: the toy profile's images and fit with the authors' validation protocol
    (every 50 steps, 20 images, 50 DPM steps; "full") against the cheap validation (10 DPM steps, 8
    images, stop after ``val_patience`` rounds without a better score; "cheap"), and the top-10
    agreement of the two (|top-10 full & top-10 cheap| / 10).
Part 2, throughput: ``conceptor batch`` over a few toy concepts at ``ci`` sizes, one process against
two (``accelerate launch --multi_gpu --num_processes 2 ... --device cpu``: two gloo CPU ranks), each
with a fresh image cache; concepts per hour = concepts / wall time (start-up and model load included).

    python benchmarks/batch_throughput.py [--agreement-concepts fruit sun leaf] [--throughput-concepts ...]

Writes benchmarks/batch_throughput.json and .md next to this file.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

# the authors' validation and the cheap one, as Settings overrides
AUTHORS_VAL = dict(val_every=50, n_val=20, val_steps=50, val_sampler="dpm", val_patience=0)
CHEAP_VAL = dict(val_every=50, n_val=8, val_steps=10, val_sampler="dpm", val_patience=2)
CHEAP_VAL_SD = dict(val_every=50, n_val=10, val_steps=10, val_sampler="dpm", val_patience=3)


def counted(settings, rounds: int, steps: int | None = None) -> dict:
    from conceptor_nb.batch import unet_evaluations

    s = settings.to_dict()
    steps = s["steps"] if steps is None else steps
    return unet_evaluations(s, {"loss": [0] * steps, "validation": [0] * rounds})


def part_counts() -> dict:
    from conceptor_nb.config import SD

    full = counted(SD.replace(**AUTHORS_VAL), rounds=SD.steps // 50)
    cheap = SD.replace(**CHEAP_VAL_SD)
    worst = counted(cheap, rounds=SD.steps // 50)  # never stops early
    return {"authors_full": full, "authors_cheap_no_early_stop": worst, "cheap_settings": CHEAP_VAL_SD,
            "cheap_over_full_at_most": worst["unet_total"] / full["unet_total"]}


def part_agreement(concepts) -> dict:
    import torch

    import conceptor_nb as cn
    from conceptor_nb.batch import unet_evaluations
    from conceptor_nb.config import TOY

    torch.set_num_threads(1)
    pipe, clip = cn.load_pipeline("toy", device="cpu"), cn.load_clip("toy", device="cpu")
    rows = []
    for c in concepts:
        row = {"concept": c}
        for name, val in (("full", AUTHORS_VAL), ("cheap", CHEAP_VAL)):
            t0 = time.perf_counter()
            dec = cn.decompose(pipe, f"a {c}", clip=clip, settings=TOY.replace(**val), verbose=False)
            row[name] = {**unet_evaluations(dec.settings, dec.history), "wall_s": time.perf_counter() - t0,
                         "fit_and_validation_s": dec.history["timings"]["fit_s"],
                         "best_step": dec.history["best_step"], "stopped_at": dec.history.get("stopped_at"),
                         "top10": dec.tokens[:10]}
            print(c, name, {k: v for k, v in row[name].items() if k != "top10"}, dec.tokens[:5], flush=True)
        row["top10_agreement"] = len(set(row["full"]["top10"]) & set(row["cheap"]["top10"])) / 10
        row["unet_ratio"] = row["cheap"]["unet_total"] / row["full"]["unet_total"]
        print(c, "agreement", row["top10_agreement"], "UNet ratio", round(row["unet_ratio"], 3), flush=True)
        rows.append(row)
    return {"full_settings": AUTHORS_VAL, "cheap_settings": CHEAP_VAL, "base": "toy profile", "concepts": rows,
            "mean_agreement": sum(r["top10_agreement"] for r in rows) / len(rows),
            "mean_unet_ratio": sum(r["unet_ratio"] for r in rows) / len(rows)}


def part_throughput(concepts) -> dict:
    from conceptor_nb.batch import load_runs

    work = Path(tempfile.mkdtemp(prefix="conceptor_throughput_"))
    (work / "concepts.txt").write_text("".join(f"a {c}\n" for c in concepts))
    base = [str(work / "concepts.txt"), "--quiet"]
    runs = {
        "1 process": [sys.executable, "-m", "conceptor_nb", "batch", *base],
        "2 processes": ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29531",
                        "-m", "conceptor_nb", "batch", *base, "--device", "cpu"],
    }
    res = {}
    for name, cmd in runs.items():
        out = work / name.replace(" ", "_")
        env = dict(os.environ, PYTHONPATH=str(ROOT), CONCEPTOR_PROFILE="ci", CONCEPTOR_CACHE=str(out / "cache"),
                   HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
        t0 = time.perf_counter()
        r = subprocess.run(cmd + ["--out", str(out / "runs")], env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{r.stderr[-3000:]}")
        df = load_runs(out / "runs")
        res[name] = {"concepts": len(df), "done": int((df["status"] == "done").sum()), "wall_s": wall,
                     "concepts_per_hour": 3600 * len(df) / wall,
                     "mean_concept_wall_s": float(df["wall_s"].mean()),
                     "ranks": sorted(int(x) for x in df["rank"])}
        print(name, res[name], flush=True)
    return {"profile": "ci", "concepts": list(concepts), "runs": res,
            "speedup": res["2 processes"]["concepts_per_hour"] / res["1 process"]["concepts_per_hour"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agreement-concepts", nargs="*", default=["fruit", "sun", "leaf"])
    ap.add_argument("--throughput-concepts", nargs="*", default=["fruit", "bass", "sun", "gem"])
    args = ap.parse_args()
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "omp_threads": os.environ.get("OMP_NUM_THREADS")},
              "counts": part_counts()}
    print(json.dumps(result["counts"], indent=1), flush=True)
    if args.agreement_concepts:
        result["toy_validation"] = part_agreement(args.agreement_concepts)
    if args.throughput_concepts:
        result["throughput"] = part_throughput(args.throughput_concepts)
    (HERE / "batch_throughput.json").write_text(json.dumps(result, indent=1))
    (HERE / "batch_throughput.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r) -> str:
    c = r["counts"]
    f, w = c["authors_full"], c["authors_cheap_no_early_stop"]
    lines = ["# Batch throughput and validation cost", "",
             f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores (shared with other jobs while measured), "
             f"OMP_NUM_THREADS={r['machine']['omp_threads']}. Produced by `python benchmarks/batch_throughput.py`.", "",
             "## UNet evaluations per concept, the authors' settings (counted)", "",
             "One evaluation = one image through the UNet once (guidance doubles sampling); the fit counts its "
             "forward passes (each also has a backward).", "",
             "| | generation | fit | validation | total |", "| --- | ---: | ---: | ---: | ---: |",
             f"| authors' validation (10 rounds x 20 images x 50 steps x 2) | {f['unet_generation']:,} | {f['unet_fit']:,} | {f['unet_validation']:,} | {f['unet_total']:,} |",
             f"| cheap: {CHEAP_VAL_SD}, never stopping early | {w['unet_generation']:,} | {w['unet_fit']:,} | {w['unet_validation']:,} | {w['unet_total']:,} |",
             "", f"Cheap / full at most {c['cheap_over_full_at_most']:.2f} (less when it stops early).", ""]
    if "toy_validation" in r:
        t = r["toy_validation"]
        lines += ["## Full against cheap validation on the toy world (measured)", "",
                  f"Base: the toy profile (48 training images, 20 generation steps, 300 fit steps). Full: {t['full_settings']}. "
                  f"Cheap: {t['cheap_settings']}.", "",
                  "| concept | UNet evals full | UNet evals cheap | ratio | best step full / cheap | stopped at | top-10 agreement |",
                  "| --- | ---: | ---: | ---: | --- | --- | ---: |"]
        for row in t["concepts"]:
            lines.append(f"| {row['concept']} | {row['full']['unet_total']:,} | {row['cheap']['unet_total']:,} | "
                         f"{row['unet_ratio']:.2f} | {row['full']['best_step']} / {row['cheap']['best_step']} | "
                         f"{row['cheap']['stopped_at']} | {row['top10_agreement']:.1f} |")
        lines += ["", f"Mean ratio {t['mean_unet_ratio']:.2f}, mean top-10 agreement {t['mean_agreement']:.2f}.", ""]
    if "throughput" in r:
        t = r["throughput"]
        lines += ["## Throughput (toy world, ci sizes)", "", f"Concepts: {', '.join(t['concepts'])}.", "",
                  "| | wall s | concepts / hour | mean s per concept (inside the rank) | ranks |", "| --- | ---: | ---: | ---: | --- |"]
        for name, x in t["runs"].items():
            lines.append(f"| {name} | {x['wall_s']:.0f} | {x['concepts_per_hour']:.0f} | {x['mean_concept_wall_s']:.1f} | {x['ranks']} |")
        lines += ["", f"Speed-up of 2 processes: {t['speedup']:.2f}x.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
