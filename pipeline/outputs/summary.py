"""summary.json: what a run did, for the morning and for the scheduler, written at the end of
every run (stopped ones too), beside the results it agrees with.

Throughput is this run's jobs per second; efficiency is that against the bound the limits
allow: keys x min(creates_per_window / window_s, max_concurrent / mean latency), the latency
being the mean the provider reported for this run's jobs.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.core import COUNTERS, FINISHED, ExitCode, LimitsSection, RunStats
from pipeline.journal import CostBooks

__all__ = [
    "Asked",
    "RunSummary",
    "finish_line",
    "percentiles",
    "summary_document",
    "write_summary",
]

_VERSIONS = ("httpx", "pyarrow", "obstore", "pydantic", "structlog", "anyio")


@dataclass
class RunSummary:
    run_dir: Path
    results_path: Path
    failures_path: Path | None
    counts: dict[str, int]
    totals: dict[str, float]
    stats: RunStats
    elapsed_s: float
    exit_code: ExitCode
    message: str = ""
    keys: list[str] = field(default_factory=list)
    sandbox_stats: dict[str, Any] | None = None
    requeued: dict[str, int] | None = None  # `wanbatch retry`: rows run again, per error type
    workers: list[dict[str, Any]] = field(default_factory=list)  # `--workers`: each one's figures
    per_key: dict[str, dict[str, float]] = field(default_factory=dict)  # jobs and cost per key
    left_failed: dict[str, int] = field(default_factory=dict)  # failed rows, per error type
    forced: dict[str, int] | None = None  # `--force`: how the manifest as it is now was taken
    waiting_on_keys: dict[str, int] = field(default_factory=dict)  # key name -> jobs it holds
    started_at: float = 0.0  # wall clock (Unix seconds)
    ended_at: float = 0.0
    cost: CostBooks | None = None  # the cost confirmed by the provider, and what may be billed
    possibly_billed_usd: float = 0.0  # at most, beyond the results' cost (unconfirmed jobs)
    # executions of our model seen near a lost create that no row claims (id, key, status,
    # cost): billed to the account, in no result
    orphans: list[dict[str, Any]] = field(default_factory=list)
    # the organisation's balance as the run started, where the provider tells it
    balance_usd: float | None = None
    # products an earlier night's run had and this one's export has not (removed.csv), with a
    # state store, once the whole manifest is read
    removed: int | None = None
    # where the review stands: edits approved, rows rejected, edits no person judged yet
    reviews: dict[str, int] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)  # measured, passed, failed, by_rule

    def results(self) -> Any:
        """results.parquet as a pandas DataFrame with Arrow-backed types (nullable integers
        stay integers, lists stay lists)."""
        import pandas as pd  # loaded only when asked for

        return pd.read_parquet(self.results_path, dtype_backend="pyarrow")

    @property
    def finished_rows(self) -> int:
        return sum(self.counts.get(s.value, 0) for s in FINISHED)


def percentiles(values: Any) -> dict[str, float | None]:
    """p50, p95 and p99 of a sequence of numbers (nearest rank), rounded to the millisecond."""
    ordered = sorted(values)
    out: dict[str, float | None] = {}
    for name, q in (("p50", 0.50), ("p95", 0.95), ("p99", 0.99)):
        out[name] = (
            round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4) if ordered else None
        )
    return out


def _iso(seconds: float) -> str | None:
    if not seconds:
        return None
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat(timespec="seconds")


def _versions() -> dict[str, str]:
    found = {"wanbatch": __version__, "python": platform.python_version()}
    for name in _VERSIONS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


@dataclass(frozen=True, slots=True)
class Asked:
    """What summary.json tells of what the run was asked: its limits, its create window on
    the run's clock, and its config's hash (the config's `digest()`)."""

    limits: LimitsSection
    window_s: float
    config_hash: str


def _throughput(summary: RunSummary, asked: Asked) -> dict[str, float | None]:
    stats, limits = summary.stats, asked.limits
    rate = stats.finished / summary.elapsed_s if summary.elapsed_s > 0 else 0.0
    latency = sum(stats.latencies) / len(stats.latencies) if stats.latencies else None
    keys = len(summary.keys) - len(stats.retired_keys)
    bound = None
    if latency and keys > 0:
        bound = limits.jobs_per_s(latency, keys, window_s=asked.window_s)
    return {
        "jobs_per_s": round(rate, 4),
        "bound_jobs_per_s": round(bound, 4) if bound else None,
        "efficiency": round(rate / bound, 4) if bound else None,
        "mean_latency_s": round(latency, 4) if latency else None,
    }


_STOPPED = {int(ExitCode.BALANCE): "balance", int(ExitCode.PROVIDER_DOWN): "outage"}


def _cost(summary: RunSummary) -> dict[str, Any] | None:
    """The cost confirmed by the provider (a poll saw each job end), apart from what may have
    been billed with no end seen; the provider's own figures beside our price."""
    c = summary.cost
    if c is None:
        return None
    return {
        "confirmed_usd": c.confirmed_usd,
        "possibly_billed_usd": summary.possibly_billed_usd,
        "unconfirmed_jobs": c.unconfirmed,
        "provider_reported_usd": c.provider_usd,
        "priced_usd": c.priced_usd,
        "provider_price_mismatches": c.mismatched,
    }


def summary_document(summary: RunSummary, asked: Asked) -> dict[str, Any]:
    counts, totals, stats = summary.counts, summary.totals, summary.stats
    by_error = dict(summary.left_failed)
    if counts.get("rejected"):
        by_error["invalid_row"] = by_error.get("invalid_row", 0) + counts["rejected"]
    images = None
    if stats.downloads is not None:
        d = stats.downloads
        images = {"stored_this_run": d.stored, "failed_this_run": d.failed, "bytes": d.bytes}
    return {
        "run_dir": str(summary.run_dir),
        "exit_code": int(summary.exit_code),
        "message": summary.message,
        "rows": int(totals["rows"]),
        "by_status": {s: counts.get(s, 0) for s in sorted({*counts, "succeeded", "failed"})},
        "by_error_type": by_error,
        "images": int(totals["images"]),
        "images_stored": images,
        "cost_usd": totals["cost_usd"],
        "cost": _cost(summary),
        "reused": int(totals.get("reused", 0)),
        "possible_duplicate_charges": int(totals["possible_duplicate_charges"]),
        "orphans": summary.orphans,
        "orphans_cost_usd": round(sum(o.get("cost_usd") or 0.0 for o in summary.orphans), 6),
        # why creates stopped before the catalog's end, when the provider's side stopped them
        "creates_stopped": _STOPPED.get(int(summary.exit_code)),
        "balance_usd_at_start": summary.balance_usd,
        "removed_products": summary.removed,
        "reviews": summary.reviews,
        "checks": summary.checks,
        "callbacks": asdict(stats.callbacks) if stats.callbacks is not None else None,
        **{c.summary_key: getattr(stats, c.name) for c in COUNTERS if c.summary_key},
        "throughput": _throughput(summary, asked),
        "latency_s": percentiles(stats.latencies),
        "notice_delay_s": percentiles(stats.notice_delays),
        "keys": summary.keys,
        "per_key": summary.per_key,
        "workers": summary.workers,
        "retired_keys": stats.retired_keys,
        "waiting_on_keys": summary.waiting_on_keys,
        "started_at": _iso(summary.started_at),
        "ended_at": _iso(summary.ended_at),
        "elapsed_s": round(summary.elapsed_s, 3),
        "config_hash": asked.config_hash,
        "versions": _versions(),
    }


def write_summary(summary: RunSummary, asked: Asked, path: Path) -> None:
    """summary.json, replaced whole (a temporary file, then a rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(summary_document(summary, asked), indent=2) + "\n")
    os.replace(tmp, path)


def finish_line(summary: RunSummary) -> str:
    c, t = summary.counts, summary.totals
    return (
        f"run finished (exit {int(summary.exit_code)}): {int(t['rows']):,} rows, "
        f"{c.get('succeeded', 0):,} succeeded, {c.get('failed', 0):,} failed, "
        f"{c.get('rejected', 0):,} rejected"
        + (f", {c['skipped']:,} skipped" if c.get("skipped") else "")
        + f"; {int(t['images']):,} images, "
        f"${t['cost_usd']:,.2f}"
        + (
            f" confirmed (up to ${summary.possibly_billed_usd:,.2f} more unconfirmed)"
            if summary.possibly_billed_usd
            else ""
        )
        + f"; {summary.elapsed_s:,.1f} s"
        + (f"; {summary.message}" if summary.message else "")
    )
