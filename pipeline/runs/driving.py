"""Driving the keys: the engine with its services, the manifest read into the journal beside
it, the budget's cancel and the signals, until no work is left or the run is stopped."""

from __future__ import annotations

import functools
import signal
import threading
from dataclasses import dataclass

import anyio
import structlog

from pipeline.core import (
    ExitCode,
    NoUsableKeyError,
    RunConfig,
)
from pipeline.drive import Dispatcher, Engine
from pipeline.intake import Manifest, Reuse, feed
from pipeline.journal import Journal, StateStore
from pipeline.observe import Observer
from pipeline.outputs import (
    CopyCheck,
)
from pipeline.runs.verdict import Faults, leaf, stopped_by

_log = structlog.get_logger("pipeline.runs.runner")


async def ingest_task(
    manifest: Manifest,
    journal: Journal,
    reuse: Reuse | None,
    dispatcher: Dispatcher,
    stop: threading.Event,
    faults: Faults,
) -> None:
    """The ingest in its thread. If it fails, no more creates are sent, and jobs already
    created are seen to their end: money was spent, so the books are finished."""
    try:
        await anyio.to_thread.run_sync(
            feed,
            manifest,
            journal,
            reuse,
            dispatcher.ingest_advanced,
            stop,
            anyio.from_thread.run_sync,
        )
    except Exception as exc:  # noqa: BLE001 - whatever it was, the run must end cleanly
        _log.exception("ingest_failed")
        faults.ingest_failed(exc)
        dispatcher.stop()
        dispatcher.ingest_advanced(done=True)


@dataclass(frozen=True, slots=True)
class Drive:
    """What one drive works with, besides its engine."""

    config: RunConfig
    journal: Journal
    state: StateStore | None
    manifest: Manifest
    grace_s: float
    handle_signals: bool
    faults: Faults
    observer: Observer


async def drive_keys(drive: Drive, engine: Engine) -> tuple[ExitCode, str]:
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
                services.start_soon(drive.observer.watch, journal, engine.view)
                reuse = None
                if state is not None:
                    copies = CopyCheck(config.assets.storage_options)
                    reuse = Reuse(state, copies, engine.downloader)
                services.start_soon(
                    ingest_task, drive.manifest, journal, reuse, dispatcher, stop_ingest, faults
                )
                if config.budget.cancel_in_flight:
                    services.start_soon(cancel_on_budget, dispatcher, engine)
                waiting = anyio.CancelScope()  # for downloads; a signal limits or ends it
                if drive.handle_signals:
                    watch = functools.partial(watch_signals, downloads_wait=waiting)
                    services.start_soon(watch, dispatcher, engine, drive.grace_s)
                await engine.work()
                with waiting:  # images not stored by then stay pending, for the next run
                    await engine.stored()
                stop_ingest.set()
                services.cancel_scope.cancel()
        except* NoUsableKeyError as group:
            no_key = NoUsableKeyError(leaf(group))
    except Exception as exc:  # noqa: BLE001 - a bug or a full disk: the books are still finished
        _log.exception("run_failed")
        faults.drive_failed(exc)
    finally:
        stop_ingest.set()
        await engine.aclose()
    return stopped_by(config, dispatcher, no_key or dispatcher.no_key)


async def cancel_on_budget(dispatcher: Dispatcher, engine: Engine) -> None:
    """budget.cancel_in_flight: once no more jobs fit the budget, the jobs in flight are
    cancelled at the provider; each then ends `cancelled`, billed nothing."""
    await dispatcher.budget_hit.wait()
    await engine.cancel_in_flight()


async def watch_signals(
    dispatcher: Dispatcher, engine: Engine, grace_s: float, *, downloads_wait: anyio.CancelScope
) -> None:
    """First SIGINT/SIGTERM: no new creates, jobs in flight and the downloads get `grace_s` to
    end. Second: stop now, cancel the jobs in flight at the provider, and end the downloads."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            if not dispatcher.stopped:
                _log.warning(
                    "stopping",
                    signal=signal.Signals(signum).name,
                    grace_s=grace_s,
                    said=f"stopping: no new jobs are sent; the jobs in flight get {grace_s:g} s to "
                    "end, then the books are written and the same command resumes the rest. "
                    "Press Ctrl-C again to stop now (the jobs in flight are then cancelled at the "
                    "provider).",
                )
                dispatcher.stop()
                engine.limit(grace_s)
                until = anyio.current_time() + grace_s
                downloads_wait.deadline = min(downloads_wait.deadline, until)
            else:
                _log.warning(
                    "stopping_now",
                    signal=signal.Signals(signum).name,
                    said="stopping now: the jobs in flight are being cancelled at the provider and "
                    "their ends confirmed; then the books are written. Run the same command again "
                    "to resume.",
                )
                engine.abandon()  # the jobs in flight are cancelled at the provider
                downloads_wait.cancel()
