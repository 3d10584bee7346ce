"""What the key driver's parts are given of the run's settings, every duration on the driver's
clock (the sandbox's time scale already applied when the plan was made), and where callbacks
come in webhook mode."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.provider import Callbacks, RetryPolicy

__all__ = ["DriverSettings", "Webhook"]


@dataclass(frozen=True, slots=True)
class DriverSettings:
    """What the key driver takes from the config, every duration on its clock (the sandbox's
    time scale applied)."""

    policy: RetryPolicy
    job_timeout: float
    cancel_grace: float
    confirm_every: float  # how often a cancelled job is polled for its end
    fallback_after: float  # webhook mode: how late a callback may be before a poll
    fallback_interval: float
    price_per_image_usd: float
    creates_per_window: int
    ambiguous_creates: Literal["retry", "fail"]
    timeout_text: str  # the job timeout as the config says it, for messages
    sweep_share: float  # a key's listing is read every this share of the median latency
    sweep_floor: float  # and at most this often
    # a lost create is looked for in its key's listing (polling.listing), this long after its
    # answer was due (wall seconds, scaled); a create's answer comes within `answer_within`
    resolve_lost: bool = False
    lost_settle: float = 0.0
    lost_patience: float = 120.0  # how long a lost create waits for the listing's proof
    outage_after: float = 60.0  # every request failing this long is an outage
    outage_patience: float = 900.0  # probed this long before the run stops sending
    answer_within: float = 30.0
    clock_skew: float = 2.0  # how far the provider's clock may be from ours (wall seconds)


@dataclass(frozen=True, slots=True)
class Webhook:
    """Webhook mode: where the provider sends its callbacks, the secret it signs them with,
    and the callbacks received."""

    url: str
    secret: str | None
    callbacks: Callbacks
