"""The key side of a run, built one way wherever it runs: the HTTP client, the poll planner,
one lane per key (its create gate, seeded with the creates the provider's window may still
hold, and its in-flight cap), the key driver that drives them, and the downloader that keeps the
images. The driver's process builds it for a local run; each Ray worker builds it for the
keys it owns.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.core import ApiKey, RunConfig, RunStats, SystemClock, ThumbSink, Timings
from pipeline.drive.dispatcher import JobSource
from pipeline.drive.driver import KeyDriver
from pipeline.drive.flight import InFlight
from pipeline.drive.lanes import KeyLane
from pipeline.drive.settings import DriverSettings, Webhook
from pipeline.intake import Uploads
from pipeline.journal import Commits
from pipeline.outputs import Downloader, open_store
from pipeline.provider import (
    Callbacks,
    CreateGate,
    EachlabsClient,
    PollPlanner,
    Receiver,
    RetryPolicy,
    caps_for,
)

__all__ = ["KeySide", "assemble", "downloader", "driver_settings"]

_SWEEP_SPAN = 1.6  # a key's listing reads, apart, in mean notice delays aimed at


@dataclass
class KeySide:
    client: EachlabsClient
    driver: KeyDriver
    lanes: list[KeyLane]


def _planner(config: RunConfig, t: Timings, flight: InFlight) -> PollPlanner:
    p = config.polling
    return PollPlanner(
        expected_latency=t.expected_latency_s,
        target_delay=t.target_delay_s,
        min_interval=t.min_interval_s,
        max_interval=t.max_interval_s,
        polls_per_job=p.polls_per_job,
        delay_fraction=p.delay_fraction,
        running=flight.ages,  # the jobs still running are lower bounds on latency
    )


def _client(config: RunConfig, base_url: str, keys: int) -> EachlabsClient:
    """The provider's client, with a connection for each slot of `keys` keys."""
    api = config.api
    return EachlabsClient(
        base_url,
        api.model,
        connect_timeout=api.connect_timeout_s,
        read_timeout=api.read_timeout_s,
        max_connections=config.limits.max_concurrent * keys + 4,
        http2=api.http2,
        auth=api.auth,
        fallback_selector=api.fallback_selector,
    )


def driver_settings(config: RunConfig, t: Timings) -> DriverSettings:
    """What the key driver takes of the config, every duration on the run's clock (`t`)."""
    r, p = config.retries, config.polling
    grace = t.cancel_grace_s
    return DriverSettings(
        policy=RetryPolicy(
            r.max_attempts,
            t.backoff_initial_s,
            t.backoff_max_s,
            t.retry_after_max_s,
        ),
        job_timeout=t.job_timeout_s,
        cancel_grace=grace,
        # at most about ten polls in a cancel's grace
        confirm_every=max(t.min_interval_s, grace / 10),
        fallback_after=t.fallback_after_s,
        fallback_interval=t.fallback_interval_s,
        price_per_image_usd=config.api.price_per_image_usd,
        creates_per_window=config.limits.creates_per_window,
        ambiguous_creates=r.ambiguous_creates,
        timeout_text=f"{p.job_timeout_s:g} s (polling.job_timeout_s)",
        # the aim is a mean notice delay of delay_fraction of the latency: a read every 1.6
        # of it, so an end waits 0.8 of the aim for the next read on average, and the rest
        # goes to the round trips of the read and of the confirming poll; with
        # delay_fraction null, the poll budget less two (the confirming poll, and a
        # fallback) spread over the slots
        sweep_share=_SWEEP_SPAN * p.delay_fraction
        if p.delay_fraction is not None
        else 1 / (config.limits.max_concurrent * max(1.0, p.polls_per_job - 2)),
        sweep_floor=t.min_interval_s,
        resolve_lost=p.listing,
        lost_settle=t.lost_create_settle_s,
        lost_patience=t.lost_create_patience_s,
        outage_after=t.outage_after_s,
        outage_patience=t.outage_patience_s,
        answer_within=config.api.read_timeout_s,
        clock_skew=r.lost_create_skew_s,
    )


def assemble(
    config: RunConfig,
    timings: Timings,
    base_url: str,
    keys: list[ApiKey],
    groups: list[list[str]],
    commit: Commits,
    source: JobSource,
    stats: RunStats,
    recent: dict[str, list[float]],
    *,
    receiver: Receiver | None = None,
    thumbs: ThumbSink | None = None,
    uploads: Uploads | None = None,
    open_elsewhere: Callable[[], bool] | None = None,
) -> KeySide:
    """`keys` driven over `commit` (where updates go) and `source` (where jobs come from);
    `recent`: per key, the wall times of its creates still in the provider's window;
    `groups`: limits.groups as key names; `open_elsewhere`: on a Ray worker, whether a key
    of another worker can take a job now."""
    limits = config.limits
    client = _client(config, base_url, len(keys))
    window_s = timings.window_s
    caps = caps_for(groups, keys, limits.max_concurrent)
    lanes = [
        KeyLane(k, CreateGate(limits.creates_per_window, window_s), caps[k.name]) for k in keys
    ]
    to_gate_clock = lanes[0].gate.clock.now() - time.time() if lanes else 0.0
    for lane in lanes:
        lane.gate.seed([at + to_gate_clock for at in recent.get(lane.key.name, [])])
    kept = None
    if config.assets.download:
        samples = base_url.removesuffix("/v1") if config.embedded_sandbox else None
        kept = downloader(config, commit, stats, thumbs, samples)
    webhook, listing = None, None
    if receiver is not None:
        webhook = Webhook(receiver.url, receiver.secret, receiver.callbacks)
    elif config.polling.listing:
        listing = Callbacks(config.webhook.missed_callbacks, source="listing")
    clock = SystemClock()
    flight = InFlight(clock)
    driver = KeyDriver(
        driver_settings(config, timings),
        client,
        commit,
        source,
        _planner(config, timings, flight),
        stats,
        lanes,
        flight=flight,
        clock=clock,
        open_elsewhere=open_elsewhere,
        webhook=webhook,
        listing=listing,
        downloader=kept,
        uploads=uploads,
    )
    return KeySide(client, driver, lanes)


def downloader(
    config: RunConfig,
    commit: Commits,
    stats: RunStats,
    thumbs: ThumbSink | None,
    samples_from: str | None = None,
) -> Downloader:
    """The run's images kept in `assets.store`; its figures counted in `stats`.
    `samples_from`: the embedded sandbox's root, which serves the demo's sample inputs."""
    if stats.downloads is None:
        raise ValueError("assets.download: the run's stats are made with their DownloadStats")
    store = open_store(config.assets, config.output.dir)
    return Downloader(
        config.assets, store, commit, thumbs, stats=stats.downloads, samples_from=samples_from
    )
