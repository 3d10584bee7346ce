"""The run folder: one run at a time holds it, and it is checked before anything is sent.

The lock is `fcntl.flock` on `run.lock`, held for the run's whole life. The OS releases it when
the process ends however it ends (SIGKILL too), so a stale lock never outlives its holder. The
file also says who holds it (pid, host, start, run id), so a refused run can name the holder
and a later run can tell the folder's history. It is our own code, not filelock: filelock
truncates the file on every attempt, which would erase the holder's description that the
refused run is to print.

The checks: a folder with results, a failures manifest or a lock that names a run, but no
journal (or a journal that lost what it held), is refused: running it again would pay for every
row a second time. So is a journal that fails SQLite's integrity check.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core import (
    FAILURES,
    IMAGES,
    JOURNAL,
    LOCK,
    RESULTS,
    RUN_LOG,
    SANDBOX_LEDGER,
    JournalDamaged,
    RunFolderError,
    RunFolderLocked,
)
from pipeline.journal import Journal
from pipeline.outputs import RESULTS_ROWS, RESULTS_RUN_ID, RESULTS_SUCCEEDED

__all__ = ["Holder", "RunFolder", "holder_of"]

_RESULT_FILES = (RESULTS, IMAGES, *(f"{FAILURES}.{kind}" for kind in ("csv", "tsv", "parquet")))
_FILES = (  # what --fresh removes (the lock stays: it is held)
    JOURNAL,
    f"{JOURNAL}-wal",
    f"{JOURNAL}-shm",
    *_RESULT_FILES,
    SANDBOX_LEDGER,
    RUN_LOG,
)
_FRESH = (
    "start over with `wanbatch run CONFIG --fresh` (every row is sent and paid again), or use "
    "a new output.dir"
)


@dataclass(frozen=True, slots=True)
class Holder:
    """Who holds (or last held) a run folder."""

    pid: int
    host: str
    started: str  # ISO 8601, UTC
    run_id: str | None = None

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.started}"


def _read_holder(fd: int) -> Holder | None:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"null")
        return Holder(int(data["pid"]), str(data["host"]), str(data["started"]), data.get("run_id"))
    except (ValueError, TypeError, KeyError):
        return None  # empty (never written) or not ours


def holder_of(path: Path) -> Holder | None:
    """Who holds the run folder `path` now, or None when no run does (`wanbatch status`)."""
    try:
        fd = os.open(path / LOCK, os.O_RDONLY)
    except OSError:
        return None  # no run ever held it
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd) or Holder(0, "?", "?")
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class RunFolder:
    """A run folder held by this process: `with RunFolder(path) as folder: ...`."""

    def __init__(self, path: Path, *, fresh: bool = False) -> None:
        self.path = path
        self._fresh = fresh
        self._fd: int | None = None
        self.previous: Holder | None = None  # the last run that held the folder
        self.started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    def __enter__(self) -> RunFolder:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunFolderError(f"cannot use run folder {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            who = str(holder) if holder else "another process (it has not said which yet)"
            raise RunFolderLocked(
                f"run folder {self.path} is held by another run ({who}); one run per folder: "
                "wait for it to end, or give this run another output.dir"
            ) from None
        self._fd = fd
        self.previous = _read_holder(fd)
        try:
            if self._fresh:
                for name in _FILES:
                    (self.path / name).unlink(missing_ok=True)
                self.previous = None  # its run is the one being started over
            self._check_writable()
        except BaseException:
            self.close()
            raise
        # the folder's run stays named while this process starts (a kill now loses nothing)
        self._record(self.previous.run_id if self.previous is not None else None)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock; the file stays (removing it would race)
            self._fd = None

    @property
    def log_path(self) -> Path:
        return self.path / RUN_LOG

    def _record(self, run_id: str | None) -> None:
        assert self._fd is not None
        holder = Holder(os.getpid(), socket.gethostname(), self.started, run_id)
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(asdict(holder)).encode(), 0)

    def _check_writable(self) -> None:
        for name in (*_FILES, ".results.parquet.tmp"):
            if (self.path / name).is_dir():
                raise RunFolderError(
                    f"run folder {self.path}: {name} is a folder; the run writes a file there"
                )
        probe = self.path / f".wanbatch-probe-{os.getpid()}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise RunFolderError(
                f"run folder {self.path} is not writable: {exc.strerror}"
            ) from None

    # -- the journal ---------------------------------------------------------------------------

    def open_journal(self, *, share_seeded: bool = False) -> Journal:
        """The folder's journal, checked against what else the folder says of earlier runs;
        RunFolderError before anything is sent when it cannot be trusted. `share_seeded`:
        manifest.dedupe (see Journal)."""
        path = self.path / JOURNAL
        evidence = [n for n in (*_RESULT_FILES, f"{JOURNAL}-wal") if (self.path / n).exists()]
        if self.previous is not None and self.previous.run_id:
            evidence.append(f"{LOCK} (run {self.previous.run_id})")
        if not path.exists() and evidence:
            raise RunFolderError(
                f"run folder {self.path} holds {', '.join(evidence)} but no {JOURNAL}: the record "
                f"of which rows were sent and paid for is gone. Restore {JOURNAL} (with its -wal "
                f"file) from a backup, or {_FRESH}"
            )
        try:
            journal = Journal(path, share_seeded=share_seeded)
        except JournalDamaged as exc:
            raise RunFolderError(f"{exc}; restore it from a backup, or {_FRESH}") from None
        try:
            self._check_journal(journal)
        except BaseException:
            journal.close()
            raise
        return journal

    def _check_journal(self, journal: Journal) -> None:
        damage = journal.damage()
        if damage is not None:
            raise RunFolderError(
                f"journal {journal.path} fails SQLite's integrity check ({damage}); restore it "
                f"from a backup, or {_FRESH}"
            )
        run_id = journal.get_meta("run_id")
        known = self.previous.run_id if self.previous is not None else None
        results = self._results_meta()
        if run_id is None and (known or results.get(RESULTS_RUN_ID)):
            raise RunFolderError(
                f"journal {journal.path} has lost its records (it names no run, while "
                f"{LOCK if known else RESULTS} names run {known or results[RESULTS_RUN_ID]}); "
                f"it may have been replaced, or its -wal file cut. Restore it, or {_FRESH}"
            )
        if run_id is None:  # a new folder, or one journaled before runs had ids
            run_id = uuid.uuid4().hex
            journal.set_meta({"run_id": run_id})
        for name, other in ((LOCK, known), (RESULTS, results.get(RESULTS_RUN_ID))):
            if other and other != run_id:
                raise RunFolderError(
                    f"journal {journal.path} is of run {run_id}, but {name} is of run {other}: "
                    f"the journal comes from another run. Restore the right one, or {_FRESH}"
                )
        self._check_against_results(journal, results)
        self._record(run_id)

    def _results_meta(self) -> dict[bytes, str]:
        try:
            meta = pq.read_schema(self.path / RESULTS).metadata or {}
        except (OSError, pa.ArrowException):
            return {}  # none, or unreadable: the journal is the record, results are rewritten
        return {k: v.decode() for k, v in meta.items() if k.startswith(b"wanbatch.")}

    def _check_against_results(self, journal: Journal, results: dict[bytes, str]) -> None:
        if RESULTS_ROWS not in results:
            return
        # rows and edits made only grow (--force, which can drop rows, removes the results; a
        # rejected edit's row goes back to be made again, and its edit still counts)
        counts = journal.reports.counts()
        rows, succeeded = sum(counts.values()), journal.reviews.edits_made()
        had_rows, had_succeeded = int(results[RESULTS_ROWS]), int(results[RESULTS_SUCCEEDED])
        if rows < had_rows or succeeded < had_succeeded:
            raise RunFolderError(
                f"journal {journal.path} holds less than the {RESULTS} written from it "
                f"({succeeded} of {rows} rows succeeded, against {had_succeeded} of {had_rows}):"
                f" it has lost records (a cut -wal file?). Restore it, or {_FRESH}"
            )

    def forget_results(self) -> None:
        """Remove results that no longer describe the journal (after --force changed it)."""
        for name in _RESULT_FILES:
            (self.path / name).unlink(missing_ok=True)
