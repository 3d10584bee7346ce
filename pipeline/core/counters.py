"""The run's counters, declared once: each field of `RunStats` that counts something says how
metrics.prom names it, what summary.json calls it and how the closing summary labels it.
`COUNTERS` is read by the metrics, the summary, the terminal's summary and the Ray workers
(who send them to the driver to be summed), so a new counter is one line here.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = ["COUNTERS", "CallbackStats", "Counter", "DownloadStats", "RunStats", "run_stats"]


@dataclass(frozen=True, slots=True)
class Counter:
    """How one counter of `RunStats` is shown: its metric (and help), its summary.json key
    and its closing-summary label, each where it is shown at all."""

    name: str  # the RunStats field
    metric: str
    help: str
    summary_key: str | None = None
    label: str | None = None


def _count(metric: str, help: str, *, summary: str | None = None, label: str | None = None) -> Any:
    shown = {"metric": metric, "help": help, "summary_key": summary, "label": label}
    return field(default=0, metadata={"counter": shown})


@dataclass
class CallbackStats:
    """Webhook mode's counters (one set per run, in `RunStats.callbacks`)."""

    received: int = 0  # accepted by the receiver (right token, an exec_id)
    unknown: int = 0  # for no job of this run in flight
    unconfirmed: int = 0  # the confirming poll found the job still running
    ends_by_callback: int = 0
    ends_by_fallback: int = 0  # found by a fallback poll: its callback did not come in time
    ends_by_poll: int = 0  # found on the poll schedule (after a contradicted callback)
    bad_signatures: int = 0  # signed, but not by our secret (or too old): ignored


@dataclass
class DownloadStats:
    """The image store's counters (in `RunStats.downloads` when assets.download)."""

    stored: int = 0
    failed: int = 0
    bytes: int = 0


@dataclass
class RunStats:
    """Counters of one run, for the summary, the metrics and the benchmark."""

    creates_sent: int = _count(
        "wanbatch_creates", "Create requests sent", summary="creates", label="creates sent"
    )
    rate_limited: int = _count(
        "wanbatch_rate_limited", "429 answers received", summary="429s", label="429s received"
    )
    retries: int = _count(
        "wanbatch_retries", "Requests retried after 5xx or transport errors", summary="retries"
    )
    ambiguous_creates: int = _count("wanbatch_ambiguous_creates", "Creates whose answer was lost")
    # how the lost creates were settled at the provider (RESOLUTIONS)
    creates_adopted: int = _count(
        "wanbatch_creates_adopted",
        "Lost creates whose job the listing showed, matched by its input",
        summary="creates_adopted",
    )
    creates_recreated: int = _count(
        "wanbatch_creates_recreated",
        "Lost creates the listing showed never made a job, created again",
        summary="creates_recreated",
    )
    creates_unresolved: int = _count(
        "wanbatch_creates_unresolved",
        "Lost creates the listing could not settle: a duplicate may be billed",
        summary="creates_unresolved",
    )
    polls: int = _count("wanbatch_polls", "Polls sent", summary="polls", label="polls")
    listings: int = _count(
        "wanbatch_listings", "Executions listing pages read (polling.listing)", summary="listings"
    )
    listing_malformed: int = _count(
        "wanbatch_listing_malformed",
        "Listing entries that could not be read (no id, no status): skipped",
        summary="listing_entries_malformed",
    )
    lost_create_waits: int = _count(
        "wanbatch_lost_create_waits",
        "Lookups of a lost create that waited for the listing to prove what it made",
        summary="lost_create_waits",
    )
    balance_refusals: int = _count(
        "wanbatch_balance_refusals",
        "Creates refused for the organisation's balance (402, low-balance 429): nothing made",
        summary="balance_refusals",
    )
    outages: int = _count(
        "wanbatch_outages",
        "Stretches where every request failed (transport, 5xx) and creates stopped",
        summary="outages",
    )
    reattached: int = _count("wanbatch_reattached", "Jobs of an earlier run polled again")
    timeouts: int = _count("wanbatch_timeouts", "Jobs cancelled at polling.job_timeout_s")
    # cancels the provider accepted or refused (not failed requests)
    cancels: int = _count("wanbatch_cancels", "Cancels the provider answered")
    job_retries: int = _count("wanbatch_job_retries", "Jobs created again after a transient error")
    # 429s for the provider's concurrency cap (our window not full)
    cap_refusals: int = _count("wanbatch_cap_refusals", "429s for the provider's concurrency cap")
    finished: int = _count(
        "wanbatch_jobs_finished",
        "Jobs that ended in this process",
        summary="jobs_finished_this_run",
    )
    # jobs left running at the provider, their end not seen (see drive's Left)
    unconfirmed: int = _count(
        "wanbatch_jobs_unconfirmed",
        "Jobs left with no end seen at the provider (their cost may be billed)",
    )
    # jobs whose `metrics.cost` differs from our price times images
    cost_mismatches: int = _count(
        "wanbatch_cost_mismatches",
        "Jobs whose provider-reported cost differs from price times images",
    )
    retired_keys: list[str] = field(default_factory=list)
    # executions of our model that the listing showed near a lost create and no row claims
    # (another process's, or a create of ours we could not match): id, key, status, cost
    orphan_candidates: dict[str, dict[str, Any]] = field(default_factory=dict)
    callbacks: CallbackStats | None = None  # webhook mode only
    downloads: DownloadStats | None = None  # when assets.download
    # per job that ended with a predict time: it (s), and how long after its end the client
    # saw the end (s), in end order; 8 bytes each
    latencies: array[float] = field(default_factory=lambda: array("d"))
    notice_delays: array[float] = field(default_factory=lambda: array("d"))
    # told each job's latency and notice delay as it ends (metrics' histograms, when kept)
    _listeners: list[Callable[[float, float], None]] = field(default_factory=list, repr=False)

    def listen(self, on_end: Callable[[float, float], None]) -> None:
        """`on_end` is told each job's latency and notice delay from now on."""
        self._listeners.append(on_end)

    def add(self, counter: str, count: int = 1) -> None:
        """Count `count` more of the counter named `counter` (one of COUNTERS)."""
        setattr(self, counter, getattr(self, counter) + count)

    def job_ended(self, latency: float, notice_delay: float) -> None:
        notice_delay = max(0.0, notice_delay)
        self.latencies.append(latency)
        self.notice_delays.append(notice_delay)
        for listener in self._listeners:
            listener(latency, notice_delay)

    def counted(self) -> dict[str, int]:
        """Every counter's value, by name (what a Ray worker reports)."""
        return {c.name: getattr(self, c.name) for c in COUNTERS}


COUNTERS: tuple[Counter, ...] = tuple(
    Counter(f.name, **f.metadata["counter"]) for f in fields(RunStats) if "counter" in f.metadata
)


def run_stats(*, webhook: bool, download: bool) -> RunStats:
    """A run's counters, with the callbacks' in webhook mode and the image store's when the
    images are kept (one set for the run, whatever its rounds)."""
    return RunStats(
        callbacks=CallbackStats() if webhook else None,
        downloads=DownloadStats() if download else None,
    )
