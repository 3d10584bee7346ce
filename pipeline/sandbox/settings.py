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
    accounts: tuple[tuple[str, ...], ...] = ()
    # which of the provider's documents the answers follow: "seed" (`error`, `predictionID`,
    # callbacks `{"exec_id", ...}` signed over "<timestamp>.<body>") or "reference" (`failed`,
    # `id`, `input`, `logs`, `urls`, callbacks `{"id", "status", "output", "input", "metrics"}`
    # signed over the body alone)
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
        if self.api_shape not in ("seed", "reference"):
            raise ValueError("api_shape must be 'seed' or 'reference'")
        if self.late_cancel not in (200, 409):
            raise ValueError("late_cancel must be 200 or 409")
        if self.cancel_delay_s < 0:
            raise ValueError("cancel_delay_s must not be negative")
        grouped = [k for account in self.accounts for k in account]
        if set(grouped) - set(self.keys) or len(grouped) != len(set(grouped)):
            raise ValueError("accounts must name accepted keys, each in one account at most")

    def scaled(self, seconds: float) -> float:
        """Provider seconds to wall-clock seconds."""
        return seconds * self.time_scale
