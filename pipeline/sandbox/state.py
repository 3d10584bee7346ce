"""The sandbox's bookkeeping: per-key limits, the jobs, and the billing ledger.

Pure logic on an injected clock (wall seconds); the HTTP layer in `app` turns its answers into
responses. A create is either refused (nothing created, nothing billed) or accepted, which records
it in the sliding window and in flight until its end. The ledger is the judge of what was billed.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import random
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any
from urllib.parse import urlsplit

from pipeline.core import FaultRates, SandboxSettings
from pipeline.core.schema import TRANSIENT_ERROR_CODES, fingerprint

__all__ = ["BACKUP_MODEL", "ORG_MATE", "Job", "KeyStats", "Refusal", "SandboxState", "key_hash"]


# of the provider's error codes: the transient ones a job fails with, and a final one
TRANSIENT_CODES = tuple(sorted(TRANSIENT_ERROR_CODES))
FINAL_CODE = "PROVIDER_FAILED"
# the key of another application of the organisation (`org_traffic`): not one of the sandbox's
ORG_MATE = "key-orgmate"
# the model a fallback chain's backup serves with (`fallback_share`), and what the requested
# model's failed try costs an image before it
BACKUP_MODEL = "alibaba-wan-2-6-image-edit"
_FALLBACK_TRY_USD = 0.01


def key_hash(secret: str) -> str:
    return "key-" + hashlib.sha256(secret.encode()).hexdigest()[:8]


@dataclass(slots=True)
class Job:
    prediction_id: str
    key: str
    inputs: dict[str, Any]
    fingerprint: str
    created_at: float
    ends_at: float
    fails: bool
    webhook_url: str | None
    base_url: str  # where the sandbox serves this job's outputs, ending in "/"
    ended: bool = False
    error_code: str | None = None  # why it fails, when it fails
    cancelled: bool = False  # it ends (or ended) `cancelled`: by the provider, or asked to
    webhook_secret: str | None = None
    inputs_ready: bool = True  # False while its inputs are being fetched: it cannot end yet
    cancel_asked: bool = False  # a cancel was answered (it may still end otherwise: see cancel)
    hooked: bool = False  # its callback was sent
    terminal_polls: int = 0  # polls answered with its end: a client that saw it needs one
    served_by: str | None = None  # the backup model of a fallback chain that served it

    def status(self, now: float) -> str:
        """What a poll of a job still running says: created, then starting, then processing."""
        done = (now - self.created_at) / max(1e-9, self.ends_at - self.created_at)
        return "created" if done < 0.1 else "starting" if done < 0.2 else "processing"

    @property
    def n(self) -> int:
        return int(self.inputs.get("n", 1))

    def output_urls(self) -> list[str]:
        """Where the outputs of a job that succeeded are served: a poll's and a listing's."""
        return [f"{self.base_url}v1/outputs/{self.prediction_id}/{i}.jpg" for i in range(self.n)]

    def failure(self) -> dict[str, Any]:
        """A failed job's `output`, in the reference's shape: a poll's and a listing's."""
        return {"error_code": self.error_code, "error_message": "sandbox fault: job error"}


@dataclass(frozen=True, slots=True)
class Refusal:
    """A create the sandbox turned away with 429; retry_after is in wall seconds."""

    reason: str
    retry_after: float


@dataclass(slots=True)
class KeyStats:
    creates: int = 0
    refused_429: int = 0
    refused_400: int = 0
    lost_answers: int = 0
    succeeded: int = 0
    failed: int = 0
    images: int = 0
    cost_usd: float = 0.0
    max_creates_in_window: int = 0
    max_in_flight: int = 0
    window: deque[float] = field(default_factory=deque)
    ends: list[float] = field(default_factory=list)  # heap of in-flight end times
    storm_until: float = 0.0


@dataclass(slots=True)
class Balance:
    """The organisation's balance in USD (None: unlimited)."""

    usd: float | None

    def move(self, usd: float) -> None:
        """A top-up (more), or a job's cost billed (less); an unlimited balance stays so."""
        if self.usd is not None:
            self.usd = round(self.usd + usd, 6)


class SandboxState:
    """Everything the double knows; safe to call from the server's event loop thread only,
    except `stats()` and `ledger_lines()`, which take the lock."""

    def __init__(self, settings: SandboxSettings, clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self._clock = clock
        self._rng = random.Random(settings.seed)
        self._ids = secrets.randbits(128)  # ids its own: a kept run folder meets none again
        self._keys = {secret: key_hash(secret) for secret in settings.keys}
        self._stats = {name: KeyStats() for name in self._keys.values()}
        self._faults = {
            name: settings.key_faults.get(secret, settings.faults)
            for secret, name in self._keys.items()
        }
        # the cap is per account: each key's account, and the ends of its jobs in flight
        self._group = {name: name for name in self._keys.values()}
        for number, account in enumerate(settings.groups, start=1):
            for secret in account:
                self._group[self._keys[secret]] = f"group-{number}"
        self._group_ends: dict[str, list[float]] = {a: [] for a in self._group.values()}
        self.group_peak: dict[str, int] = dict.fromkeys(self._group.values(), 0)
        self.jobs: dict[str, Job] = {}
        self.by_key: dict[str, list[Job]] = {}  # each key's jobs, in creation order
        self.everyone: list[Job] = []  # the organisation's jobs, in creation order
        self._stats[ORG_MATE] = KeyStats()  # kept apart: `stats()` names the sandbox's keys
        self._faults[ORG_MATE] = FaultRates()
        self._group[ORG_MATE] = ORG_MATE
        self._group_ends[ORG_MATE] = []
        # the organisation's balance, and what its jobs in flight may still cost
        self.balance = Balance(settings.balance_usd)
        self.owed: dict[str, float] = {}
        self.webhooks = {"delivered": 0, "failed": 0}  # deliveries answered 2xx, or given up
        self.inputs = {"fetched": 0, "failed": 0}  # inputs fetched (fetch_inputs), or not
        self._fingerprints: dict[str, int] = {}
        self._ledger: list[str] = []
        self._lock = threading.Lock()
        self._ledger_file: IO[str] | None = None
        if settings.ledger_path is not None:
            settings.ledger_path.parent.mkdir(parents=True, exist_ok=True)
            self._ledger_file = settings.ledger_path.open("a", encoding="utf-8")

    def now(self) -> float:
        return self._clock()

    # -- identity -------------------------------------------------------------------------

    def key_name(self, secret: str | None) -> str | None:
        """The short hash of a known key, or None for a missing or unknown key."""
        if not secret:
            return None
        return self._keys.get(secret)

    def faults(self, key: str) -> FaultRates:
        """The fault rates of a key (by name): its own, or the sandbox's."""
        return self._faults[key]

    def chance(self, rate: float) -> bool:
        return rate > 0 and self._rng.random() < rate

    def pick(self, choices: list[float]) -> float:
        return self._rng.choice(choices)

    # -- creates --------------------------------------------------------------------------

    def admit(self, key: str) -> Refusal | None:
        """Whether a create on this key may go ahead now; a refusal is recorded and not billed."""
        s = self.settings
        faults = self._faults[key]
        stats = self._stats[key]
        now = self._clock()
        window = s.scaled(s.window_s)
        while stats.window and stats.window[0] <= now - window:
            stats.window.popleft()
        while stats.ends and stats.ends[0] <= now:
            heapq.heappop(stats.ends)
        ends = self._group_ends[self._group[key]]
        while ends and ends[0] <= now:
            heapq.heappop(ends)
        refusal: Refusal | None = None
        if stats.storm_until > now:
            refusal = Refusal("rate limit storm", stats.storm_until - now)
        elif self.chance(faults.storm_429):
            stats.storm_until = now + s.scaled(faults.storm_s)
            refusal = Refusal("rate limit storm", stats.storm_until - now)
        elif len(stats.window) >= s.creates_per_window:
            refusal = Refusal(
                f"rate limit: {s.creates_per_window} creates per {s.window_s:g} s",
                stats.window[0] + window - now,
            )
        elif len(ends) >= s.max_concurrent:
            refusal = Refusal(f"rate limit: {s.max_concurrent} concurrent jobs", ends[0] - now)
        if refusal is not None:
            stats.refused_429 += 1
            self.log({"event": "refused", "key": key, "status": 429, "reason": refusal.reason})
        return refusal

    def refuse_invalid(self, key: str, reason: str) -> None:
        self._stats[key].refused_400 += 1
        self.log({"event": "refused", "key": key, "status": 400, "reason": reason})

    def accept(
        self,
        key: str,
        model: str,
        inputs: dict[str, Any],
        webhook_url: str | None,
        base_url: str,
        webhook_secret: str | None = None,
        fallback: bool = False,
    ) -> Job:
        """Create a job: it counts in the window and in flight from now until it ends. With
        `org_traffic`, another application of the organisation may make the same edit (its
        own seed) a moment before."""
        if key != ORG_MATE and self.chance(self.settings.org_traffic):
            mirrored = {k: v for k, v in inputs.items() if k != "seed"}
            self.accept(ORG_MATE, model, mirrored, None, base_url)
        s = self.settings
        now = self._clock()
        stats = self._stats[key]
        latency = self._draw_latency()
        job = Job(
            prediction_id=str(uuid.UUID(int=self._rng.getrandbits(128) ^ self._ids, version=4)),
            key=key,
            inputs=inputs,
            fingerprint=fingerprint(model, inputs),
            created_at=now,
            ends_at=now + s.scaled(latency),
            fails=self.chance(self._faults[key].job_error),
            webhook_url=webhook_url,
            base_url=base_url,
            webhook_secret=webhook_secret,
        )
        faults = self._faults[key]
        if job.fails:
            job.error_code = FINAL_CODE
        elif self.chance(faults.transient_error):
            job.fails, job.error_code = True, self._rng.choice(TRANSIENT_CODES)
        elif self.chance(faults.cancelled):
            job.cancelled = True
        if fallback and not job.fails and self.chance(s.fallback_share):
            job.served_by = BACKUP_MODEL
        self.jobs[job.prediction_id] = job
        self.by_key.setdefault(key, []).append(job)
        self.everyone.append(job)
        self.owed[job.prediction_id] = job.n * s.price_per_image_usd
        stats.window.append(now)
        heapq.heappush(stats.ends, job.ends_at)
        account = self._group[key]
        heapq.heappush(self._group_ends[account], job.ends_at)
        self.group_peak[account] = max(
            self.group_peak.get(account, 0), len(self._group_ends[account])
        )
        stats.creates += 1
        stats.max_creates_in_window = max(stats.max_creates_in_window, len(stats.window))
        stats.max_in_flight = max(stats.max_in_flight, len(stats.ends))
        if key != ORG_MATE:
            seen = self._fingerprints.get(job.fingerprint, 0)
            self._fingerprints[job.fingerprint] = seen + 1
        self.log(
            {
                "t": now,  # when the window counted it, not when this line is written
                "event": "created",
                "key": key,
                "prediction_id": job.prediction_id,
                "fingerprint": job.fingerprint,
                "n": job.n,
                # wall seconds from admission to its own end: a perfect client's replay reads it
                "latency_s": job.ends_at - now,
            }
        )
        return job

    def note_input(self, job: Job, url: str, problem: tuple[str, str] | None, size: int) -> None:
        """An input fetched for `job` (`problem`: the error code and why, when it failed): the
        ledger names where it came from, never the query (a presigned URL's signature)."""
        parts = urlsplit(url)
        where = f"{parts.scheme}://{parts.netloc}{parts.path}"
        self.inputs["failed" if problem else "fetched"] += 1
        entry: dict[str, Any] = {"event": "input_fetched", "key": job.key, "url": where}
        entry.update(prediction_id=job.prediction_id, bytes=size, signed="Signature" in url)
        if problem is not None:
            entry.update(error_code=problem[0], error=problem[1])
            job.fails, job.error_code = True, problem[0]
        self.log(entry)

    def note_lost_answer(self, job: Job) -> None:
        self._stats[job.key].lost_answers += 1
        self.log({"event": "answer_lost", "key": job.key, "prediction_id": job.prediction_id})

    def _draw_latency(self) -> float:
        s = self.settings
        if s.latency_spread == 0:
            return s.latency_mean_s
        sigma2 = math.log(1 + s.latency_spread**2)
        mu = math.log(s.latency_mean_s) - sigma2 / 2
        return self._rng.lognormvariate(mu, math.sqrt(sigma2))

    # -- job ends -------------------------------------------------------------------------

    def finish_due(self, job: Job) -> bool:
        """Bill a job that has reached its end (once); True when it is terminal."""
        if job.ended:
            return True
        if self._clock() < job.ends_at or not job.inputs_ready:
            return False
        job.ended = True
        self.owed.pop(job.prediction_id, None)
        self.balance.move(-self.cost(job))
        stats = self._stats[job.key]
        if job.fails or job.cancelled:
            stats.failed += 1
            self.log(
                {
                    "event": "ended",
                    "key": job.key,
                    "prediction_id": job.prediction_id,
                    "status": "cancelled" if job.cancelled else "error",
                    "error_code": job.error_code,
                    "images": 0,
                    "cost_usd": 0.0,
                }
            )
        else:
            cost = self.cost(job)
            stats.succeeded += 1
            stats.images += job.n
            stats.cost_usd = round(stats.cost_usd + cost, 6)
            self.log(
                {
                    "event": "ended",
                    "key": job.key,
                    "prediction_id": job.prediction_id,
                    "status": "success",
                    "images": job.n,
                    "cost_usd": cost,
                }
            )
        return True

    def cancel(self, job: Job) -> bool:
        """Cancel a job still running: it ends `cancelled`, billed nothing, and frees its key's
        slot, `cancel_delay_s` from now (at once by default). A job whose own end comes sooner
        ends as it would have, and is billed: the cancel was answered, but lost the race.
        False when the job had ended already."""
        if self.finish_due(job):
            return False
        if job.cancel_asked:
            return True
        job.cancel_asked = True
        at = self._clock() + self.settings.scaled(self.settings.cancel_delay_s)
        if at >= job.ends_at:
            return True  # its own end comes first
        stats = self._stats[job.key]
        for ends in (stats.ends, self._group_ends[self._group[job.key]]):
            if job.ends_at in ends:
                ends.remove(job.ends_at)
                ends.append(at)
                heapq.heapify(ends)
        job.cancelled, job.fails, job.ends_at = True, False, at
        job.inputs_ready = True  # cancelled: whatever its inputs turn out to be
        self.finish_due(job)
        return True

    def cost(self, job: Job) -> float:
        """What an ended job was billed."""
        if job.fails or job.cancelled:
            return 0.0
        backup = _FALLBACK_TRY_USD if job.served_by else 0.0  # the requested model's try too
        return round(job.n * (self.settings.price_per_image_usd + backup), 6)

    def predict_time(self, job: Job) -> float:
        return round(job.ends_at - job.created_at, 4)

    # -- reporting ------------------------------------------------------------------------

    def log(self, entry: dict[str, Any]) -> None:
        # full precision: limits are checked from it; an entry may bring its own instant
        entry = {"t": self._clock(), **entry}
        line = json.dumps(entry, separators=(",", ":"))
        with self._lock:
            self._ledger.append(line)
            if self._ledger_file is not None:
                self._ledger_file.write(line + "\n")
                self._ledger_file.flush()

    def ledger_lines(self) -> list[str]:
        with self._lock:
            return list(self._ledger)

    def stats(self) -> dict[str, Any]:
        return _figures(self)

    def close(self) -> None:
        with self._lock:
            if self._ledger_file is not None:
                self._ledger_file.close()
                self._ledger_file = None


def _figures(state: SandboxState) -> dict[str, Any]:
    """What the sandbox did, per key and in all: `/_admin/stats`. Read from any thread while
    the server's thread creates jobs: each mapping the creates grow is copied whole first (one
    step for the interpreter), never iterated while it may grow."""
    with state._lock:
        counts = list(state._fingerprints.values())
        peaks = dict(state.group_peak)
        jobs = list(state.jobs.values())
        per_key = {
            name: {
                "creates": st.creates,
                "refused_429": st.refused_429,
                "refused_400": st.refused_400,
                "lost_answers": st.lost_answers,
                "succeeded": st.succeeded,
                "failed": st.failed,
                "images": st.images,
                "cost_usd": st.cost_usd,
                "max_creates_in_window": st.max_creates_in_window,
                "max_in_flight": st.max_in_flight,
            }
            for name, st in state._stats.items()
            if name != ORG_MATE
        }
        duplicates = sum(count - 1 for count in counts if count > 1)
        ost = state._stats[ORG_MATE]
        again = sum(max(0, j.terminal_polls - 1) for j in jobs)
    return {
        "keys": per_key,
        "creates": sum(k["creates"] for k in per_key.values()),
        "images": sum(k["images"] for k in per_key.values()),
        "cost_usd": round(sum(k["cost_usd"] for k in per_key.values()), 6),
        "refused_429": sum(k["refused_429"] for k in per_key.values()),
        # creates refused for breaking the input schema: a client sends none
        "refused_400": sum(k["refused_400"] for k in per_key.values()),
        "duplicate_creates": duplicates,
        "polls_after_end": again,  # polls of a job after one that answered its end
        "webhooks": dict(state.webhooks),
        "max_in_flight_per_group": {a: peak for a, peak in peaks.items() if a != ORG_MATE},
        "inputs": dict(state.inputs),
        "balance_usd": state.balance.usd,
        # another application's jobs in the organisation's listing (`org_traffic`)
        "org_mate": {"creates": ost.creates, "cost_usd": ost.cost_usd},
        "limits": {
            "creates_per_window": state.settings.creates_per_window,
            "window_s": state.settings.window_s,
            "max_concurrent": state.settings.max_concurrent,
            "time_scale": state.settings.time_scale,
        },
    }
