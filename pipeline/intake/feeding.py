"""The catalog read into the journal: a run's ingest (the rows not journaled yet, beside the
drive), and `--force`'s reconcile (the whole manifest as it is now). With a state store, rows
whose input already succeeded come in as reused, pointing at an earlier run's stored copies of
their images (fetched again when a copy is gone)."""

from __future__ import annotations

import functools
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import structlog

from pipeline.core import JobSpec, PriorSuccess
from pipeline.intake.manifest import Manifest
from pipeline.journal import Journal, StateStore

__all__ = ["Copies", "Fetches", "Reuse", "feed", "reconcile"]

_log = structlog.get_logger("pipeline.intake.feeding")


class Copies(Protocol):
    """Which stored copies of earlier runs are still there (`outputs.CopyCheck`)."""

    def present(self, prior: dict[str, PriorSuccess]) -> dict[str, PriorSuccess]: ...


class Fetches(Protocol):
    """Where images to fetch are handed (`outputs.Downloader`)."""

    def submit_many(self, images: list[tuple[int, str, int, str]]) -> None: ...

    def submit_input(self, url: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Reuse:
    """What an incremental run reuses: the state store, and where stored copies are checked
    and, when gone, fetched again."""

    state: StateStore
    copies: Copies
    fetches: Fetches | None


def feed(
    manifest: Manifest,
    journal: Journal,
    reuse: Reuse | None,
    advanced: Callable[..., None],
    stop: threading.Event,
    notify: Callable[[Callable[[], None]], None],
) -> None:
    """Read the rest of the manifest into the journal (in a thread); `advanced(done=...)` is
    told, through `notify` (the event loop's thread), after each batch and at the end."""
    if journal.get_meta("ingest_complete") == "1":
        notify(lambda: advanced(done=True))
        return
    for batch in manifest.batches(start_row=journal.last_row() + 1):
        if stop.is_set():
            return
        prior = None
        if reuse is not None:
            found = reuse.state.lookup([i.fingerprint for i in batch if isinstance(i, JobSpec)])
            prior = reuse.copies.present(found)
        meta = {"ingested_rows": str(batch[-1].row_number)} if batch else {}
        fetch = journal.intake.ingest(batch, meta, prior)
        if reuse is not None and reuse.fetches is not None:
            if fetch:
                notify(functools.partial(reuse.fetches.submit_many, fetch))
            if prior:  # reused rows show their input in the report, as rows sent do
                shown = [
                    i.inputs["img_url"]
                    for i in batch
                    if isinstance(i, JobSpec) and i.fingerprint in prior and "img_url" in i.inputs
                ]
                notify(functools.partial(_thumbnails, reuse.fetches, shown))
        notify(advanced)
    journal.set_meta({"ingest_complete": "1"})
    notify(lambda: advanced(done=True))


def _thumbnails(fetches: Fetches, urls: list[str]) -> None:
    for url in urls:
        fetches.submit_input(url)


def reconcile(
    manifest: Manifest,
    journal: Journal,
    state: StateStore | None,
    identity: dict[str, str],
    copies: Copies,
) -> dict[str, int]:
    """`--force`: journal the whole manifest as it is now (see Journal.reconcile)."""
    found: Counter[str] = Counter()
    last = 0
    for batch in manifest.batches():
        prior = None
        if state is not None:
            found_prior = state.lookup([i.fingerprint for i in batch if isinstance(i, JobSpec)])
            prior = copies.present(found_prior)
        found += journal.intake.reconcile(batch, prior)
        last = batch[-1].row_number
    found += journal.intake.drop_unseen()
    journal.set_meta({**identity, "ingest_complete": "1", "ingested_rows": str(last)})
    _log.warning("forced", **found)
    return dict(found)
