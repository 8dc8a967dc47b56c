"""The work of a batch: the concept list (with per-concept settings), folder slugs, settings hashes, the check of
``--out`` before any work, and claims.

A concept's folder is ``<out>/<slug>``: its words in any script and 8 hex digits of a hash of its exact text (and its
per-concept settings), so two concepts never share one. A folder is the batch's once its ``batch.json`` names the
concept; the batch never writes into a folder that holds files it did not write for that concept.

A claim is an ``flock`` on ``<out>/.claims/<slug>.lock``: the operating system drops it when its process ends.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..config import Settings, parse_setting
from ..errors import OutputError
from ..io import RUN_FILES, is_complete, read_json, slug

try:
    import fcntl
except ImportError:  # not POSIX: no claims (one batch per --out at a time)
    fcntl = None

CLAIMS = ".claims"


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
    """The concept's words and a hash of its exact text (and per-concept settings): "a dog" -> "a-dog-7dbdf68a"."""
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


class Claim:
    """An exclusive claim on one concept of ``out``: an ``flock`` on ``<out>/.claims/<slug>.lock``, which the operating
    system drops when its process ends, killed or not (so no claim is ever stale). A context manager that releases it.
    Not for one ``--out`` shared by several hosts over NFS, where ``flock`` may not reach the other hosts."""

    def __init__(self, out, slug: str, rank: int = 0):
        self.path, self.rank, self.fd = Path(out) / CLAIMS / f"{slug}.lock", rank, None

    def acquire(self) -> bool:
        """Take the claim: False when a live process holds it."""
        if fcntl is None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # the holder may release (and remove) the file between our open and our lock
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            if self.path.exists() and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                self.fd = fd
                return True
            os.close(fd)
        return False

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while locked: a process that opened it sees it gone and retries
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def claim_state(out, slug: str) -> str | None:
    """'live' when a running process holds the concept's claim, else None."""
    claim = Claim(out, slug)
    try:
        if not claim.path.exists() or claim.acquire():
            claim.release()
            return None
    except OSError:  # a name the file system refuses: no claim
        return None
    return "live"
