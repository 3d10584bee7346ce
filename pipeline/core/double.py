"""The sandbox's settings (the provider's double): keys, limits, latency, time scale, image
size, fault rates and the shape of its answers. Each is declared here once, with its help; the
config's `sandbox:` section, the embedded sandbox and `wanbatch sandbox` read this declaration.
It lives in core so the config can read it; the sandbox itself stays outside the production
code."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipeline.core.faults import FaultRates

__all__ = ["SandboxSettings", "sample_address"]


def sample_address(url: str, samples_from: str | None) -> str | None:
    """Where the embedded sandbox (its root `samples_from`) serves the demo sample that `url`
    names by its path (`/samples/...`, whatever its host and query), or None when it names
    none."""
    path = urlsplit(url).path
    if samples_from is None or not path.startswith("/samples/"):
        return None
    return samples_from + path


def _names(text: str) -> tuple[str, ...]:
    return tuple(k.strip() for k in text.split(",") if k.strip())


def _groups(text: str) -> tuple[tuple[str, ...], ...]:
    return tuple(_names(group) for group in text.split(";") if group.strip())


def _key_faults(items: list[str]) -> dict[str, FaultRates]:
    per_key = {}
    for item in items:
        secret, _, spec = item.partition(":")
        per_key[secret.strip()] = FaultRates.parse(spec)
    return per_key


def _knob(default: Any, text: str, **cli: Any) -> Any:
    """A setting with its default and its one description, which `wanbatch sandbox --help`
    shows (`cli`: how the command line names or parses it, where not by its field)."""
    if callable(default):
        return field(default_factory=default, metadata={"help": text, **cli})
    return field(default=default, metadata={"help": text, **cli})


@dataclass(frozen=True, slots=True)
class SandboxSettings:
    """How the double behaves. Every duration is in provider seconds, multiplied by time_scale.
    Each setting is declared here once, with its help: the config's `sandbox:` section, the
    embedded sandbox and `wanbatch sandbox` (whose options are made from these fields) read
    it."""

    keys: tuple[str, ...] = _knob(
        tuple, "Accepted API keys, comma-separated.", parse=_names, required=True
    )
    time_scale: float = _knob(1.0, "Wall seconds per provider second.")
    creates_per_window: int = _knob(
        100, "Creates a key may send per --window-s (the provider: 100)."
    )
    window_s: float = _knob(60.0, "The create window, in provider seconds (the provider: 60).")
    max_concurrent: int = _knob(10, "Jobs in flight per account (the provider: 10).")
    latency_mean_s: float = _knob(10.0, "A job's mean time to end, in provider seconds.")
    latency_spread: float = _knob(
        0.3, "How much a job's time varies around the mean (0..1): a lognormal's spread."
    )
    seed: int = _knob(0, "The random seed of latencies and faults.")
    price_per_image_usd: float = _knob(
        0.03, "What an image is billed (metrics.cost and the ledger)."
    )
    image_scale: float = _knob(
        1.0, "Output size factor (1 = 1024/2048 px; small keeps tests fast)."
    )
    output_bytes: int = _knob(
        0,
        "Grow each output to this many bytes (a real 2K one: ~4 MB), so downloads move "
        "realistic volumes while the pictures stay cheap to draw; 0: as drawn.",
    )
    allow_loopback_urls: bool = _knob(False, "Accept inputs on this machine.")
    fetch_inputs: bool = _knob(
        False,
        "Fetch loopback inputs as the provider does: a job whose input cannot be fetched fails "
        "INPUT_DOWNLOAD_ERROR, one that is no image (or over 20 MB) INPUT_VALIDATION_ERROR.",
    )
    faults: FaultRates = _knob(
        FaultRates,
        "Injected faults as name=rate, comma-separated, with the names of the config's "
        "sandbox.faults (e.g. job_error=0.05, or slow=1,slow_s=3): "
        f"{', '.join(FaultRates.names())}.",
        parse=FaultRates.parse,
    )
    key_faults: Mapping[str, FaultRates] = _knob(
        dict,
        "Faults of one key in place of --faults, as KEY:name=value,... (e.g. "
        "KEY:storm_429=1,storm_s=30 for a throttled key); repeatable.",
        parse=_key_faults,
        many=True,
    )
    ledger_path: Path | None = _knob(None, "Append the billing ledger here.", flag="--ledger")
    webhook_attempts: int = _knob(3, "Deliveries of a callback before it is given up.")
    legacy_errors: bool = _knob(False, "Failed jobs in the older message/details shape.")
    groups: tuple[tuple[str, ...], ...] = _knob(
        tuple,
        "Keys sharing one --max-concurrent, as k1,k2;k3,k4 (as limits.groups: the provider's "
        "cap is per account); a key in none has a cap of its own.",
        parse=_groups,
    )
    api_shape: str = _knob(
        "seed",
        "Answers as the seed document ('seed': error, predictionID, exec_id callbacks signed "
        "over <timestamp>.<body>), the API reference ('reference': failed, id, input, logs, "
        "body-signed callbacks) or the provider's docs of 2026-12 ('today': Bearer only, the "
        "organisation's listing, v2 by cursor, the balance, fallback_selector).",
    )
    report_cost: bool = _knob(True, "Polls of an ended job carry metrics.cost (the USD billed).")
    late_cancel: int = _knob(409, "A cancel of an ended job answers 409, or 200 as if cancelled.")
    cancel_delay_s: float = _knob(
        0.0,
        "A cancel takes effect this long after its answer; a job whose own end comes first "
        "ends as it would have, and is billed.",
    )
    listing: bool = _knob(True, "The executions listing answers (without it: 404).")
    prediction_input: bool = _knob(True, "A prediction's GET carries the input it was made with.")
    clock_offset_s: float = _knob(
        0.0,
        "The provider's clock ahead of ours (wall seconds, never scaled; may be negative): "
        "the listing's times are on it.",
    )
    listing_lag_s: float = _knob(0.0, "A job shows in the listing this long after its creation.")
    org_traffic: float = _knob(
        0.0,
        "('today') Share of creates another application of the organisation mirrors on a key "
        "of its own: its jobs are in the listing and billed to it.",
    )
    balance_usd: float | None = _knob(
        None,
        "('today') The organisation's balance (none: no limit): a create that would pass it "
        "with the jobs in flight answers 402.",
    )
    low_balance_usd: float = _knob(
        0.0, "('today') Below this left, creates answer the low-balance 429."
    )
    fallback_share: float = _knob(
        0.0,
        "('today') Share of fallback_selector jobs a backup model serves: its GET names both, "
        "and its cost is what ran.",
    )

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
