"""A whole run: config and keys in, results out; the stages wired together under one task group.

Running a config on a run folder that already has a journal continues that run: finished rows
are kept, journaled predictions are polled again (never created again), and the rest is done.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Collection
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import structlog

from pipeline.core import (
    ENV_KEY,
    ENV_KEYS,
    KEPT_MANIFEST,
    ApiKey,
    ConfigError,
    ExitCode,
    JobSpec,
    ManifestError,
    NoUsableKeyError,
    RunConfig,
    RunFolderMismatch,
    RunStats,
    WanbatchError,
    copy_object,
    resolve_groups,
    sandbox_keys,
)
from pipeline.drive import Dispatcher, Engine, Workers, check_workers, open_engine
from pipeline.intake import Manifest
from pipeline.journal import CostBooks, Journal, StateStore
from pipeline.observe import Observer, Reporter
from pipeline.outputs import (
    THUMBS,
    CopyCheck,
    Downloader,
    ResultLayout,
    RunSummary,
    finish_line,
    open_store,
    write_failures,
    write_images,
    write_report,
    write_results,
    write_summary,
)
from pipeline.provider import Callbacks, Receiver
from pipeline.runs.folder import RunFolder

__all__ = ["OpenSandbox", "Reprocess", "run"]

# starts the embedded sandbox for a run (`pipeline.sandbox.open_embedded`): its base URL, the
# keys to use and its server (for its stats)
OpenSandbox = Callable[
    [RunConfig, list[ApiKey]], AbstractAsyncContextManager[tuple[str, list[ApiKey], Any]]
]

_log = structlog.get_logger("pipeline.runs.runner")


@dataclass(frozen=True, slots=True)
class Reprocess:
    """`wanbatch retry`: which failed rows to run again (`error_types` None: every failure)."""

    error_types: Collection[str] | None


def _identity(config: RunConfig) -> dict[str, str]:
    """What must not change between a run and its resume: the model and the row mapping,
    and the manifest file itself."""
    m = config.manifest
    mapping = json.dumps(
        {
            "model": config.api.model,
            "path": str(m.given or m.path),
            "id": m.id_column,
            "columns": m.columns,
            "defaults": m.defaults,
        },
        sort_keys=True,
        default=str,
    )
    stat = m.path.stat()
    return {
        "mapping": hashlib.sha256(mapping.encode()).hexdigest()[:16],
        "manifest_file": f"{stat.st_size}:{_file_digest(m.path)}",
    }


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def _check_identity(journal: Journal, config: RunConfig, force: bool) -> dict[str, str] | None:
    """The run's identity when `--force` must take the manifest as it is now (it or the
    mapping changed), to be journaled once that is done; None when nothing changed."""
    current = _identity(config)
    known = {name: journal.get_meta(name) for name in current}
    if all(value is None for value in known.values()):
        journal.set_meta(current)
        return None
    changed = [name for name, value in current.items() if known[name] != value]
    if changed and force:
        return current
    if changed:
        what = {
            "mapping": "the model or the manifest mapping in the config",
            "manifest_file": "manifest file",
        }
        raise RunFolderMismatch(
            f"run folder {config.output.dir} holds a run of another "
            + " and of another ".join(what[c] for c in changed)
            + "; resuming would mix results. Pass --force to continue with the manifest as it "
            "is now (finished rows are kept, unsent rows take their new inputs), --fresh to "
            "start over (every row is paid again), or use a new output.dir."
        )
    return None


def _reconcile(
    manifest: Manifest,
    journal: Journal,
    state: StateStore | None,
    identity: dict[str, str],
    options: dict[str, str],
) -> dict[str, int]:
    """`--force`: journal the whole manifest as it is now (see Journal.reconcile)."""
    found: Counter[str] = Counter()
    copies = CopyCheck(options)
    last = 0
    for batch in manifest.batches():
        prior = None
        if state is not None:
            found_prior = state.lookup([i.fingerprint for i in batch if isinstance(i, JobSpec)])
            prior = copies.present(found_prior)
        found += journal.reconcile(batch, prior)
        last = batch[-1].row_number
    found += journal.drop_unseen()
    journal.set_meta({**identity, "ingest_complete": "1", "ingested_rows": str(last)})
    _log.warning("forced", **found)
    return dict(found)


def _keep_manifest(config: RunConfig, run_dir: Path, force: bool) -> RunConfig:
    """A local manifest is copied into the run folder when the run starts (and again with
    --force), and the run reads the copy: a resume or a retry reads what the run started with,
    even after tonight's export replaced the file. An object URL's copy is made by
    `_copy_manifest`; a manifest given from Python is in the run folder already."""
    m = config.manifest
    if m.source is not None or m.path.parent == run_dir:
        return config
    kept = run_dir / f"{KEPT_MANIFEST}{m.path.suffix}"
    started = (run_dir / "journal.sqlite").exists()
    if m.path.is_file() and (force or not started or not kept.is_file()):
        tmp = kept.with_name(f".{kept.name}.tmp")
        try:
            shutil.copyfile(m.path, tmp)
            os.replace(tmp, kept)
        except OSError as exc:
            raise ManifestError(
                f"manifest {m.path} cannot be copied into {run_dir}: {exc}"
            ) from None
        finally:
            tmp.unlink(missing_ok=True)
    if not kept.is_file():
        return config  # nothing to read: the manifest's own check says so
    if started and not force and m.path.is_file() and _changed(m.path, kept):
        _log.warning(
            "manifest_changed",
            path=str(m.path),
            hint="this run goes on with the manifest it started with; --force takes the file "
            "as it is now, --fresh starts over",
        )
    section = m.model_copy(update={"path": kept, "given": m.path, "format": m.kind})
    return config.model_copy(update={"manifest": section})


def _changed(path: Path, kept: Path) -> bool:
    return path.stat().st_size != kept.stat().st_size or _file_digest(path) != _file_digest(kept)


def _copy_manifest(config: RunConfig, folder: RunFolder, force: bool) -> None:
    """A manifest given as an object URL is copied into the run folder when a run starts
    (and with --force, to take it as it is now); a resume reads the copy it started with."""
    m = config.manifest
    assert m.source is not None
    if m.path.exists() and not force and (folder.path / "journal.sqlite").exists():
        return
    try:
        copy_object(m.source, m.path, config.assets.storage_options)
    except FileNotFoundError:
        raise ManifestError(f"manifest {m.source} does not exist") from None
    except OSError as exc:
        raise ManifestError(f"manifest {m.source} cannot be read: {exc}") from None
    _log.info("manifest_copied", source=m.source, bytes=m.path.stat().st_size)


@asynccontextmanager
async def _api(
    config: RunConfig, keys: list[ApiKey], embedded: OpenSandbox | None
) -> AsyncIterator[tuple[str, list[ApiKey], Any]]:
    """The base URL and keys to use, and the embedded sandbox when the config asks for one
    (started by whoever composed the run: `wanbatch run` or `pipeline.run`)."""
    if not config.embedded_sandbox:
        yield config.api.base_url, keys, None
        return
    if embedded is None:
        raise ConfigError(
            "api.base_url: sandbox runs from `wanbatch run` or `pipeline.run()`, which start "
            "the embedded sandbox; give an API's URL to run from elsewhere"
        )
    async with embedded(config, keys) as (base_url, used, server):
        yield base_url, used, server


@asynccontextmanager
async def _receiver(config: RunConfig) -> AsyncIterator[Receiver | None]:
    """The webhook receiver when `webhook.enabled`; ConfigError if its port cannot be had."""
    if not config.webhook.enabled:
        yield None
        return
    async with Receiver(config.webhook, Callbacks(config.webhook.missed_callbacks)) as receiver:
        yield receiver


@dataclass(frozen=True, slots=True)
class _Reuse:
    """What an incremental run reuses: the state store, and where stored copies are checked
    and, when gone, fetched again."""

    state: StateStore
    copies: CopyCheck
    downloader: Downloader | None


def _ingest(
    manifest: Manifest,
    journal: Journal,
    reuse: _Reuse | None,
    dispatcher: Dispatcher,
    stop: threading.Event,
    notify: Callable[[Callable[[], None]], None],
) -> None:
    """Read the rest of the manifest into the journal (in a thread); with a state store, rows
    whose input already succeeded come in as reused, pointing at the earlier run's stored
    copies of their images (fetched again when a copy is gone)."""
    if journal.get_meta("ingest_complete") == "1":
        notify(lambda: dispatcher.ingest_advanced(done=True))
        return
    for batch in manifest.batches(start_row=journal.last_row() + 1):
        if stop.is_set():
            return
        prior = None
        if reuse is not None:
            found = reuse.state.lookup([i.fingerprint for i in batch if isinstance(i, JobSpec)])
            prior = reuse.copies.present(found)
        meta = {"ingested_rows": str(batch[-1].row_number)} if batch else {}
        fetch = journal.ingest(batch, meta, prior)
        if fetch and reuse is not None and reuse.downloader is not None:
            notify(functools.partial(reuse.downloader.submit_many, fetch))
        notify(dispatcher.ingest_advanced)
    journal.set_meta({"ingest_complete": "1"})
    notify(lambda: dispatcher.ingest_advanced(done=True))


@dataclass
class _Faults:
    """What went wrong once work began: the run stops creating and finishes its books."""

    ingest: BaseException | None = None
    drive: BaseException | None = None

    def describe(self) -> str | None:
        for where, exc in (("reading the manifest", self.ingest), ("the run", self.drive)):
            if exc is not None:
                return f"{where} failed: {_leaf(exc)}"
        return None


def _leaf(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup):  # task groups nest: find the error itself
        exc = exc.exceptions[0]
    return f"{exc}" if isinstance(exc, WanbatchError) else f"{type(exc).__name__}: {exc}"


async def _ingest_task(
    manifest: Manifest,
    journal: Journal,
    reuse: _Reuse | None,
    dispatcher: Dispatcher,
    stop: threading.Event,
    faults: _Faults,
) -> None:
    """The ingest in its thread. If it fails, no more creates are sent, and jobs already
    created are seen to their end: money was spent, so the books are finished."""
    try:
        await anyio.to_thread.run_sync(
            _ingest, manifest, journal, reuse, dispatcher, stop, anyio.from_thread.run_sync
        )
    except Exception as exc:  # noqa: BLE001 - whatever it was, the run must end cleanly
        _log.exception("ingest_failed")
        faults.ingest = exc
        dispatcher.stop()
        dispatcher.ingest_advanced(done=True)


async def run(
    config: RunConfig,
    keys: list[ApiKey],
    *,
    force: bool = False,
    fresh: bool = False,
    grace_s: float = 30.0,
    handle_signals: bool = True,
    reprocess: Reprocess | None = None,
    folder: RunFolder | None = None,
    reporter: Reporter | None = None,
    tick_s: float | None = None,
    workers: Workers | None = None,
    embedded: OpenSandbox | None = None,
) -> RunSummary:
    """Run (or resume) a config; with `reprocess`, first put the chosen failed rows back to be
    run again. Holds the run folder (`folder`, or one it opens) for the whole run. Raises
    ConfigError, ManifestError or RunFolderError before anything is sent; everything after that
    ends in a RunSummary, whatever fails."""
    if folder is None:
        with RunFolder(config.output.dir, fresh=fresh) as own:
            return await run(
                config,
                keys,
                force=force,
                grace_s=grace_s,
                handle_signals=handle_signals,
                reprocess=reprocess,
                folder=own,
                reporter=reporter,
                tick_s=tick_s,
                workers=workers,
                embedded=embedded,
            )
    started = time.monotonic()
    _check_before(config, keys, folder, reprocess, workers)
    config = await anyio.to_thread.run_sync(_keep_manifest, config, folder.path, force)
    manifest = await _open_manifest(config, folder, force)
    uploads = manifest.inputs.uploads if manifest.inputs is not None else None
    inc = config.incremental
    state = None
    try:
        if inc.enabled and inc.state is not None:
            state = StateStore(inc.state, hold=True)  # one run at a time: see StateStore
        journal = folder.open_journal()
        journal.share_seeded = config.manifest.dedupe
        if uploads is None and journal.has_uploads():
            journal.close()
            raise ConfigError(
                f"run folder {folder.path} holds unsent rows whose inputs were uploaded to "
                "assets.upload_to, which the config no longer names: set it again to resume"
            )
    except BaseException:
        if state is not None:
            state.close()
        _close_inputs(manifest)
        raise
    try:
        return await _run_held(
            config,
            keys,
            folder,
            journal,
            state,
            manifest,
            started,
            force,
            grace_s,
            handle_signals,
            reprocess,
            Observer(config, folder.path, started, RunStats(), reporter, tick_s),
            workers,
            embedded,
        )
    finally:
        journal.close()
        _close_inputs(manifest)
        if state is not None:
            state.close()


def _check_before(
    config: RunConfig,
    keys: list[ApiKey],
    folder: RunFolder,
    reprocess: Reprocess | None,
    workers: Workers | None,
) -> None:
    """What can be refused before reading anything: keys, key groups, a retry of nothing,
    workers without Ray or with webhooks."""
    if workers is not None:
        check_workers(workers, config)
    if not keys and not config.embedded_sandbox:
        raise ConfigError(f"no API key: set {ENV_KEY}, or several comma-separated in {ENV_KEYS}")
    made_up = [ApiKey(k) for k in sandbox_keys(config.sandbox.keys)]
    resolve_groups(config.limits.groups, keys or made_up)
    if reprocess is not None and not (folder.path / "journal.sqlite").exists():
        raise ConfigError(
            f"nothing to retry: {folder.path} holds no run (no journal.sqlite); "
            "run the config with `wanbatch run` first"
        )


async def _open_manifest(config: RunConfig, folder: RunFolder, force: bool) -> Manifest:
    """The manifest (copied first when it is an object URL), with its inputs' stage; the image
    store and the uploads' bucket checked before anything is sent."""
    if config.manifest.source is not None:
        await anyio.to_thread.run_sync(_copy_manifest, config, folder, force)
    manifest = Manifest(
        config.manifest, model=config.api.model, allow_loopback=config.allow_loopback_urls
    )
    if config.assets.download:
        await anyio.to_thread.run_sync(open_store(config.assets, config.output.dir).check)
    thumbs = config.output.dir / THUMBS
    await anyio.to_thread.run_sync(functools.partial(manifest.judge_inputs, config, thumbs=thumbs))
    return manifest


def _close_inputs(manifest: Manifest) -> None:
    if manifest.inputs is not None:
        manifest.inputs.close()


async def _run_held(
    config: RunConfig,
    keys: list[ApiKey],
    folder: RunFolder,
    journal: Journal,
    state: StateStore | None,
    manifest: Manifest,
    started: float,
    force: bool,
    grace_s: float,
    handle_signals: bool,
    reprocess: Reprocess | None,
    observer: Observer,
    workers: Workers | None,
    embedded: OpenSandbox | None,
) -> RunSummary:
    forced = None
    identity = _check_identity(journal, config, force)
    if identity is not None:
        forced = await anyio.to_thread.run_sync(
            _reconcile, manifest, journal, state, identity, config.assets.storage_options
        )
        folder.forget_results()
    requeued = None
    if reprocess is not None:
        requeued = journal.requeue(reprocess.error_types)
        _log.info("requeued", rows=sum(requeued.values()), by_type=requeued)
    # what a budget counts as spent: booked, and what lost creates may have been billed
    price = config.api.price_per_image_usd
    spent = journal.totals()["cost_usd"] + journal.cost_books().lost_spend_usd(price)
    stats = observer.stats
    faults = _Faults()
    observer.start(_start_line(config, folder.path, journal, keys))
    with observer.serving():
        async with _api(config, keys, embedded) as (base_url, lanes_keys, sandbox):
            drive = _Drive(
                config, journal, state, manifest, grace_s, handle_signals, faults, observer
            )
            async with (
                _receiver(config) as receiver,
                open_engine(
                    config, journal, manifest, base_url, lanes_keys, stats, spent, receiver, workers
                ) as engine,
            ):
                observer.view = engine.view
                stop = await _drive(drive, engine)
                worker_figures = engine.figures()
            sandbox_stats = sandbox.stats() if sandbox is not None else None
        books = await _finish_books(config, journal, state, manifest, folder.path)
        waiting = journal.waiting_on_keys()
        counts = journal.counts()
        books.cost = journal.cost_books()
        exit_code, message = _verdict(
            stop, faults, books, counts, waiting, lanes_keys, stats, price
        )
        if exit_code is not ExitCode.OK:
            _log.warning("run_ended", exit_code=int(exit_code), message=message)
        summary = _summary(
            folder, journal, books, counts, stats, started, exit_code, message, lanes_keys
        )
        summary.sandbox_stats, summary.requeued, summary.forced = sandbox_stats, requeued, forced
        summary.waiting_on_keys, summary.workers = waiting, worker_figures
        summary.cost = books.cost
        summary.possibly_billed_usd = books.cost.possibly_billed_usd(price)
        await observer.finish(journal, finish_line(summary))
    try:
        await anyio.to_thread.run_sync(write_summary, summary, config, folder.path / "summary.json")
    except OSError as exc:  # a full disk: the journal and the exit code still tell
        _log.warning("summary_not_written", error=str(exc))
    return summary


def _summary(
    folder: RunFolder,
    journal: Journal,
    books: _Books,
    counts: dict[str, int],
    stats: RunStats,
    started: float,
    exit_code: ExitCode,
    message: str,
    keys: list[ApiKey],
) -> RunSummary:
    return RunSummary(
        folder.path,
        folder.path / "results.parquet",
        books.failures,
        counts,
        journal.totals(),
        stats,
        time.monotonic() - started,
        exit_code,
        message,
        [k.name for k in keys],
        left_failed=journal.failed_types(),
        per_key=journal.by_key(),
        started_at=time.time() - (time.monotonic() - started),
        ended_at=time.time(),
    )


def _start_line(config: RunConfig, run_dir: Path, journal: Journal, keys: list[ApiKey]) -> str:
    m = config.manifest
    done = journal.counts()
    known = sum(done.values())
    resumed = f", resuming {known:,} journaled rows" if known else ""
    api = "the embedded sandbox" if config.embedded_sandbox else config.api.base_url
    return (
        f"run started in {run_dir}: manifest {m.source or m.given or m.path}, "
        f"{len(keys) or config.sandbox.keys} key(s) on {api}{resumed}"
    )


@dataclass
class _Books:
    failures: Path | None = None
    problem: str | None = None  # why results could not be written, or were written in part
    images_missing: int = 0  # outputs of succeeded jobs not stored (yet)
    cost: CostBooks | None = None


async def _finish_books(
    config: RunConfig,
    journal: Journal,
    state: StateStore | None,
    manifest: Manifest,
    run_dir: Path,
) -> _Books:
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
    books = _Books()
    try:
        await anyio.to_thread.run_sync(journal.settle_followers)
        if state is not None:
            await anyio.to_thread.run_sync(_remember, journal, state, run_dir)
        results_path = run_dir / "results.parquet"
        written = await anyio.to_thread.run_sync(write_results, journal, layout, results_path)
        if written.problem is not None:
            books.problem = (
                f"the manifest's own columns could not all be read again for the results "
                f"({written.problem}): some are empty"
            )
        books.failures = await anyio.to_thread.run_sync(write_failures, journal, layout, run_dir)
        images = run_dir / "images.parquet"
        price = config.api.price_per_image_usd
        await anyio.to_thread.run_sync(write_images, journal, layout, images, price)
        if config.assets.download:
            states = journal.image_states()
            books.images_missing = states.get("pending", 0) + states.get("failed", 0)
        try:
            id_column = config.manifest.id_column_name
            await anyio.to_thread.run_sync(write_report, journal, run_dir, id_column)
        except (OSError, ValueError):  # the results stand without it; `wanbatch report` redoes it
            _log.exception("report_failed")
    except Exception as exc:  # noqa: BLE001 - the journal holds every row: say so, do not crash
        _log.exception("results_failed")
        books.problem = (
            f"results could not be written in {run_dir} ({type(exc).__name__}: {exc}); "
            "the journal keeps every row: fix this and run the same command again to write them"
        )
    return books


def _unconfirmed(cost: CostBooks | None, price: float) -> str | None:
    """What the books cannot confirm, in words, or None when every job's end was seen."""
    if cost is None or not cost.unconfirmed:
        return None
    return (
        f"{cost.unconfirmed:,} jobs created were not seen to end at the provider: up to "
        f"${cost.possibly_billed_usd(price):,.2f} may be billed beyond the results' cost "
        "(results column `unconfirmed`); the same command polls those still journaled"
    )


def _verdict(
    stop: tuple[ExitCode, str],
    faults: _Faults,
    books: _Books,
    counts: dict[str, int],
    waiting: dict[str, int],
    keys: list[ApiKey],
    stats: RunStats,
    price: float,
) -> tuple[ExitCode, str]:
    """The exit code and its one-line explanation, the gravest first; a run that leaves jobs
    unconfirmed says so whatever its code."""
    unconfirmed = _unconfirmed(books.cost, price)
    code, message = _gravest(stop, faults, books, counts, waiting, keys, stats)
    if unconfirmed is None or code is ExitCode.KEYS_MISSING or faults.describe() is not None:
        return code, message  # those say what is left already
    if code in (ExitCode.OK, ExitCode.ROWS_FAILED):  # finished: the money question first
        also = f"; also {message}" if message else ""
        return ExitCode.UNCONFIRMED, f"finished, but {unconfirmed}{also}"
    return code, f"{message}. Also: {unconfirmed}"


def _gravest(
    stop: tuple[ExitCode, str],
    faults: _Faults,
    books: _Books,
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
            " rejected rows: see the failures manifest (`wanbatch retry` runs failed rows again)"
        )
    if books.images_missing:
        return ExitCode.ROWS_FAILED, (
            f"finished, but {books.images_missing:,} output images could not be downloaded and"
            " stored (see images.parquet, state failed): run the same command again to fetch"
            " them; nothing is created again"
        )
    return ExitCode.OK, ""


def _remember(journal: Journal, state: StateStore, run_dir: Path) -> None:
    """Write this run folder's successes into the state store, for the runs after it."""
    for batch in journal.new_successes(str(run_dir)):
        state.record(batch)


@dataclass(frozen=True, slots=True)
class _Drive:
    """What one drive works with, besides its engine."""

    config: RunConfig
    journal: Journal
    state: StateStore | None
    manifest: Manifest
    grace_s: float
    handle_signals: bool
    faults: _Faults
    observer: Observer


async def _drive(drive: _Drive, engine: Engine) -> tuple[ExitCode, str]:
    """Drive the keys until no work is left or the run is stopped; how it stopped. An
    unexpected error lands in `faults`, once the jobs it did not cut short have ended."""
    config, journal, state, faults = drive.config, drive.journal, drive.state, drive.faults
    dispatcher = engine.dispatcher
    stop_ingest = threading.Event()
    no_key: NoUsableKeyError | None = None
    try:
        try:
            async with anyio.create_task_group() as services:
                await services.start(engine.serve)
                services.start_soon(drive.observer.watch, journal)
                reuse = None
                if state is not None:
                    copies = CopyCheck(config.assets.storage_options)
                    reuse = _Reuse(state, copies, engine.downloader)
                services.start_soon(
                    _ingest_task, drive.manifest, journal, reuse, dispatcher, stop_ingest, faults
                )
                if config.budget.cancel_in_flight:
                    services.start_soon(_cancel_on_budget, dispatcher, engine)
                waiting = anyio.CancelScope()  # for downloads; a signal limits or ends it
                if drive.handle_signals:
                    watch = functools.partial(_watch_signals, downloads_wait=waiting)
                    services.start_soon(watch, dispatcher, engine, drive.grace_s)
                await engine.work()
                with waiting:  # images not stored by then stay pending, for the next run
                    await engine.stored()
                stop_ingest.set()
                services.cancel_scope.cancel()
        except* NoUsableKeyError as group:
            no_key = NoUsableKeyError(_leaf(group))
    except Exception as exc:  # noqa: BLE001 - a bug or a full disk: the books are still finished
        _log.exception("run_failed")
        faults.drive = exc
    finally:
        stop_ingest.set()
        await engine.aclose()
    return _stopped_by(config, dispatcher, no_key)


def _stopped_by(
    config: RunConfig, dispatcher: Dispatcher, no_key: NoUsableKeyError | None
) -> tuple[ExitCode, str]:
    if no_key is not None:
        return ExitCode.NO_KEY, str(no_key)
    if dispatcher.budget_reached:
        return ExitCode.BUDGET, (
            f"budget.max_cost_usd ({config.budget.max_cost_usd:g}) reached; "
            "unsent rows are kept: raise the budget and run again"
        )
    if dispatcher.halted:
        return ExitCode.INTERRUPTED, "stopped by a signal; run the same command again to resume"
    return ExitCode.OK, ""


async def _cancel_on_budget(dispatcher: Dispatcher, engine: Engine) -> None:
    """budget.cancel_in_flight: once no more jobs fit the budget, the jobs in flight are
    cancelled at the provider; each then ends `cancelled`, billed nothing."""
    await dispatcher.budget_hit.wait()
    await engine.cancel_in_flight()


async def _watch_signals(
    dispatcher: Dispatcher, engine: Engine, grace_s: float, *, downloads_wait: anyio.CancelScope
) -> None:
    """First SIGINT/SIGTERM: no new creates, jobs in flight and the downloads get `grace_s` to
    end. Second: stop now, cancel the jobs in flight at the provider, and end the downloads."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            if not dispatcher.stopped:
                _log.warning("stopping", signal=signal.Signals(signum).name, grace_s=grace_s)
                dispatcher.stop()
                engine.limit(grace_s)
                until = anyio.current_time() + grace_s
                downloads_wait.deadline = min(downloads_wait.deadline, until)
            else:
                _log.warning("stopping_now", signal=signal.Signals(signum).name)
                engine.abandon()  # the jobs in flight are cancelled at the provider
                downloads_wait.cancel()
