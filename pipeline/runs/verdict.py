"""How a run ended: its books finished (results, images, failures, report, summary), and the
exit code and message a scheduler acts on, the gravest cause first."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import structlog

from pipeline.core import (
    ENV_KEYS,
    REMOVED,
    TRANSIENT_ERRORS,
    ApiKey,
    ExitCode,
    NoUsableKeyError,
    RunConfig,
    RunStats,
    WanbatchError,
)
from pipeline.drive import Dispatcher
from pipeline.intake import Manifest
from pipeline.journal import CostBooks, Journal, StateStore
from pipeline.outputs import (
    ResultLayout,
    write_outputs,
    write_removed,
)

_log = structlog.get_logger("pipeline.runs.runner")


@dataclass
class Faults:
    """What went wrong once work began: the run stops creating and finishes its books."""

    ingest: BaseException | None = None
    drive: BaseException | None = None

    def ingest_failed(self, exc: BaseException) -> None:
        self.ingest = exc

    def drive_failed(self, exc: BaseException) -> None:
        self.drive = exc

    def describe(self) -> str | None:
        for where, exc in (("reading the manifest", self.ingest), ("the run", self.drive)):
            if exc is not None:
                return f"{where} failed: {leaf(exc)}"
        return None


def leaf(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup):  # task groups nest: find the error itself
        exc = exc.exceptions[0]
    return f"{exc}" if isinstance(exc, WanbatchError) else f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class Books:
    """How the run's books were finished: what was written, what could not be, and the costs
    and failures as the journal holds them at the end."""

    failures: Path | None = None
    problem: str | None = None  # why results could not be written, or were written in part
    images_missing: int = 0  # outputs of succeeded jobs not stored (yet)
    cost: CostBooks | None = None
    failed_by_type: dict[str, int] = field(default_factory=dict)  # failed rows, per error type
    run_dir: Path | None = None
    removed: int | None = None  # products an earlier night had and this one has not


async def finish_books(
    config: RunConfig,
    journal: Journal,
    state: StateStore | None,
    manifest: Manifest,
    run_dir: Path,
) -> Books:
    """The state store, results and failures manifest, from the journal. A failure here loses
    nothing (the journal holds every row) and is reported, not raised."""
    layout = ResultLayout(
        config.manifest.id_column_name,
        manifest.mapper.columns,
        manifest.extra_columns,
        manifest.columns,
        manifest.kind,
        manifest.path,
    )
    removed: int | None = None
    failures: Path | None = None
    problem: str | None = None
    missing = 0
    try:
        await anyio.to_thread.run_sync(journal.intake.settle_followers)
        if state is not None:
            removed = await anyio.to_thread.run_sync(remember, journal, state, run_dir)
        price = config.api.price_per_image_usd
        wrote = await anyio.to_thread.run_sync(
            write_outputs, journal, layout, run_dir, price, config.report.columns
        )
        failures, problem = wrote.failures, wrote.problem
        if config.assets.download:
            states = journal.reports.image_states()
            missing = states.get("pending", 0) + states.get("failed", 0)
    except Exception as exc:  # noqa: BLE001 - the journal holds every row: say so, do not crash
        _log.exception("results_failed")
        problem = (
            f"results could not be written in {run_dir} ({type(exc).__name__}: {exc}); "
            "the journal keeps every row: fix this and run the same command again to write them"
        )
    return Books(
        failures=failures,
        problem=problem,
        images_missing=missing,
        cost=journal.reports.cost_books(),
        failed_by_type=journal.reports.failed_types(),
        run_dir=run_dir,
        removed=removed,
    )


def unconfirmed_line(cost: CostBooks | None, price: float) -> str | None:
    """What the books cannot confirm, in words, or None when every job's end was seen."""
    if cost is None or not cost.unconfirmed:
        return None
    return (
        f"{cost.unconfirmed:,} jobs created were not seen to end at the provider: up to "
        f"${cost.possibly_billed_usd(price):,.2f} may be billed beyond the results' cost "
        "(results column `unconfirmed`); the same command polls those still journaled"
    )


def verdict(
    stop: tuple[ExitCode, str],
    faults: Faults,
    books: Books,
    counts: dict[str, int],
    waiting: dict[str, int],
    keys: list[ApiKey],
    stats: RunStats,
    price: float,
) -> tuple[ExitCode, str]:
    """The exit code and its one-line explanation, the gravest first; a run that leaves jobs
    unconfirmed says so whatever its code."""
    unconfirmed = unconfirmed_line(books.cost, price)
    code, message = gravest(stop, faults, books, counts, waiting, keys, stats)
    if unconfirmed is None or code is ExitCode.KEYS_MISSING or faults.describe() is not None:
        return code, message  # those say what is left already
    if code in (ExitCode.OK, ExitCode.ROWS_FAILED):  # finished: the money question first
        also = f"; also {message}" if message else ""
        return ExitCode.UNCONFIRMED, f"finished, but {unconfirmed}{also}"
    return code, f"{message}. Also: {unconfirmed}"


def gravest(
    stop: tuple[ExitCode, str],
    faults: Faults,
    books: Books,
    counts: dict[str, int],
    waiting: dict[str, int],
    keys: list[ApiKey],
    stats: RunStats,
) -> tuple[ExitCode, str]:
    fault = faults.describe()
    if fault is not None:
        open_jobs = books.cost.unconfirmed if books.cost is not None else 0
        seen = (
            "jobs already created were seen to their end"
            if not open_jobs
            else f"{open_jobs:,} jobs created were not seen to end and stay journaled"
        )
        return ExitCode.ERROR, (
            f"{fault}; no more creates were sent, {seen}, and results hold every row read so "
            "far. Fix it and run the same command again to resume"
            + (f". Also: {books.problem}" if books.problem else "")
        )
    if stop[0] is not ExitCode.OK:
        return stop
    if books.problem is not None:
        return ExitCode.ERROR, books.problem
    usable = {k.name for k in keys} - set(stats.retired_keys)
    missing = {k: n for k, n in waiting.items() if k not in usable}
    if missing:
        named = ", ".join(f"{k} ({n:,} rows)" for k, n in sorted(missing.items()))
        return ExitCode.KEYS_MISSING, (
            f"{sum(missing.values()):,} rows wait on jobs created with keys this run could not "
            f"use: {named}. Only the key that created a job can see it end: set those keys in "
            f"{ENV_KEYS} and run the same command again to finish them"
        )
    if counts.get("failed", 0) or counts.get("rejected", 0):
        return ExitCode.ROWS_FAILED, (
            f"finished with {counts.get('failed', 0):,} failed and {counts.get('rejected', 0):,}"
            " rejected rows: see the failures manifest" + retry_advice(books)
        )
    if books.images_missing:
        return ExitCode.ROWS_FAILED, (
            f"finished, but {books.images_missing:,} output images could not be downloaded and"
            " stored (see images.parquet, state failed): run the same command again to fetch"
            " them; nothing is created again"
        )
    return ExitCode.OK, ""


def retry_advice(books: Books) -> str:
    """The exact command for each kind of failure: `wanbatch retry RUN` runs the transient
    ones, `--errors` names the others; rejected rows are fixed in the failures manifest."""
    run = str(books.run_dir) if books.run_dir is not None else "RUN_DIR"
    by_type = books.failed_by_type
    transient = {t: n for t, n in by_type.items() if t in TRANSIENT_ERRORS}
    other = {t: n for t, n in by_type.items() if t not in TRANSIENT_ERRORS}

    def named(types: dict[str, int]) -> str:
        return ", ".join(f"{t} {n:,}" for t, n in sorted(types.items()))

    said = []
    if transient:
        said.append(
            f"`wanbatch retry {run}` runs the transient failures again ({named(transient)})"
        )
    if other:
        said.append(
            f"`wanbatch retry {run} --errors {','.join(sorted(other))}` runs {named(other)}"
        )
    return "; " + "; ".join(said) if said else ""


def remember(journal: Journal, state: StateStore, run_dir: Path) -> int | None:
    """Write this run folder's successes into the state store, for the runs after it; once
    the whole manifest is read, its products too, and those an earlier night had that this one
    has not are listed in `removed.csv`: how many (None before the manifest is all read)."""
    for batch in journal.reports.new_successes(str(run_dir)):
        state.record(batch)
    run_id = journal.get_meta("run_id")
    if journal.get_meta("ingest_complete") != "1" or run_id is None:
        return None
    now = time.time()
    for rows in journal.reports.catalog_rows():
        state.present(run_id, [(j, str(run_dir), s, p, r, path, now) for j, s, p, r, path in rows])
    gone = state.removed(run_id)
    write_removed(gone, run_dir / REMOVED)
    return len(gone)


def stopped_by(
    config: RunConfig, dispatcher: Dispatcher, no_key: NoUsableKeyError | None
) -> tuple[ExitCode, str]:
    if no_key is not None:
        return ExitCode.NO_KEY, str(no_key)
    if dispatcher.creates_stopped is not None:
        cause, said = dispatcher.creates_stopped
        if cause == "balance":
            return ExitCode.BALANCE, (
                f"the organisation's balance at the provider is short ({said}); no more "
                "creates were sent, the jobs already created were polled to their end, and no "
                "row was failed for it. Top up the balance and run the same command again to "
                "go on"
            )
        return ExitCode.PROVIDER_DOWN, (
            f"the provider stayed unreachable ({said}); no more creates were sent and the "
            "unsent rows are kept unsent, not failed. Run the same command again once it is "
            "back to go on"
        )
    if dispatcher.budget_reached:
        return ExitCode.BUDGET, (
            f"budget.max_cost_usd ({config.budget.max_cost_usd:g}) reached; "
            "unsent rows are kept: raise the budget and run again"
        )
    if dispatcher.halted:
        return ExitCode.INTERRUPTED, "stopped by a signal; run the same command again to resume"
    return ExitCode.OK, ""
