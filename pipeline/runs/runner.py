"""A whole run: config and keys in, results out; the stages wired together under one task group.

Running a config on a run folder that already has a journal continues that run: finished rows
are kept, journaled predictions are polled again (never created again), and the rest is done.
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator, Callable, Collection
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import structlog

from pipeline.checks import CheckStage
from pipeline.core import (
    ENV_KEY,
    ENV_KEYS,
    JOURNAL,
    RESULTS,
    SUMMARY,
    THUMBS,
    ApiKey,
    ConfigError,
    ExitCode,
    RunConfig,
    RunStats,
    plan_run,
    resolve_groups,
    run_stats,
    sandbox_keys,
    timings,
)
from pipeline.drive import Workers, check_workers, open_engine
from pipeline.intake import Manifest, reconcile
from pipeline.journal import Journal, StateStore
from pipeline.observe import Observer, Reporter
from pipeline.outputs import (
    Asked,
    CopyCheck,
    RunSummary,
    finish_line,
    open_store,
    write_summary,
)
from pipeline.provider import Callbacks, Receiver, read_balance
from pipeline.runs.driving import Drive, drive_keys
from pipeline.runs.estimates import estimate
from pipeline.runs.folder import RunFolder
from pipeline.runs.identity import check_identity, copy_manifest, keep_manifest, shaped
from pipeline.runs.regenerate import regenerate
from pipeline.runs.review import apply_decisions, approve_passing
from pipeline.runs.verdict import Books, Faults, finish_books, verdict

__all__ = ["OpenSandbox", "Reprocess", "run"]

# starts the embedded sandbox for a run (`pipeline.sandbox.open_embedded`): its base URL, the
# keys to use and its server (for its stats)
OpenSandbox = Callable[
    [RunConfig, list[ApiKey]], AbstractAsyncContextManager[tuple[str, list[ApiKey], Any]]
]

_log = structlog.get_logger("pipeline.runs.runner")


@dataclass(frozen=True, slots=True)
class Reprocess:
    """`wanbatch retry`: which failed rows to run again (`error_types` None: every failure,
    empty: none), a reviewer's decisions file whose rejected edits are made again, and
    whether the edits that passed every check are approved."""

    error_types: Collection[str] | None
    decisions: Path | None = None
    approve_passing: bool = False  # approve every undecided edit that passed the checks


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
async def _receiver(config: RunConfig, stats: RunStats) -> AsyncIterator[Receiver | None]:
    """The webhook receiver when `webhook.enabled`, counting in `stats.callbacks`;
    ConfigError if its port cannot be had."""
    if not config.webhook.enabled:
        yield None
        return
    callbacks = Callbacks(config.webhook.missed_callbacks, stats=stats.callbacks)
    async with Receiver(config.webhook, callbacks) as receiver:
        yield receiver


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
    config = await anyio.to_thread.run_sync(keep_manifest, config, folder.path, force)
    if config.manifest.source is not None:
        await anyio.to_thread.run_sync(copy_manifest, config, folder, force)
    config = await anyio.to_thread.run_sync(functools.partial(shaped, config, folder, force))
    manifest = await _open_manifest(config)
    uploads = manifest.inputs.uploads if manifest.inputs is not None else None
    inc = config.incremental
    state = None
    try:
        if inc.enabled and inc.state is not None:
            state = StateStore(inc.state, hold=True)  # one run at a time: see StateStore
        journal = folder.open_journal(share_seeded=config.manifest.dedupe)
        if uploads is None and journal.reports.has_uploads():
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
            Observer(
                config.metrics,
                config.progress,
                folder.path,
                started,
                run_stats(webhook=config.webhook.enabled, download=config.assets.download),
                reporter,
                tick_s,
            ),
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
    if reprocess is not None and not (folder.path / JOURNAL).exists():
        raise ConfigError(
            f"nothing to retry: {folder.path} holds no run (no {JOURNAL}); "
            "run the config with `wanbatch run` first"
        )


async def _open_manifest(config: RunConfig) -> Manifest:
    """The manifest, with its inputs' stage; the image store and the uploads' bucket checked
    before anything is sent."""
    manifest = Manifest(
        config.manifest, model=config.api.model, allow_loopback=config.allow_loopback_urls
    )
    if config.assets.download:
        await anyio.to_thread.run_sync(open_store(config.assets, config.output.dir).check)
    thumbs = config.output.dir / THUMBS
    await anyio.to_thread.run_sync(
        functools.partial(manifest.judge_inputs, config.assets, thumbs=thumbs)
    )
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
    decisions = reprocess.decisions if reprocess is not None else None
    identity = check_identity(journal, config, force, remap=decisions is not None)
    if identity is not None:
        forced = await anyio.to_thread.run_sync(
            reconcile,
            manifest,
            journal,
            state,
            identity,
            CopyCheck(config.assets.storage_options),
        )
        folder.forget_results()
    requeued = None
    if decisions is not None:
        apply_decisions(config, journal, state, manifest, decisions)
    if reprocess is not None and (reprocess.error_types is None or reprocess.error_types):
        requeued = journal.reports.requeue(reprocess.error_types)
        _log.info("requeued", rows=sum(requeued.values()), by_type=requeued)
    price = config.api.price_per_image_usd
    stats = observer.stats
    faults = Faults()
    observer.start(_start_line(config, folder.path, journal, keys))
    with observer.serving():
        async with _api(config, keys, embedded) as (base_url, lanes_keys, sandbox):
            drive = Drive(
                config, journal, state, manifest, grace_s, handle_signals, faults, observer
            )
            stop, balance, worker_figures = await _drive_rounds(
                drive, base_url, lanes_keys, workers
            )
            sandbox_stats = sandbox.stats() if sandbox is not None else None
        if reprocess is not None and reprocess.approve_passing:
            await anyio.to_thread.run_sync(approve_passing, journal, state)
        books = await finish_books(config, journal, state, manifest, folder.path)
        waiting = journal.reports.waiting_on_keys()
        counts = journal.reports.counts()
        exit_code, message = verdict(stop, faults, books, counts, waiting, lanes_keys, stats, price)
        if exit_code is not ExitCode.OK:
            _log.warning("run_ended", exit_code=int(exit_code), message=message)
        summary = _summary(
            folder,
            journal,
            books,
            counts,
            stats,
            started,
            (exit_code, message),
            lanes_keys,
            _Also(sandbox_stats, requeued, forced, waiting, worker_figures, balance.usd, price),
        )
        await observer.finish(journal, finish_line(summary))
    try:
        asked = Asked(config.limits, timings(config).window_s, config.digest())
        await anyio.to_thread.run_sync(write_summary, summary, asked, folder.path / SUMMARY)
    except OSError as exc:  # a full disk: the journal and the exit code still tell
        _log.warning("summary_not_written", error=str(exc))
    return summary


async def _drive_rounds(
    drive: Drive,
    base_url: str,
    keys: list[ApiKey],
    workers: Workers | None,
) -> tuple[tuple[ExitCode, str], _Balance, list[dict[str, Any]]]:
    """Drive the rows to their ends and measure the stored edits; with checks.regenerate, the
    edits that failed a check are put back and driven again, round after round, until none
    is left to make again, or the run stops (a signal, the budget)."""
    config, journal, stats = drive.config, drive.journal, drive.observer.stats
    price = config.api.price_per_image_usd
    samples = base_url.removesuffix("/v1") if config.embedded_sandbox else None
    checker = CheckStage(
        config.checks.thresholds(),
        config.output.dir,
        config.assets.storage_options,
        image_scale=config.image_scale,
        samples_from=samples,
        largest=config.assets.max_bytes,
    )
    balance = _Balance(None)
    stop: tuple[ExitCode, str] = (ExitCode.OK, "")
    figures: list[dict[str, Any]] = []
    # each round is planned with what was spent before it (earlier runs, earlier rounds)
    plan = plan_run(config, keys, spent_usd=_spent(journal, price))
    async with _receiver(config, stats) as receiver:
        for round_ in range(config.checks.regenerate + 1):
            async with open_engine(
                config, plan, journal, drive.manifest, base_url, stats, receiver, workers
            ) as engine:
                if round_ == 0:
                    balance = await _balance_before(config, journal, base_url, keys)
                    if balance.short is not None:  # budget.require_balance: nothing is created
                        engine.dispatcher.stop_creates("balance", balance.short)
                stop = await drive_keys(drive, engine)
                figures = engine.figures()
            if config.assets.download and stop[0] is not ExitCode.INTERRUPTED:
                # a stopped run is not held for them: its next run measures them
                await anyio.to_thread.run_sync(checker.run, journal)
            if stop[0] is not ExitCode.OK or drive.faults.describe() is not None:
                break
            plan = plan_run(config, keys, spent_usd=_spent(journal, price))
            room = plan.budget.left_usd  # what the remakes may cost
            again = functools.partial(
                regenerate, config, journal, drive.state, drive.manifest, room, round_ == 0
            )
            if not await anyio.to_thread.run_sync(again):
                break
    return stop, balance, figures


def _spent(journal: Journal, price: float) -> float:
    """What a budget counts as spent: booked, and what lost creates may have been billed."""
    return float(
        journal.reports.totals()["cost_usd"]
    ) + journal.reports.cost_books().lost_spend_usd(price)


@dataclass(frozen=True, slots=True)
class _Balance:
    """The organisation's balance when the run started (None where the provider does not tell
    it), and why the run may not create (budget.require_balance), if it may not."""

    usd: float | None
    short: str | None = None


async def _balance_before(
    config: RunConfig, journal: Journal, base_url: str, keys: list[ApiKey]
) -> _Balance:
    """The balance as the provider tells it; with budget.require_balance, judged against the
    run's estimate (the whole manifest, less what this folder has spent already)."""
    if not keys:
        return _Balance(None)
    api = config.api
    usd = await read_balance(base_url, api.model, keys[0], auth=api.auth)
    if usd is None:
        if config.budget.require_balance:
            hint = "budget.require_balance: the provider does not tell it; the run goes on"
            _log.warning("balance_unknown", hint=hint)
        return _Balance(None)
    _log.info("balance", usd=usd)
    if not config.budget.require_balance:
        return _Balance(usd)
    found = await anyio.to_thread.run_sync(estimate, config, len(keys))
    needed = max(0.0, found.cost_usd - journal.reports.totals()["cost_usd"])
    if needed <= usd:
        return _Balance(usd)
    said = f"${usd:,.2f} left, less than this run's estimate of ${needed:,.2f}"
    said += " (budget.require_balance)"
    return _Balance(usd, said)


@dataclass(frozen=True, slots=True)
class _Also:
    """What a run's summary holds besides the journal's books: the sandbox's figures, what a
    retry or --force did, the jobs waiting on keys, the workers, the balance, the price."""

    sandbox_stats: dict[str, Any] | None
    requeued: dict[str, int] | None
    forced: dict[str, int] | None
    waiting: dict[str, int]
    workers: list[dict[str, Any]]
    balance_usd: float | None
    price: float


def _summary(
    folder: RunFolder,
    journal: Journal,
    books: Books,
    counts: dict[str, int],
    stats: RunStats,
    started: float,
    ended: tuple[ExitCode, str],
    keys: list[ApiKey],
    also: _Also,
) -> RunSummary:
    """The run's summary, built whole."""
    assert books.cost is not None
    return RunSummary(
        folder.path,
        folder.path / RESULTS,
        books.failures,
        counts,
        journal.reports.totals(),
        stats,
        time.monotonic() - started,
        ended[0],
        ended[1],
        [k.name for k in keys],
        sandbox_stats=also.sandbox_stats,
        requeued=also.requeued,
        workers=also.workers,
        per_key=journal.reports.by_key(),
        left_failed=books.failed_by_type,
        forced=also.forced,
        waiting_on_keys=also.waiting,
        started_at=time.time() - (time.monotonic() - started),
        ended_at=time.time(),
        cost=books.cost,
        possibly_billed_usd=books.cost.possibly_billed_usd(also.price),
        orphans=_orphans(journal, stats),
        balance_usd=also.balance_usd,
        removed=books.removed,
        reviews=journal.reviews.review_counts(),
        checks=journal.checks.check_counts(),
    )


def _orphans(journal: Journal, stats: RunStats) -> list[dict[str, Any]]:
    """The executions seen near lost creates that no row's job is, by the run's end."""
    seen = stats.orphan_candidates
    claimed = journal.known_predictions(seen)
    return [seen[pid] for pid in sorted(seen) if pid not in claimed]


def _start_line(config: RunConfig, run_dir: Path, journal: Journal, keys: list[ApiKey]) -> str:
    m = config.manifest
    done = journal.reports.counts()
    known = sum(done.values())
    resumed = f", resuming {known:,} journaled rows" if known else ""
    api = "the embedded sandbox" if config.embedded_sandbox else config.api.base_url
    return (
        f"run started in {run_dir}: manifest {m.source or m.given or m.path}, "
        f"{len(keys) or config.sandbox.keys} key(s) on {api}{resumed}"
    )
