"""The sandbox's knobs: keys, limits, latency, time scale, image size and fault rates."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core import FaultRates

__all__ = ["FaultRates", "SandboxSettings"]


@dataclass(frozen=True, slots=True)
class SandboxSettings:
    """How the double behaves. Every duration is in provider seconds, multiplied by time_scale."""

    keys: tuple[str, ...]
    time_scale: float = 1.0
    creates_per_window: int = 100
    window_s: float = 60.0
    max_concurrent: int = 10
    latency_mean_s: float = 10.0
    latency_spread: float = 0.3  # coefficient of variation of a lognormal latency
    seed: int = 0
    price_per_image_usd: float = 0.03
    image_scale: float = 1.0  # 1.0 gives 1024/2048 px images; small values keep tests fast
    # each output grown to at least this many bytes (a real 2K output is about 4 MB), so that
    # downloads move realistic volumes while the pictures stay cheap to draw; 0: as drawn
    output_bytes: int = 0
    allow_loopback_urls: bool = False
    # fetch each loopback input when a job is created, as the provider fetches its inputs: a job
    # whose input cannot be fetched fails INPUT_DOWNLOAD_ERROR, one that is no image (or over
    # 20 MB) INPUT_VALIDATION_ERROR; other inputs (the sandbox has no internet) are drawn
    fetch_inputs: bool = False
    faults: FaultRates = field(default_factory=FaultRates)
    # faults of particular keys (by secret), in place of `faults`: a throttled or slow key
    key_faults: Mapping[str, FaultRates] = field(default_factory=dict)
    ledger_path: Path | None = None
    webhook_attempts: int = 3
    # failed jobs in the older shape (`message`/`details`) instead of `output.error_code`
    legacy_errors: bool = False
    # keys of one account (by secret), sharing one `max_concurrent` as the provider's cap is
    # per account; a key in none is an account of its own
    groups: tuple[tuple[str, ...], ...] = ()
    # which of the provider's documents the answers follow: "seed" (`error`, `predictionID`,
    # callbacks `{"exec_id", ...}` signed over "<timestamp>.<body>"), "reference" (`failed`,
    # `id`, `input`, `logs`, `urls`, callbacks `{"id", "status", "output", "input", "metrics"}`
    # signed over the body alone) or "today", the docs and changelog of 2026-12: Bearer auth
    # only, the six statuses with `output.error_code`, an organisation-wide listing (v1 refused
    # past a 1,000-row prefix, v2 paged by cursor), the balance (402, the low-balance 429,
    # `GET /v1/billing/balance`), `GET /v1/models/{slug}` and `fallback_selector`
    api_shape: str = "seed"
    report_cost: bool = True  # a poll of an ended job carries `metrics.cost`, the USD billed
    # what a cancel of a job that has ended answers: 409, or 200 as if it had been cancelled
    late_cancel: int = 409
    # a cancel takes effect this long (provider seconds) after it is answered; a job whose own
    # end comes first ends as it would have, and is billed
    cancel_delay_s: float = 0.0
    # `GET /v1/executions` answers; off, it answers 404, as a provider without the listing
    listing: bool = True
    # a prediction's `GET` carries the `input` it was created with (both shapes); off, as a
    # provider whose answers lack it
    prediction_input: bool = True
    # how far the provider's clock is ahead of this machine's (wall seconds, never scaled; may
    # be negative): the listing's times and its `from`/`to` are on the provider's clock
    clock_offset_s: float = 0.0
    # a job shows in the listing this long (provider seconds) after its creation
    listing_lag_s: float = 0.0
    # ("today") another application of the organisation mirrors this share of the creates with
    # the same input less its seed, on a key of its own: its jobs are in the listing and billed
    # to it, never to the sandbox's keys
    org_traffic: float = 0.0
    # ("today") the organisation's balance in USD, None for no limit: a create whose price,
    # with the jobs in flight, would pass it answers 402; below `low_balance_usd` left, a create
    # answers the low-balance 429. A job's cost is taken from it as it is billed
    balance_usd: float | None = None
    low_balance_usd: float = 0.0
    # ("today", with `fallback_selector` on the create) this share of jobs is served by the
    # chain's backup model: its `GET` names both, and its cost is what ran
    fallback_share: float = 0.0

    def __post_init__(self) -> None:
        if not self.keys:
            raise ValueError("the sandbox needs at least one API key")
        if self.time_scale <= 0:
            raise ValueError("time_scale must be positive")
        if self.creates_per_window < 1 or self.max_concurrent < 1:
            raise ValueError("limits must be at least 1")
        if self.latency_mean_s <= 0 or self.latency_spread < 0:
            raise ValueError("latency mean must be positive and spread non-negative")
        if not 0 < self.image_scale <= 1:
            raise ValueError("image_scale must be in (0, 1]")
        if unknown := set(self.key_faults) - set(self.keys):
            raise ValueError(f"key_faults name {len(unknown)} key(s) the sandbox does not accept")
        if self.api_shape not in ("seed", "reference", "today"):
            raise ValueError("api_shape must be 'seed', 'reference' or 'today'")
        if self.listing_lag_s < 0 or self.low_balance_usd < 0:
            raise ValueError("listing_lag_s and low_balance_usd must not be negative")
        if not (0 <= self.org_traffic <= 1 and 0 <= self.fallback_share <= 1):
            raise ValueError("org_traffic and fallback_share must be between 0 and 1")
        if self.late_cancel not in (200, 409):
            raise ValueError("late_cancel must be 200 or 409")
        if self.cancel_delay_s < 0:
            raise ValueError("cancel_delay_s must not be negative")
        grouped = [k for account in self.groups for k in account]
        if set(grouped) - set(self.keys) or len(grouped) != len(set(grouped)):
            raise ValueError("groups must name accepted keys, each in one group at most")

    @property
    def today(self) -> bool:
        """Whether the answers follow the provider's docs of 2026-12."""
        return self.api_shape == "today"

    def scaled(self, seconds: float) -> float:
        """Provider seconds to wall-clock seconds."""
        return seconds * self.time_scale
