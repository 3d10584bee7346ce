"""The sandbox's knobs: keys, limits, latency, time scale, image size and fault rates."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

__all__ = ["FaultRates", "SandboxSettings"]


@dataclass(frozen=True, slots=True)
class FaultRates:
    """Probabilities (0..1) of each injected fault, drawn per request or per job."""

    job_error: float = 0.0  # a job ends in `error` with a final code (no images, no charge)
    transient_error: float = 0.0  # a job ends in `error` with a code the provider says to retry
    cancelled: float = 0.0  # a job ends `cancelled` on the provider's side (no images, no charge)
    bad_output: float = 0.0  # an output image served as bytes that are no image
    truncated_output: float = 0.0  # an output image served cut in half
    create_5xx: float = 0.0  # a create answered 500/503 before anything is created
    poll_5xx: float = 0.0  # a poll answered 500/503
    lost_create: float = 0.0  # a create accepted and billed whose answer is lost (drop or 502)
    slow: float = 0.0  # an answer delayed by `slow_s`
    poll_reset: float = 0.0  # a poll whose connection is dropped mid-answer
    storm_429: float = 0.0  # a create that starts a 429 storm on its key for `storm_s`
    trickle_output: float = 0.0  # an output image served one byte every `slow_s`
    garbled_poll: float = 0.0  # a poll answered `Content-Encoding: gzip` with a body that is not
    nonsense_metrics: float = 0.0  # an ended job's predict_time sent as NaN, Infinity or 1e300
    slow_s: float = 2.0
    storm_s: float = 5.0

    def __post_init__(self) -> None:
        for name in (
            "job_error",
            "transient_error",
            "cancelled",
            "bad_output",
            "truncated_output",
            "create_5xx",
            "poll_5xx",
            "lost_create",
            "slow",
            "poll_reset",
            "storm_429",
            "trickle_output",
            "garbled_poll",
            "nonsense_metrics",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"fault rate {name} must be between 0 and 1, not {value}")

    @classmethod
    def parse(cls, text: str) -> FaultRates:
        """`name=value,...` (e.g. `slow=1,slow_s=3`), as the sandbox command line takes it."""
        known = {f.name for f in fields(cls)}
        values: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, sep, value = part.partition("=")
            name = name.strip()
            if not sep or name not in known:
                names = ", ".join(sorted(known))
                raise ValueError(f"fault {part!r}: expected name=value, the name one of {names}")
            try:
                values[name] = float(value)
            except ValueError:
                raise ValueError(f"fault {name}: {value.strip()!r} is not a number") from None
        return cls(**values)


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
