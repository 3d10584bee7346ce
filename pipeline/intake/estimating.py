"""`wanbatch estimate CONFIG` (and `run --dry-run`): the whole manifest read and checked as a
run would, without creating anything, and what the run would cost and take.

Rows are counted by what the run would do with them: rejected (grouped by the rule they
break), reused from the state store, sharing an earlier row's seeded job (`dedupe`), or sent.
Local and bucket inputs are judged but not uploaded. The duration is the rows to send over the
bound the limits allow at the configured keys: keys x min(creates_per_window / window_s,
max_concurrent / latency), plus one latency for the last jobs; the latency is the median the
state store learned from earlier runs (at least 20 of them), else `polling.expected_latency_s`.
"""

from __future__ import annotations

import re
import sqlite3
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core import (
    INPUT_FIELDS,
    ExitCode,
    JobSpec,
    LimitsSection,
    Plan,
    Rejected,
)
from pipeline.intake.manifest import Manifest
from pipeline.journal import StateStore, in_chunks, unique

__all__ = ["Estimate", "count_rows", "plan_sends", "rule_of"]

_ROW = re.compile(r"^row \d+: ")
# what varies from row to row within one rule: the value, a location, an id, a size
_VALUES = (
    (re.compile(r", not .*$"), ", not ..."),
    (re.compile(r"(?<=file )\S*/\S*|(?<=object )\S*/\S*|\bhttps?://\S+"), "..."),
    (re.compile(r"\bid .[^.]*. repeats row \d+"), "id ... repeats an earlier row"),
    (re.compile(r"\b\d[\d.,]* MB\b"), "N MB"),
)
# where a reason's problems are joined: "; " before a field or a column, not within one rule
# ("has 3 fields; the header has 4")
_PROBLEMS = re.compile(
    r"; (?=(?:%s|column|prompt_template)\b)" % "|".join(INPUT_FIELDS)  # noqa: UP031
)
_LEARNED_FROM = 20  # earlier jobs the state store must hold to stand for the latency


def rule_of(reason: str) -> list[str]:
    """The rules a rejection names, without the row and the values: what to group by."""
    rules = []
    for part in _PROBLEMS.split(_ROW.sub("", reason)):
        for pattern, stands in _VALUES:
            part = pattern.sub(stands, part)
        rules.append(part)
    return rules


@dataclass
class Estimate:
    rows: int = 0
    rejected: int = 0
    rejected_by_rule: Counter[str] = field(default_factory=Counter)
    skipped: int = 0  # blank where manifest.skip_if_blank says: never sent, not a failure
    filtered: int = 0  # of them, left out by manifest.where
    reused: int = 0  # succeeded in an earlier run (incremental): not sent, no cost
    shared: int = 0  # the same seeded input as an earlier row: follows it, no cost
    # the same input as an earlier row, without a seed: each is sent and paid (a new draw)
    identical_unseeded: int = 0
    to_send: int = 0
    images: int = 0
    cost_usd: float = 0.0
    keys: int = 0
    latency_s: float = 0.0  # provider seconds
    latency_from: str = "polling.expected_latency_s"
    duration_s: float = 0.0  # provider seconds
    wall_s: float = 0.0  # the same on the clock: shrunk by the time scale (a sandbox's)
    over_budget: bool = False
    balance_usd: float | None = None  # the organisation's, where the provider tells it

    @property
    def over_balance(self) -> bool:
        return self.balance_usd is not None and self.cost_usd > self.balance_usd

    @property
    def valid(self) -> int:
        return self.rows - self.rejected - self.skipped

    @property
    def exit_code(self) -> ExitCode:
        """What a scheduler acts on: 5 when the cost is over budget.max_cost_usd, 9 when it
        passes the organisation's balance, 6 when no row is valid (every one rejected, or none
        at all), 0 otherwise."""
        if self.over_budget:
            return ExitCode.BUDGET
        if self.over_balance:
            return ExitCode.BALANCE
        if self.valid == 0:
            return ExitCode.ROWS_FAILED
        return ExitCode.OK


def count_rows(
    manifest: Manifest, state: StateStore | None, folder: Path, *, price: float, dedupe: bool
) -> Estimate:
    """Every row of the manifest counted by what a run would do with it; `folder` holds the
    ids and inputs seen so far (see `_Seen`), `state` the successes of earlier nights."""
    found = Estimate()
    with _Seen(folder) as seen:
        _count(manifest, state, price, dedupe, found, seen)
    return found


def _count(
    manifest: Manifest,
    state: StateStore | None,
    price: float,
    dedupe: bool,
    found: Estimate,
    seen: _Seen,
) -> None:
    for batch in manifest.batches():
        prior = {}
        if state is not None:
            prior = state.lookup([i.fingerprint for i in batch if isinstance(i, JobSpec)])
        ids = seen.rows_of([i.job_id for i in batch])
        before = dict(ids)
        inputs = seen.inputs([i.fingerprint for i in batch if isinstance(i, JobSpec)])
        for item in (unique(i, ids) for i in batch):
            found.rows += 1
            if isinstance(item, Rejected) and item.skipped:
                found.skipped += 1
                found.filtered += "manifest.where" in item.reason
            elif isinstance(item, Rejected):
                found.rejected += 1
                found.rejected_by_rule.update(rule_of(item.reason))
            elif item.fingerprint in prior:
                found.reused += 1
            elif dedupe and "seed" in item.inputs and _once(item, inputs, 1):
                found.shared += 1
            else:
                found.to_send += 1
                found.images += item.images_requested
                if "seed" not in item.inputs and _once(item, inputs, 0):
                    found.identical_unseeded += 1
        seen.remember({k: v for k, v in ids.items() if before.get(k) != v}, inputs)
    found.cost_usd = round(found.images * price, 6)


def _once(item: JobSpec, inputs: set[tuple[int, bytes]], kind: int) -> bool:
    """Whether an earlier row sends this row's exact input (`kind` 1: seeded, 0: not);
    remembers it if not."""
    key = (kind, bytes.fromhex(item.fingerprint))
    if key in inputs:
        return True
    inputs.add(key)
    return False


class _Seen:
    """The ids and inputs of the rows read so far, kept in SQLite beside the estimate's
    temporary files: a million rows' ids and inputs held in Python would be a few hundred MB.
    A batch reads what it needs and writes back what it added."""

    def __init__(self, folder: Path) -> None:
        self._db = sqlite3.connect(folder / "seen.sqlite")
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute("CREATE TABLE ids (id TEXT PRIMARY KEY, row INTEGER) WITHOUT ROWID")
        self._db.execute(
            "CREATE TABLE inputs (fp BLOB, kind INTEGER, PRIMARY KEY (fp, kind)) WITHOUT ROWID"
        )
        self._added: set[tuple[int, bytes]] = set()

    def __enter__(self) -> _Seen:
        return self

    def __exit__(self, *_: object) -> None:
        self._db.close()

    def rows_of(self, ids: list[str]) -> dict[str, int]:
        """The row each of these ids was given to by an earlier batch (see `unique`)."""
        found: dict[str, int] = {}
        for chunk, marks in in_chunks(sorted(set(ids))):
            query = f"SELECT id, row FROM ids WHERE id IN ({marks})"
            found.update(self._db.execute(query, chunk).fetchall())
        return found

    def inputs(self, fingerprints: list[str]) -> set[tuple[int, bytes]]:
        """Of these inputs, the ones earlier batches sent (as seeded 1, or not 0)."""
        found: set[tuple[int, bytes]] = set()
        digests = sorted({bytes.fromhex(f) for f in fingerprints})
        for chunk, marks in in_chunks(digests):
            query = f"SELECT kind, fp FROM inputs WHERE fp IN ({marks})"
            found.update((int(k), bytes(f)) for k, f in self._db.execute(query, chunk))
        self._added = set(found)
        return found

    def remember(self, ids: dict[str, int], inputs: set[tuple[int, bytes]]) -> None:
        """What a batch added: its ids' rows and the inputs first sent in it."""
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO ids VALUES (?, ?)", ids.items())
            self._db.executemany(
                "INSERT OR IGNORE INTO inputs (kind, fp) VALUES (?, ?)", inputs - self._added
            )


def _rate(limits: LimitsSection, keys: int, latency_s: float) -> float:
    """Jobs a second `keys` keys finish: each group of `limits.groups` shares one account's
    max_concurrent, and every key outside a group is an account of its own."""
    rate, grouped = 0.0, 0
    for group in limits.groups:
        size = min(len(group), keys - grouped)
        if size > 0:
            rate += limits.jobs_per_s(latency_s, size, one_group=True)
            grouped += size
    return rate + (keys - grouped) * limits.jobs_per_s(latency_s)


def plan_sends(
    found: Estimate,
    learned: list[float],
    plan: Plan,
    *,
    keys: int,
    limits: LimitsSection,
    expected_latency_s: float,
) -> None:
    """How long the sends take at `keys` keys, on the run's clock as the run plans it
    (`plan.timings`), and whether they pass the plan's budget; `learned`: the latencies the
    state store kept (wall seconds)."""
    clock = plan.timings
    found.keys = keys
    found.latency_s = expected_latency_s
    if len(learned) >= _LEARNED_FROM:
        # the store keeps what the clock saw: wall seconds, which a sandbox shrinks
        found.latency_s = clock.provider(statistics.median(learned))
        found.latency_from = f"the median of {len(learned):,} earlier jobs (state store)"
    if found.to_send and found.keys:
        found.duration_s = found.to_send / _rate(limits, found.keys, found.latency_s)
        found.duration_s += found.latency_s
        found.wall_s = clock.wall(found.duration_s)
    budget = plan.budget.limit_usd
    found.over_budget = budget is not None and found.cost_usd > budget
