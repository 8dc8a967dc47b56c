"""Run a batch: ``decompose_many`` (one process, or a share per rank under ``accelerate launch``), its summary.

Every concept goes to ``<out>/<slug>/`` as ``conceptor decompose`` writes it, plus ``batch.json`` (status, timings,
settings hash, who ran it). A complete folder with the same settings is skipped: a re-run continues a killed batch.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
import traceback
from collections import Counter
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from ..checks import validate_settings
from ..method.decomposition import Decomposition
from ..method.decompose import decompose, run_settings
from ..config import Settings
from ..io import CHECKPOINT_DIR, atomic_write, dumps, read_json, write_run
from ..models import clip_for
from .jobs import Claim, Job, as_jobs, claim_state, done_hash, settings_hash

TOP_K, LOG = 10, "batch-log.jsonl"
SUMMARY_FIELDS = ("concept", "slug", "status", "error", "settings_hash", "model", "seed", "n_tokens", "best_step",
                  "best_score", "stopped_at", "images_s", "dictionary_s", "fit_s", "validation_s", "write_s", "wall_s",
                  "unet_generation", "unet_fit", "unet_validation", "unet_total", "rank", "host", "pid", "finished")


def log_event(out, event: str, slug: str, rank: int = 0) -> None:
    """Append one line to ``out/batch-log.jsonl``: who started and finished what, when."""
    with open(Path(out) / LOG, "a") as f:  # one short write in append mode: lines of processes do not interleave
        f.write(json.dumps({"time": time.time(), "event": event, "slug": slug, "rank": rank,
                            "host": socket.gethostname(), "pid": os.getpid()}) + "\n")


def read_log(out) -> list[dict]:
    f = Path(out) / LOG
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.exists() else []


def unet_evaluations(settings, history: dict) -> dict:
    """UNet evaluations (one image through the UNet once) of a fresh run, by stage: generation (training and
    validation images), fit (``batch_size`` per step taken), validation (``n_val`` renders per round)."""
    s = settings.to_dict() if isinstance(settings, Settings) else settings
    cfg = 2 if s["guidance"] > 1 else 1
    validating = s["val_every"] > 0 and s["n_val"] > 0
    gen = (s["n_train"] + (s["n_val"] if validating else 0)) * s["gen_steps"] * cfg
    fit = len(history.get("loss", [])) * min(s["batch_size"], s["n_train"])
    val = len(history.get("validation", [])) * s["n_val"] * s["val_steps"] * cfg
    return {"unet_generation": gen, "unet_fit": fit, "unet_validation": val, "unet_total": gen + fit + val}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def run_one(pipe, job: Job, out, base: Settings, *, clip=None, rank: int = 0, recompute: bool = False,
            refresh: bool = False) -> str:
    """Decompose one concept into ``out/<slug>`` unless done; returns 'done', 'skipped', 'failed' or 'claimed'."""
    s = base.replace(**job.overrides)
    h = settings_hash(s)
    folder = Path(out) / job.slug
    if not recompute and done_hash(folder) == h:
        return "skipped"
    claim = Claim(out, job.slug, rank)
    if not claim.acquire():
        return "claimed"
    with claim:
        if not recompute and done_hash(folder) == h:  # finished by another process meanwhile
            return "skipped"
        folder.mkdir(parents=True, exist_ok=True)
        record = {"concept": job.concept, "slug": job.slug, "overrides": job.overrides, "settings_hash": h,
                  "rank": rank, "host": socket.gethostname(), "pid": os.getpid(), "started": _now()}
        log_event(out, "start", job.slug, rank)
        t0 = time.perf_counter()
        try:
            (folder / "decomposition.json").unlink(missing_ok=True)  # other settings, or recompute: not done
            dec = decompose(pipe, job.concept, clip=clip, settings=s, verbose=False, refresh=refresh,
                            checkpoint_dir=folder / CHECKPOINT_DIR)  # a killed run resumes from it
            t1 = time.perf_counter()
            dec.history["timings"]["total_s"] = t1 - t0
            write_run(dec, pipe, folder, overwrite=True)
            shutil.rmtree(folder / CHECKPOINT_DIR, ignore_errors=True)
            record.update(status="done", error="", write_s=time.perf_counter() - t1)
        except Exception as err:  # recorded; the batch goes on
            record.update(status="failed", error=f"{type(err).__name__}: {err}")
            atomic_write(folder / "error.txt", traceback.format_exc())
        record.update(wall_s=time.perf_counter() - t0, finished=_now())
        atomic_write(folder / "batch.json", dumps(record))
        log_event(out, record["status"], job.slug, rank)
        return record["status"]


def summary_row(out, job_or_slug, top: int = TOP_K) -> dict:
    """The summary row of one concept folder: status, top-k tokens and coefficients, timings, costs."""
    slug = job_or_slug.slug if isinstance(job_or_slug, Job) else str(job_or_slug)
    folder = Path(out) / slug
    try:
        rec = read_json(folder / "batch.json")
    except (OSError, ValueError):
        rec = {}
    row = {k: rec.get(k) for k in SUMMARY_FIELDS}
    row["slug"] = slug
    if isinstance(job_or_slug, Job):
        row["concept"] = job_or_slug.concept
    h = done_hash(folder)
    if h is not None:  # run_one removes decomposition.json before it starts, so a failed run leaves none
        meta = read_json(folder / "decomposition.json")
        hist, st = meta.get("history", {}), meta["settings"]
        row.update(status="done", error="", settings_hash=h, concept=meta["concept"], model=meta.get("model"),
                   seed=st.get("seed"), n_tokens=meta.get("n_tokens"), best_step=hist.get("best_step"),
                   best_score=hist.get("best_score"), stopped_at=hist.get("stopped_at"),
                   **{k: hist.get("timings", {}).get(k) for k in ("images_s", "dictionary_s", "fit_s", "validation_s")},
                   **unet_evaluations(st, hist))
        tokens, coefs = meta["tokens"], meta["coefficients"]
        for i in range(top):
            row[f"token_{i + 1}"], row[f"coef_{i + 1}"] = (tokens[i], coefs[i]) if i < len(tokens) else (None, None)
    elif rec.get("status") == "failed":
        row["status"] = "failed"
    else:
        row["status"] = "running" if claim_state(out, slug) == "live" else "pending"
    return row


def summary_rows(out) -> list[dict]:
    """The rows of every concept folder in ``out``: the summary's concepts in its order, then the others, sorted."""
    out = Path(out)
    order = [r["slug"] for r in read_json(out / "summary.json")["rows"]] if (out / "summary.json").exists() else []
    found = {p.parent.name for name in ("decomposition.json", "batch.json") for p in out.glob(f"*/{name}")}
    return [summary_row(out, s) for s in [s for s in order if s in found or (out / s).is_dir()] + sorted(found - set(order))]


def collect(out, jobs, top: int = TOP_K) -> pd.DataFrame:
    """The summary of ``jobs`` in ``out`` (nothing written)."""
    return pd.DataFrame([summary_row(out, j, top) for j in jobs])


def _csv_cell(value):
    """A text cell that a spreadsheet would run as a formula (OWASP's rule: it starts with = + - @ tab or CR)
    gets a leading ' in the CSV; the JSON keeps the exact text."""
    return "'" + value if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def write_summary(out, jobs, top: int = TOP_K) -> pd.DataFrame:
    """``out/summary.csv`` (formula-safe) and ``out/summary.json`` (exact), one row per concept; returns the
    DataFrame."""
    df = collect(out, jobs, top)
    atomic_write(Path(out) / "summary.csv", df.map(_csv_cell).to_csv(index=False, lineterminator="\r\n"))  # RFC 4180
    atomic_write(Path(out) / "summary.json", dumps({"top": top, "rows": json.loads(df.to_json(orient="records"))}))
    return df


def load_runs(out) -> pd.DataFrame:
    """A batch's summary: ``out/summary.json`` if there, else rebuilt from the concept folders."""
    if (Path(out) / "summary.json").exists():
        return pd.DataFrame(read_json(Path(out) / "summary.json")["rows"])
    if not (rows := summary_rows(out)):
        raise FileNotFoundError(f"no summary.json and no concept folders in {out}")
    return pd.DataFrame(rows)


def load_decompositions(out) -> dict:
    """``{concept: Decomposition}`` for every finished concept folder in ``out``."""
    decs = (Decomposition.load(f.parent) for f in sorted(Path(out).glob("*/decomposition.json")))
    return {d.concept: d for d in decs}


def token_matrix(decompositions: dict, k: int = 10) -> pd.DataFrame:
    """Concepts x tokens: each concept's coefficient for every token in any concept's top ``k`` (in order of
    first appearance), 0 where the token is not in that concept's dictionary."""
    tokens = list(dict.fromkeys(t for d in decompositions.values() for t, _ in d.top(k)))
    rows = [[dict(zip(d.tokens, d.coefficients)).get(t, 0.0) for t in tokens] for d in decompositions.values()]
    return pd.DataFrame(rows, index=list(decompositions), columns=tokens, dtype=float)


def decompose_many(pipe, concepts, out="runs", *, clip=None, settings: Settings | None = None, top: int = TOP_K,
                   recompute: bool = False, refresh: bool = False, verbose: bool = True, state=None,
                   wait: bool = True, **overrides) -> pd.DataFrame:
    """Decompose every concept into ``out/<slug>/``; returns the summary (also ``out/summary.csv`` and ``.json``).

    ``concepts``: a path (see :func:`~conceptor_nb.batch.read_concepts`) or a list of strings or dicts with
    per-concept overrides; every :class:`Settings` field is a keyword, as for ``decompose``. The list and the shared
    settings are checked before the CLIP is loaded; a concept with invalid settings of its own is recorded as failed.
    Finished concepts are skipped unless ``recompute``. ``state``: an accelerate state (default ``PartialState()``);
    ``wait``: for concepts of the list that other live processes hold, before writing the summary.
    """
    jobs = as_jobs(concepts)
    base = validate_settings(run_settings(pipe, settings, **overrides))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if state is None:
        from accelerate import PartialState  # optional heavy dependency

        state = PartialState()
    rank, world = state.process_index, state.num_processes
    clip = clip_for(pipe, clip)
    counts = Counter()
    with state.split_between_processes(jobs) as mine:
        bar = tqdm(mine, desc="concepts" if world == 1 else f"concepts (rank {rank})", unit="concept",
                   disable=not verbose, position=rank, dynamic_ncols=True)
        for job in bar:
            bar.set_postfix_str(job.concept)
            counts[run_one(pipe, job, out, base, clip=clip, rank=rank, recompute=recompute, refresh=refresh)] += 1
        bar.close()
    state.wait_for_everyone()
    if verbose:
        print(f"rank {rank}: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())), flush=True)
    if not state.is_main_process:
        return collect(out, jobs, top)
    while wait and any(claim_state(out, j.slug) == "live" for j in jobs):
        time.sleep(1.0)
    return write_summary(out, jobs, top)
