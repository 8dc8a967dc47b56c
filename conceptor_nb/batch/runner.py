"""Run a batch: ``decompose_many`` (one process, or a share per rank under ``accelerate launch``), its summary.

Every concept goes to ``<out>/<slug>/`` as ``conceptor decompose`` writes it, plus ``batch.json`` (status, timings,
settings hash, who ran it). A complete folder of the same concept and settings is skipped: a re-run continues a killed
batch; one of other settings is replaced only with ``overwrite`` (see ``jobs.check_out``). One concept's failure (a
bad setting, a name the file system refuses, a full disk) is recorded and the batch goes on; a decomposition that was
found but could not be written is rescued (``io.rescue``: the cache, else printed).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
import traceback
from collections import Counter
from contextlib import suppress
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from ..checks import validate_settings
from ..method.decomposition import Decomposition
from ..method.decompose import decompose, run_settings
from ..method.decompose import unet_evaluations as count_unet
from ..config import Settings
from ..io import CHECKPOINT_DIR, atomic_write, dumps, is_complete, read_json, rescue, write_run
from ..models import clip_for
from .jobs import Claim, Job, as_jobs, check_out, claim_state, done_hash, settings_hash

TOP_K, LOG = 10, "batch-log.jsonl"
SUMMARY_FIELDS = ("concept", "slug", "status", "error", "settings_hash", "model", "seed", "n_tokens", "best_step",
                  "best_score", "stopped_at", "images_s", "dictionary_s", "fit_s", "validation_s", "write_s", "wall_s",
                  "unet_generation", "unet_fit", "unet_validation", "unet_test", "unet_total", "clip_similarity",
                  "clip_ceiling", "clip_floor", "rank", "host", "pid", "finished")


def log_event(out, event: str, slug: str, rank: int = 0) -> None:
    """Append one line to ``out/batch-log.jsonl``: who started and finished what, when (not when the disk is full)."""
    with suppress(OSError), open(Path(out) / LOG, "a") as f:  # one short write in append mode: lines of processes do not interleave
        f.write(json.dumps({"time": time.time(), "event": event, "slug": slug, "rank": rank,
                            "host": socket.gethostname(), "pid": os.getpid()}) + "\n")


def read_log(out) -> list[dict]:
    f = Path(out) / LOG
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.exists() else []


def unet_evaluations(settings, history: dict) -> dict:
    """UNet evaluations (one image through the UNet once) of a fresh run, by stage (see
    ``method.decompose.unet_evaluations``): the run's own count, else counted from its settings and history."""
    s = settings if isinstance(settings, Settings) else Settings.from_dict(settings)
    u = history.get("unet_evals") or count_unet(s, history, s.n_tokens)
    return {f"unet_{k}": v for k, v in u.items()}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def run_one(pipe, job: Job, out, base: Settings, *, clip=None, rank: int = 0, recompute: bool = False,
            refresh: bool = False, faithfulness: int = 0) -> tuple[str, str]:
    """Decompose one concept into ``out/<slug>`` unless done: (status, error), status 'done', 'skipped', 'failed' or
    'claimed'; ``faithfulness``: images of :meth:`Decomposition.faithfulness` kept in the result (0: none). Never
    raises for a fault of this concept (KeyboardInterrupt goes through)."""
    try:
        return _run_one(pipe, job, out, base, clip, rank, recompute, refresh, faithfulness)
    except Exception as err:  # e.g. a folder name the file system refuses: recorded, the batch goes on
        return "failed", f"{type(err).__name__}: {err}"


def _run_one(pipe, job, out, base, clip, rank, recompute, refresh, faithfulness) -> tuple[str, str]:
    s = base.replace(**job.overrides)
    h = settings_hash(s)
    folder = Path(out) / job.slug
    if not recompute and done_hash(folder, job.concept) == h:
        return "skipped", ""
    claim = Claim(out, job.slug, rank)
    if not claim.acquire():
        return "claimed", ""
    with claim:
        if not recompute and done_hash(folder, job.concept) == h:  # finished by another process meanwhile
            return "skipped", ""
        folder.mkdir(parents=True, exist_ok=True)
        record = {"concept": job.concept, "slug": job.slug, "overrides": job.overrides, "settings_hash": h,
                  "rank": rank, "host": socket.gethostname(), "pid": os.getpid(), "started": _now()}
        atomic_write(folder / "batch.json", dumps({**record, "status": "running"}))  # the folder is the batch's
        log_event(out, "start", job.slug, rank)
        t0, dec = time.perf_counter(), None
        try:
            dec = decompose(pipe, job.concept, clip=clip, settings=s, verbose=False, refresh=refresh,
                            checkpoint_dir=folder / CHECKPOINT_DIR)  # a killed run resumes from it
            t1 = time.perf_counter()
            if faithfulness:
                dec.history["faithfulness"] = dec.faithfulness(pipe, clip, n=faithfulness).to_dict("records")
            dec.history["timings"]["total_s"] = t1 - t0
            write_run(dec, pipe, folder, overwrite=True)  # an earlier result stays until this one is complete
            shutil.rmtree(folder / CHECKPOINT_DIR, ignore_errors=True)
            record.update(status="done", error="", write_s=time.perf_counter() - t1)
        except Exception as err:  # recorded; the batch goes on; a found decomposition is kept (cache, or stderr)
            record.update(status="failed", error=rescue(dec, folder, err) if dec is not None else
                          f"{type(err).__name__}: {err}")
            with suppress(OSError):
                atomic_write(folder / "error.txt", traceback.format_exc())
        record.update(wall_s=time.perf_counter() - t0, finished=_now())
        with suppress(OSError):
            atomic_write(folder / "batch.json", dumps(record))
        log_event(out, record["status"], job.slug, rank)
        return record["status"], record["error"]


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
    h = done_hash(folder, job_or_slug.concept if isinstance(job_or_slug, Job) else None)
    if h is not None:  # a complete result (a failed re-run with --overwrite leaves the earlier one)
        meta = read_json(folder / "decomposition.json")
        hist, st = meta.get("history", {}), meta["settings"]
        row.update(status="done", error="", settings_hash=h, concept=meta["concept"], model=meta.get("model"),
                   seed=st.get("seed"), n_tokens=meta.get("n_tokens"), best_step=hist.get("best_step"),
                   best_score=hist.get("best_score"), stopped_at=hist.get("stopped_at"),
                   **{k: hist.get("timings", {}).get(k) for k in ("images_s", "dictionary_s", "fit_s", "validation_s")},
                   **unet_evaluations(st, hist),
                   **dict(zip(("clip_similarity", "clip_ceiling", "clip_floor"),
                              [f["similarity"] for f in hist.get("faithfulness", [])])))
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


def collect(out, jobs, top: int = TOP_K, errors: dict | None = None) -> pd.DataFrame:
    """The summary of ``jobs`` in ``out`` (nothing written); ``errors``: slug -> error of this run's failures, for
    those it could not record in their folder."""
    rows = [summary_row(out, j, top) for j in jobs]
    for row in rows:
        if row["status"] != "done" and (errors or {}).get(row["slug"]):
            row.update(status="failed", error=errors[row["slug"]])
    return pd.DataFrame(rows)


def _csv_cell(value):
    """A text cell that a spreadsheet would run as a formula (OWASP's rule: it starts with = + - @ tab or CR)
    gets a leading ' in the CSV; the JSON keeps the exact text."""
    return "'" + value if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def write_summary(out, jobs, top: int = TOP_K, errors: dict | None = None) -> pd.DataFrame:
    """``out/summary.csv`` (formula-safe) and ``out/summary.json`` (exact), one row per concept; returns the
    DataFrame."""
    df = collect(out, jobs, top, errors)
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
    """``{concept: Decomposition}`` for every finished concept folder of the batch in ``out`` (with its batch.json)."""
    decs = (Decomposition.load(f.parent) for f in sorted(Path(out).glob("*/batch.json")) if is_complete(f.parent))
    return {d.concept: d for d in decs}


def token_matrix(decompositions: dict, k: int = 10) -> pd.DataFrame:
    """Concepts x tokens: each concept's coefficient for every token in any concept's top ``k`` (in order of
    first appearance), 0 where the token is not in that concept's dictionary."""
    tokens = list(dict.fromkeys(t for d in decompositions.values() for t, _ in d.top(k)))
    rows = [[dict(zip(d.tokens, d.coefficients)).get(t, 0.0) for t in tokens] for d in decompositions.values()]
    return pd.DataFrame(rows, index=list(decompositions), columns=tokens, dtype=float)


def decompose_many(pipe, concepts, out="runs", *, clip=None, settings: Settings | None = None, top: int = TOP_K,
                   recompute: bool = False, overwrite: bool = False, refresh: bool = False, verbose: bool = True,
                   state=None, wait: bool = True, faithfulness: int = 0, **overrides) -> pd.DataFrame:
    """Decompose every concept into ``out/<slug>/``; returns the summary (also ``out/summary.csv`` and ``.json``).

    ``concepts``: a path (see :func:`~conceptor_nb.batch.read_concepts`) or a list of strings or dicts with
    per-concept overrides; every :class:`Settings` field is a keyword, as for ``decompose``. The list and the shared
    settings are checked before the CLIP is loaded; a concept with invalid settings of its own is recorded as failed.
    Finished concepts are skipped unless ``recompute``; a finished result of other settings is replaced only with
    ``overwrite`` (or ``recompute``), else OutputError before any work. ``state``: an accelerate state (default
    ``PartialState()``);
    ``wait``: for concepts of the list that other live processes hold, before writing the summary.
    ``faithfulness``: CLIP similarity of each result's renders on this many images, with ceiling and floor (0: not
    measured; costs three sets of renders per concept).
    """
    jobs = as_jobs(concepts)
    base = validate_settings(run_settings(pipe, settings, **overrides))
    out = Path(out)
    jobs = check_out(out, jobs, base, overwrite=overwrite or recompute)
    out.mkdir(parents=True, exist_ok=True)
    if state is None:
        from accelerate import PartialState  # optional heavy dependency

        state = PartialState()
    rank, world = state.process_index, state.num_processes
    clip = clip_for(pipe, clip)
    counts, errors = Counter(), {}
    with state.split_between_processes(jobs) as mine:
        bar = tqdm(mine, desc="concepts" if world == 1 else f"concepts (rank {rank})", unit="concept",
                   disable=not verbose, position=rank, dynamic_ncols=True)
        for job in bar:
            bar.set_postfix_str(job.concept)
            status, errors[job.slug] = run_one(pipe, job, out, base, clip=clip, rank=rank, recompute=recompute,
                                               refresh=refresh, faithfulness=faithfulness)
            counts[status] += 1
        bar.close()
    state.wait_for_everyone()
    if verbose:
        print(f"rank {rank}: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())), flush=True)
    if not state.is_main_process:
        return collect(out, jobs, top, errors)
    while wait and any(claim_state(out, j.slug) == "live" for j in jobs):
        time.sleep(1.0)
    return write_summary(out, jobs, top, errors)
