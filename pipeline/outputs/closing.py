"""The run's summary as rows of label and value, for the terminal and for scripts."""

from __future__ import annotations

from typing import Any

from pipeline.core import COUNTERS, REMOVED, REPORT, SUMMARY
from pipeline.outputs.summary import RunSummary

__all__ = ["checks_said", "summary_rows"]


def summary_rows(summary: RunSummary) -> list[tuple[str, str]]:
    counts, totals = summary.counts, summary.totals
    rows = [
        ("rows", f"{int(totals['rows']):,}"),
        ("succeeded", f"{counts.get('succeeded', 0):,}"),
        ("failed", f"{counts.get('failed', 0):,}"),
        ("rejected", f"{counts.get('rejected', 0):,}"),
        ("skipped", f"{counts.get('skipped', 0):,}"),
    ]
    if summary.requeued is not None:
        rows.insert(0, ("run again (retry)", _by_type(summary.requeued)))
    if summary.forced is not None:
        rows.insert(0, ("manifest as it is now (--force)", _by_type(summary.forced)))
    if counts.get("failed", 0):
        rows.append(("failed by error type", _by_type(summary.left_failed)))
    if totals.get("reused"):
        rows.append(("reused (incremental, no cost)", f"{int(totals['reused']):,}"))
    unfinished = int(totals["rows"]) - summary.finished_rows
    if unfinished:
        rows.append(("unfinished (resumable)", f"{unfinished:,}"))
    if summary.waiting_on_keys:
        rows.append(("jobs in flight, per key", _by_type(summary.waiting_on_keys)))
    rows += _activity(summary)
    rows += _files(summary)
    return rows


def _activity(summary: RunSummary) -> list[tuple[str, str]]:
    """Images, cost, keys and requests of the run."""
    totals, stats = summary.totals, summary.stats
    rows = []
    rate = stats.finished / summary.elapsed_s if summary.elapsed_s > 0 else 0.0
    if stats.downloads is not None:
        d = stats.downloads
        rows.append(
            (
                "images stored",
                f"{d.stored:,} this run ({d.bytes / 1e6:,.1f} MB)"
                + (f", {d.failed:,} failed: run again to fetch them" if d.failed else ""),
            )
        )
    rows += [
        ("images", f"{int(totals['images']):,}"),
        ("cost", f"${totals['cost_usd']:,.2f}"),
        ("possible duplicate charges", f"{int(totals['possible_duplicate_charges']):,}"),
        (
            "keys",
            ", ".join(summary.keys)
            + (f" (retired: {', '.join(stats.retired_keys)})" if stats.retired_keys else ""),
        ),
    ]
    rows += [(c.label, f"{getattr(stats, c.name):,}") for c in COUNTERS if c.label]
    if stats.callbacks is not None:
        c = stats.callbacks
        rows.append(
            (
                "webhook callbacks",
                f"{c.received:,} received; ends seen by callback {c.ends_by_callback:,}, "
                f"by fallback poll {c.ends_by_fallback:,}, on the poll schedule "
                f"{c.ends_by_poll:,}; unconfirmed {c.unconfirmed:,}, unknown {c.unknown:,}, "
                f"bad signatures {c.bad_signatures:,}",
            )
        )
    rows.append(("throughput", f"{rate * 60:,.1f} jobs/min this run ({summary.elapsed_s:,.1f} s)"))
    return rows


def _files(summary: RunSummary) -> list[tuple[str, str]]:
    rows = [("results", str(summary.results_path))]
    if summary.failures_path is not None:
        rows.append(("failures manifest", str(summary.failures_path)))
    if summary.checks.get("measured"):
        rows.append(("checks", checks_said(summary.checks)))
    to_review = summary.reviews.get("to_review", 0)
    if to_review and (summary.run_dir / REPORT).is_file():
        rows.append(
            (
                f"to review ({to_review:,})",
                f"{summary.run_dir / REPORT}: approve or reject, export decisions.csv, "
                f"then wanbatch retry {summary.run_dir} --rejected decisions.csv",
            )
        )
    passing = summary.checks.get("passing_undecided", 0)
    if to_review and passing:
        rows.append(
            (
                f"passed every check ({passing:,})",
                f"wanbatch retry {summary.run_dir} --approve-passing approves them",
            )
        )
    if summary.removed:
        rows.append((f"removed products ({summary.removed:,})", str(summary.run_dir / REMOVED)))
    for label, name in (("report", REPORT), ("summary", SUMMARY)):
        if (summary.run_dir / name).is_file():
            rows.append((label, str(summary.run_dir / name)))
    return rows


def _by_type(counts: dict[str, int]) -> str:
    total = sum(counts.values())
    if not total:
        return "0"
    parts = ", ".join(f"{kind} {n:,}" for kind, n in sorted(counts.items()))
    return f"{total:,} ({parts})"


def checks_said(checks: dict[str, Any]) -> str:
    """The checks in one line: images measured, passed, and failures by rule."""
    said = f"{checks['measured']:,} images measured, {checks['passed']:,} passed"
    if checks["by_rule"]:
        said += "; failed " + ", ".join(f"{k} {v:,}" for k, v in checks["by_rule"].items())
    if checks.get("regenerated"):
        said += f"; {checks['regenerated']:,} made again"
    return said
