"""Many concepts: ``decompose_many`` / ``conceptor batch``, resumable, on one process or many (accelerate).

Every concept goes to ``<out>/<slug>/`` exactly as ``conceptor decompose`` writes it
(:func:`conceptor_nb.runfolder.write_run`), plus ``batch.json`` (status, timings, settings hash, who
ran it). A concept whose folder holds a complete decomposition with the same settings is skipped,
so re-running a batch after a crash or Ctrl-C continues where it stopped.

Processes: under ``accelerate launch`` the list is split between the ranks
(``PartialState.split_between_processes``), each rank on its own device; rank 0 writes
``<out>/summary.csv`` and ``summary.json`` once every rank is done. Independent jobs pointed at the
same ``--out`` share the work through claim files ``<out>/.claims/<slug>.lock`` created with
``O_CREAT | O_EXCL``; a claim holds the owner's host, pid and process start time and is refreshed
every 30 s. A claim is stale (and taken over) when its owner is on this host and no longer runs,
or when it has not been refreshed for ``STALE_AFTER_S`` (an owner on another host that died).
Taking over happens under an ``flock`` on ``<out>/.claims/.guard`` after re-reading the claim, so
two processes cannot both break it and a fresh claim is never removed.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import socket
import threading
import time
import traceback
import uuid
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from .config import Settings
from .runfolder import is_complete, write_run

CLAIMS = ".claims"
CHECKPOINT_DIR = ".checkpoint"  # as conceptor decompose: the fit's state while it runs
STALE_AFTER_S = 600.0   # a claim not refreshed for this long is stale, whoever holds it
HEARTBEAT_S = 30.0
TOP_K = 10
SUMMARY_FIELDS = ("concept", "slug", "status", "error", "settings_hash", "model", "seed", "n_tokens",
                  "best_step", "best_score", "stopped_at", "images_s", "dictionary_s", "fit_s", "validation_s",
                  "write_s", "wall_s", "unet_generation", "unet_fit", "unet_validation", "unet_total",
                  "rank", "host", "pid", "finished")


# -- the list of concepts ---------------------------------------------------------------------------
@dataclass
class Job:
    """One concept of a batch and its settings overrides (from a CSV's extra columns)."""

    concept: str
    overrides: dict = field(default_factory=dict)
    slug: str = ""


def slugify(text: str) -> str:
    import re

    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "concept"


def _convert(name: str, value: str):
    if name in ("model", "clip"):
        raise ValueError(f"column {name!r}: a batch runs one model; pass --model/--clip for the whole batch")
    defaults = {f.name: f.default for f in fields(Settings) if f.default is not MISSING}
    if name not in defaults:
        raise ValueError(f"unknown column {name!r}: a column is 'concept' or a setting "
                         f"({', '.join(sorted(defaults))})")
    default = defaults[name]
    value = value.strip()
    if isinstance(default, bool):
        return value.lower() in ("1", "true", "yes", "on")
    if isinstance(default, int):
        return int(float(value))
    if isinstance(default, float) or name in ("exclude_threshold", "null_threshold"):
        return None if value.lower() in ("none", "off") else float(value)
    return value


def read_concepts(path) -> list[Job]:
    """A text file (one concept a line, ``#`` starts a comment) or a CSV with a ``concept`` column and
    optional columns named after :class:`Settings` fields (``seed``, ``steps``, ...) for per-concept overrides."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no concept list {path}")
    jobs = []
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as f:
            reader = csv.DictReader(row for row in f if not row.lstrip().startswith("#"))
            if "concept" not in (reader.fieldnames or []):
                raise ValueError(f"{path}: a CSV concept list needs a 'concept' column (got {reader.fieldnames})")
            for row in reader:
                concept = (row.pop("concept") or "").strip()
                if concept:
                    jobs.append(Job(concept, {k.strip(): _convert(k.strip(), v) for k, v in row.items()
                                              if k and v is not None and v.strip() != ""}))
    else:
        for line in path.read_text().splitlines():
            text = line.split("#", 1)[0].strip()
            if text:
                jobs.append(Job(text))
    return jobs


def as_jobs(concepts) -> list[Job]:
    """A path, or a list of strings, ``Job``s or dicts (``{"concept": ..., "seed": ...}``); unique slugs."""
    if isinstance(concepts, (str, Path)):
        jobs = read_concepts(concepts)
    else:
        jobs = []
        for c in concepts:
            if isinstance(c, Job):
                jobs.append(Job(c.concept, dict(c.overrides), c.slug))
            elif isinstance(c, dict):
                c = dict(c)
                concept = c.pop("concept")
                jobs.append(Job(concept, {k: v for k, v in c.items() if v is not None}))
            else:
                jobs.append(Job(str(c)))
    if not jobs:
        raise ValueError("the concept list is empty")
    names = {f.name for f in fields(Settings)}
    seen: dict[str, int] = {}
    for job in jobs:
        bad = set(job.overrides) - names
        if bad:
            raise ValueError(f"{job.concept!r}: unknown settings {sorted(bad)}")
        base = job.slug or slugify(job.concept)
        seen[base] = seen.get(base, 0) + 1
        job.slug = base if seen[base] == 1 else f"{base}-{seen[base]}"
    return jobs


def settings_hash(s) -> str:
    """12 hex digits identifying a set of settings (a :class:`Settings` or its ``to_dict()``)."""
    d = (s if isinstance(s, Settings) else Settings.from_dict(s)).to_dict()
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=list).encode()).hexdigest()[:12]


def done_hash(folder) -> str | None:
    """The settings hash of the complete decomposition in ``folder``, or None."""
    folder = Path(folder)
    if not is_complete(folder):
        return None
    try:
        return settings_hash(json.loads((folder / "decomposition.json").read_text())["settings"])
    except (OSError, ValueError, KeyError):
        return None


# -- claims -----------------------------------------------------------------------------------------
def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = _start_time(pid)
    return start is None or now is None or now == start


class Claim:
    """An exclusive claim on one concept of ``out``: a lock file created with ``O_CREAT | O_EXCL``."""

    def __init__(self, out, slug: str, rank: int = 0, stale_after: float = STALE_AFTER_S):
        self.folder = Path(out) / CLAIMS
        self.path = self.folder / f"{slug}.lock"
        self.rank = rank
        self.stale_after = stale_after
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread = None

    def _content(self) -> str:
        pid = os.getpid()
        return json.dumps({"host": socket.gethostname(), "pid": pid, "start": _start_time(pid), "rank": self.rank,
                           "time": time.time(), "token": self.token})

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(self._content())
        return True

    @staticmethod
    def read(path) -> dict | None:
        try:
            return json.loads(Path(path).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # being written, or garbage: judged by its age

    def is_stale(self, info: dict | None, mtime: float | None) -> bool:
        if info is None:
            return False
        if mtime is not None and time.time() - mtime > self.stale_after:
            return True
        if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
            return not _alive(info["pid"], info.get("start"))
        return False

    def _break_stale(self) -> bool:
        """Remove the claim file if it is stale; under an flock so two processes cannot race on it."""
        import fcntl

        with open(self.folder / ".guard", "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            try:
                info = self.read(self.path)
                try:
                    mtime = self.path.stat().st_mtime
                except FileNotFoundError:
                    return True
                if not self.is_stale(info, mtime):
                    return False
                self.path.unlink(missing_ok=True)
                return True
            finally:
                fcntl.flock(guard, fcntl.LOCK_UN)

    def acquire(self) -> bool:
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                self._thread = threading.Thread(target=self._beat, daemon=True)
                self._thread.start()
                return True
            if not self._break_stale():
                return False
        return False

    def _beat(self):
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        info = self.read(self.path)
        if info and info.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def claim_state(out, slug: str) -> str | None:
    """'live' when a running process holds the concept, 'stale' for a dead claim, None for no claim."""
    c = Claim(out, slug)
    info = c.read(c.path)
    if info is None:
        return None
    try:
        mtime = c.path.stat().st_mtime
    except FileNotFoundError:
        return None
    return "stale" if c.is_stale(info, mtime) else "live"


# -- one concept ------------------------------------------------------------------------------------
def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=True, default=str))
    tmp.replace(path)


LOG = "batch-log.jsonl"


def log_event(out, event: str, slug: str, rank: int = 0) -> None:
    """Append one line to ``out/batch-log.jsonl`` (an audit trail: who started and finished what, when)."""
    line = json.dumps({"time": time.time(), "event": event, "slug": slug, "rank": rank,
                       "host": socket.gethostname(), "pid": os.getpid()}) + "\n"
    fd = os.open(Path(out) / LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())  # one write of a short line: appends do not interleave
    finally:
        os.close(fd)


def read_log(out) -> list[dict]:
    f = Path(out) / LOG
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.exists() else []


def unet_evaluations(settings: dict, history: dict) -> dict:
    """UNet evaluations (one image through the UNet once) of one decomposition, by stage.

    generation: training + validation images, ``gen_steps`` each, twice with guidance (> 1);
    fit: ``batch_size`` images per step actually taken (a forward and a backward pass each);
    validation: ``n_val`` renders of ``val_steps`` per validation round, twice with guidance.
    Cached concept images cost nothing on a second run; the count is what a fresh run does.
    """
    s = settings.to_dict() if isinstance(settings, Settings) else settings
    cfg = 2 if s["guidance"] > 1 else 1
    validating = s["val_every"] > 0 and s["n_val"] > 0
    gen = (s["n_train"] + (s["n_val"] if validating else 0)) * s["gen_steps"] * cfg
    fit = len(history.get("loss", [])) * min(s["batch_size"], s["n_train"])
    val = len(history.get("validation", [])) * s["n_val"] * s["val_steps"] * cfg
    return {"unet_generation": gen, "unet_fit": fit, "unet_validation": val, "unet_total": gen + fit + val}


def run_one(pipe, job: Job, out, base: Settings, *, clip=None, rank: int = 0, recompute: bool = False,
            refresh: bool = False) -> str:
    """Decompose one concept into ``out/<slug>`` unless done; returns 'done', 'skipped', 'failed' or 'claimed'."""
    from .conceptor import decompose

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
                  "rank": rank, "host": socket.gethostname(), "pid": os.getpid(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        log_event(out, "start", job.slug, rank)
        t0 = time.perf_counter()
        try:
            (folder / "decomposition.json").unlink(missing_ok=True)  # other settings, or recompute: not done
            # the fit's state goes to .checkpoint/ at each validation: a killed run resumes mid-fit
            dec = decompose(pipe, job.concept, clip=clip, settings=s, verbose=False, refresh=refresh,
                            checkpoint_dir=folder / CHECKPOINT_DIR)
            t1 = time.perf_counter()
            dec.history["timings"]["total_s"] = t1 - t0
            write_run(dec, pipe, folder, overwrite=True)
            shutil.rmtree(folder / CHECKPOINT_DIR, ignore_errors=True)
            record.update(status="done", error="", write_s=time.perf_counter() - t1)
        except Exception as err:  # recorded; the batch goes on
            record.update(status="failed", error=f"{type(err).__name__}: {err}")
            (folder / "error.txt").write_text(traceback.format_exc())
        record["wall_s"] = time.perf_counter() - t0
        record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        _write_json(folder / "batch.json", record)
        log_event(out, record["status"], job.slug, rank)
        return record["status"]


# -- the summary ------------------------------------------------------------------------------------
def summary_row(out, job_or_slug, top: int = TOP_K) -> dict:
    """The summary row of one concept folder: status, top-k tokens and coefficients, timings, costs."""
    slug = job_or_slug.slug if isinstance(job_or_slug, Job) else str(job_or_slug)
    folder = Path(out) / slug
    rec = {}
    if (folder / "batch.json").exists():
        try:
            rec = json.loads((folder / "batch.json").read_text())
        except ValueError:
            rec = {}
    row = {k: None for k in SUMMARY_FIELDS}
    row.update({k: v for k, v in rec.items() if k in row})
    row["slug"] = slug
    if isinstance(job_or_slug, Job):
        row["concept"] = job_or_slug.concept
    h = done_hash(folder)
    if h is not None:  # run_one removes decomposition.json before it starts, so a failed run leaves none
        meta = json.loads((folder / "decomposition.json").read_text())
        hist = meta.get("history", {})
        st = meta["settings"]
        row.update(status="done", error="", settings_hash=h, concept=meta["concept"], model=meta.get("model"),
                   seed=st.get("seed"), n_tokens=meta.get("n_tokens"), best_step=hist.get("best_step"),
                   best_score=hist.get("best_score"), stopped_at=hist.get("stopped_at"))
        for k in ("images_s", "dictionary_s", "fit_s", "validation_s"):
            row[k] = hist.get("timings", {}).get(k)
        row.update(unet_evaluations(st, hist))
        for i in range(top):
            has = i < len(meta["tokens"])
            row[f"token_{i + 1}"] = meta["tokens"][i] if has else None
            row[f"coef_{i + 1}"] = meta["coefficients"][i] if has else None
    elif rec.get("status") == "failed":
        row["status"] = "failed"
    else:
        row["status"] = "running" if claim_state(out, slug) == "live" else "pending"
    return row


def collect(out, jobs, top: int = TOP_K):
    """The summary of ``jobs`` in ``out`` as a DataFrame (nothing written)."""
    import pandas as pd

    return pd.DataFrame([summary_row(out, j, top) for j in jobs])


def write_summary(out, jobs, top: int = TOP_K):
    """``out/summary.csv`` and ``out/summary.json`` (one row per concept); returns the DataFrame."""
    out = Path(out)
    df = collect(out, jobs, top)
    tmp = out / f"summary.csv.{os.getpid()}.tmp"
    df.to_csv(tmp, index=False)
    tmp.replace(out / "summary.csv")
    _write_json(out / "summary.json", {"top": top, "rows": json.loads(df.to_json(orient="records"))})
    return df


def load_runs(out):
    """A finished batch as a DataFrame: ``out/summary.json`` if there, else rebuilt from the concept folders."""
    import pandas as pd

    out = Path(out)
    if (out / "summary.json").exists():
        return pd.DataFrame(json.loads((out / "summary.json").read_text())["rows"])
    slugs = sorted(p.parent.name for p in out.glob("*/decomposition.json")) + \
        sorted(p.parent.name for p in out.glob("*/batch.json") if not (p.parent / "decomposition.json").exists())
    if not slugs:
        raise FileNotFoundError(f"no summary.json and no concept folders in {out}")
    return pd.DataFrame([summary_row(out, s) for s in slugs])


def load_decompositions(out) -> dict:
    """``{concept: Decomposition}`` for every finished concept folder in ``out``."""
    from .conceptor import Decomposition

    decs = {}
    for f in sorted(Path(out).glob("*/decomposition.json")):
        d = Decomposition.load(f.parent)
        decs[d.concept] = d
    return decs


# -- many concepts ----------------------------------------------------------------------------------
def _state(state):
    if state is not None:
        return state
    from accelerate import PartialState

    return PartialState()


def decompose_many(pipe, concepts, out="runs", *, clip=None, settings: Settings | None = None, top: int = TOP_K,
                   recompute: bool = False, refresh: bool = False, verbose: bool = True, state=None,
                   wait: bool = True, **overrides):
    """Decompose every concept into ``out/<slug>/``; returns the summary DataFrame (also written to
    ``out/summary.csv`` and ``summary.json``).

    ``concepts``: a path (text or CSV, see :func:`read_concepts`) or a list of strings or dicts with
    per-concept overrides. Every :class:`Settings` field is a keyword argument, as for ``decompose``.
    Finished concepts (same settings) are skipped unless ``recompute``. Under ``accelerate launch``
    (or with an accelerate ``state``) each rank takes its share and the main rank writes the summary.
    ``refresh``: generate the concept images again instead of reading them from the cache.
    ``wait``: before writing the summary, wait for concepts of the list that other live processes hold.
    """
    from tqdm.auto import tqdm

    from .config import default_clip_for
    from .conceptor import run_settings
    from .models import load_clip, model_name

    jobs = as_jobs(concepts)
    base = run_settings(pipe, settings, **overrides)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = _state(state)
    rank, world = state.process_index, state.num_processes
    if clip is None:
        clip = load_clip(default_clip_for(model_name(pipe)), device=pipe.device)
    counts: dict[str, int] = {}
    with state.split_between_processes(jobs) as mine:
        bar = tqdm(mine, desc="concepts" if world == 1 else f"concepts (rank {rank})", unit="concept",
                   disable=not verbose, position=rank, dynamic_ncols=True)
        for job in bar:
            bar.set_postfix_str(job.concept)
            result = run_one(pipe, job, out, base, clip=clip, rank=rank, recompute=recompute, refresh=refresh)
            counts[result] = counts.get(result, 0) + 1
        bar.close()
    state.wait_for_everyone()
    if verbose:
        print(f"rank {rank}: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())), flush=True)
    if not state.is_main_process:
        return collect(out, jobs, top)
    if wait:
        while any(claim_state(out, j.slug) == "live" for j in jobs):
            time.sleep(1.0)
    return write_summary(out, jobs, top)


# -- the command --------------------------------------------------------------------------------------
def add_parser(sub) -> None:
    """Register ``conceptor batch`` (same method-settings flags as ``decompose``)."""
    from .cli import add_model_flags, add_settings_flags

    p = sub.add_parser("batch", help="decompose every concept of a list (resumable; accelerate launch for many processes)",
                       description="Decompose every concept of a list into OUT/<slug>/ as `conceptor decompose` "
                                   "writes it, then OUT/summary.csv and summary.json. Re-running skips finished "
                                   "concepts. Many processes: accelerate launch -m conceptor_nb batch LIST --out OUT.")
    p.add_argument("concepts", help="a text file (one concept a line, # comments) or a CSV with a 'concept' column "
                                    "and per-concept settings columns (seed, steps, ...)")
    p.add_argument("--out", default="runs", help="output folder (default: runs)")
    add_model_flags(p)
    p.add_argument("--top", type=int, default=TOP_K, help="tokens per concept in the summary")
    p.add_argument("--recompute", action="store_true", help="decompose finished concepts again")
    p.add_argument("--refresh", action="store_true", help="generate the concept images again instead of reading the cache")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_settings_flags(p)
    p.set_defaults(func=cmd_batch)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def cmd_batch(args) -> int:
    import sys

    from accelerate import PartialState

    from .cli import TINY_WARNING, settings_overrides
    from .config import resolve
    from .models import load_clip, load_pipeline

    jobs = as_jobs(args.concepts)
    # CPU ranks (gloo) when asked, or when launched as several processes on a machine without CUDA
    state = PartialState(cpu=args.device == "cpu" or not _has_cuda())
    prof, model, clip_name = resolve(args.model, args.clip, warn=state.is_main_process)
    if model == "tiny" and state.is_main_process:
        print(TINY_WARNING, file=sys.stderr)
    device = args.device or state.device
    pipe = load_pipeline(model, device=device, config=args.model_config)
    clip = load_clip(clip_name, device=pipe.device)
    df = decompose_many(pipe, jobs, args.out, clip=clip, settings=prof.settings, top=args.top,
                        recompute=args.recompute, refresh=args.refresh, verbose=not args.quiet, state=state, **settings_overrides(args))
    if not state.is_main_process:
        return 0
    n = df["status"].value_counts().to_dict()
    print(f"{len(df)} concepts: " + ", ".join(f"{v} {k}" for k, v in sorted(n.items())))
    for _, r in df[df["status"] == "failed"].iterrows():
        print(f"  failed {r['concept']!r}: {r['error']}", file=sys.stderr)
    print(f"wrote {Path(args.out) / 'summary.csv'} and summary.json")
    return 0 if n.get("done", 0) == len(df) else 1
