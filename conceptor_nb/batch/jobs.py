"""The work of a batch: the concept list (with per-concept settings), folder slugs, settings hashes, the check of
``--out`` before any work, and claims.

A concept's folder is ``<out>/<slug>``: its words in any script and 8 hex digits of a hash of its exact text (and its
per-concept settings), so two concepts never share one. A folder is the batch's once its ``batch.json`` names the
concept; the batch never writes into a folder that holds files it did not write for that concept.

A claim is a file ``<out>/.claims/<slug>.lock`` created with ``O_CREAT | O_EXCL`` and touched every ``HEARTBEAT_S``;
it is stale when its owner (host, pid, start time) is on this host and gone, or untouched for ``STALE_AFTER_S``.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..config import Settings, parse_setting
from ..errors import OutputError
from ..io import RUN_FILES, is_complete, read_json, slug

try:
    import fcntl
except ImportError:  # not POSIX: stale claims are removed without the lock
    fcntl = None

CLAIMS, STALE_AFTER_S, HEARTBEAT_S = ".claims", 600.0, 30.0


@dataclass
class Job:
    """One concept of a batch and its settings overrides (from a CSV's extra columns)."""

    concept: str
    overrides: dict = field(default_factory=dict)
    slug: str = ""


def _cell(name: str, value: str):
    if name in ("model", "clip"):
        raise ValueError(f"column {name!r}: a batch runs one model; pass --model/--clip for the whole batch")
    return parse_setting(name, value.strip())


def read_concepts(path) -> list[Job]:
    """A text file (one concept a line, ``#`` starts a comment) or a CSV with a ``concept`` column and optional
    columns named after :class:`Settings` fields (``seed``, ``steps``, ...) for per-concept overrides."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no concept list {path}")
    if path.suffix.lower() != ".csv":
        return [Job(t) for t in (line.split("#", 1)[0].strip() for line in path.read_text().splitlines()) if t]
    with path.open(newline="") as f:
        reader = csv.DictReader(row for row in f if not row.lstrip().startswith("#"))
        if "concept" not in (reader.fieldnames or []):
            raise ValueError(f"{path}: a CSV concept list needs a 'concept' column (got {reader.fieldnames})")
        rows = list(reader)
    return [Job(row.pop("concept").strip(), {k.strip(): _cell(k.strip(), v) for k, v in row.items()
                                             if k and v is not None and v.strip()})
            for row in rows if (row.get("concept") or "").strip()]


def _job(c) -> Job:
    if isinstance(c, Job):
        return Job(c.concept, dict(c.overrides), c.slug)
    if isinstance(c, dict):
        return Job(c["concept"], {k: v for k, v in c.items() if k != "concept" and v is not None})
    return Job(str(c))


def job_slug(job: Job) -> str:
    """The concept's words and a hash of its exact text (and per-concept settings): "a dog" -> "a-dog-ab02bbc6"."""
    key = job.concept + ("\0" + json.dumps(job.overrides, sort_keys=True, default=str) if job.overrides else "")
    return slug(job.concept, key=key)


def as_jobs(concepts) -> list[Job]:
    """A path, or a list of strings, ``Job``s or dicts (``{"concept": ..., "seed": ...}``); one job per concept
    text and settings (a repeat is dropped), each with its folder name (:func:`job_slug`)."""
    jobs = read_concepts(concepts) if isinstance(concepts, (str, Path)) else [_job(c) for c in concepts]
    if not jobs:
        raise ValueError("the concept list is empty")
    names, seen = {f.name for f in fields(Settings)}, {}
    for job in jobs:
        if set(job.overrides) - names:
            raise ValueError(f"{job.concept!r}: unknown settings {sorted(set(job.overrides) - names)}")
        job.slug = job.slug or job_slug(job)
        seen.setdefault(job.slug, job)
    return list(seen.values())


def settings_hash(s) -> str:
    """12 hex digits identifying a set of settings (a :class:`Settings` or its ``to_dict()``)."""
    d = (s if isinstance(s, Settings) else Settings.from_dict(s)).to_dict()
    d.pop("explain_guidance")  # single-image decomposition's renders: not the decomposition's
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=list).encode()).hexdigest()[:12]


def done_hash(folder, concept: str | None = None) -> str | None:
    """The settings hash of the complete decomposition in ``folder`` (of exactly ``concept`` when given), or None."""
    try:
        meta = read_json(Path(folder) / "decomposition.json") if is_complete(folder) else None
        return settings_hash(meta["settings"]) if meta and concept in (None, meta["concept"]) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def owner(folder) -> str | None:
    """The concept whose batch run the folder holds (its ``batch.json``), or None."""
    try:
        return str(read_json(Path(folder) / "batch.json")["concept"])
    except (OSError, ValueError, KeyError):
        return None


def check_out(out, jobs: list[Job], base: Settings, *, overwrite: bool = False) -> list[Job]:
    """Before any work: ``jobs`` with the folders an older version named without a hash ("a-dog", its ``batch.json``
    naming the same concept) kept; OutputError when a concept's folder holds files the batch did not write for it
    (never overwritten), or, unless ``overwrite``, a finished result of other settings (never silently replaced)."""
    out, foreign, other = Path(out), [], []
    for job in jobs:
        old = out / slug(job.concept)
        if not (out / job.slug).exists() and owner(old) == job.concept:
            job.slug = old.name
        folder = out / job.slug
        mine = owner(folder)
        if mine not in (None, job.concept) or (mine is None and any(
                (folder / f).exists() for f in (*RUN_FILES, "batch.json", "error.txt"))):
            foreign.append(str(folder))
        elif done_hash(folder, job.concept) not in (None, settings_hash(base.replace(**job.overrides))):
            other.append(job.concept)
    if foreign:
        raise OutputError(f"{', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''} hold(s) files that conceptor "
                          "batch did not write for that concept, and it never overwrites them: move them or choose "
                          "another --out")
    if other and not overwrite:
        raise OutputError(f"--out {out} holds finished results of other settings for {len(other)} concept(s) ("
                          f"{', '.join(map(repr, other[:3]))}{' ...' if len(other) > 3 else ''}): pass --overwrite to "
                          "replace them with this run's, or choose another --out to keep both")
    return jobs


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return start is None or _start_time(pid) in (None, start)


class Claim:
    """An exclusive claim on one concept of ``out``; a context manager that releases it."""

    def __init__(self, out, slug: str, rank: int = 0, stale_after: float = STALE_AFTER_S):
        self.folder = Path(out) / CLAIMS
        self.path = self.folder / f"{slug}.lock"
        self.rank, self.stale_after, self.token, self._stop = rank, stale_after, uuid.uuid4().hex, threading.Event()

    def read(self) -> dict | None:
        """The claim's content: None without a claim, {} while it is being written (or garbage)."""
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def state(self) -> str | None:
        """'live' when a running process holds the claim, 'stale' for a dead one, None for no claim."""
        info = self.read()
        try:
            age = time.time() - self.path.stat().st_mtime
        except OSError:  # none, or a name the file system refuses
            return None
        if info is None:
            return None
        if age > self.stale_after:
            return "stale"
        mine = info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int)
        return "stale" if mine and not _alive(info["pid"], info.get("start")) else "live"

    def _break_stale(self) -> bool:
        """Remove the claim if it is stale (under an flock, so two processes cannot both break it)."""
        with open(self.folder / ".guard", "a") as guard:
            if fcntl is not None:
                fcntl.flock(guard, fcntl.LOCK_EX)  # released when the file closes
            state = self.state()
            if state == "stale":
                self.path.unlink(missing_ok=True)
            return state != "live"

    def acquire(self) -> bool:
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._break_stale():
                    return False
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid()),
                                    "rank": self.rank, "time": time.time(), "token": self.token}))
            threading.Thread(target=self._beat, daemon=True).start()
            return True
        return False

    def _beat(self):
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        if (self.read() or {}).get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def claim_state(out, slug: str) -> str | None:
    """'live' when a running process holds the concept, 'stale' for a dead claim, None for no claim."""
    return Claim(out, slug).state()
