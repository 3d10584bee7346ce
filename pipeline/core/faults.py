"""The faults the sandbox can inject, and at what rates: part of the config's `sandbox:` section
(so a typo stops the run before it starts), read by the sandbox itself."""

from __future__ import annotations

from dataclasses import dataclass, fields

__all__ = ["EDIT_FAULTS", "FaultRates", "sandbox_keys"]


def sandbox_keys(count: int) -> list[str]:
    """The keys the embedded sandbox makes up when none is given."""
    return [f"sandbox-key-{i + 1}" for i in range(count)]


# the faults an edit may come back with, each a kind of edit a marketplace refuses; the sandbox
# checks them in this order against one draw per output
EDIT_FAULTS = (
    "grey_background",
    "small_product",
    "missing_product",
    "unchanged_output",
    "undersized_output",
)


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
    early_502: float = 0.0  # a create answered 502 by the gateway before it reached the provider
    slow: float = 0.0  # an answer delayed by `slow_s`
    poll_reset: float = 0.0  # a poll whose connection is dropped mid-answer
    storm_429: float = 0.0  # a create that starts a 429 storm on its key for `storm_s`
    trickle_output: float = 0.0  # an output image served one byte every `slow_s`
    garbled_poll: float = 0.0  # a poll answered `Content-Encoding: gzip` with a body that is not
    nonsense_metrics: float = 0.0  # an ended job's predict_time sent as NaN, Infinity or 1e300
    # an edit that a marketplace would refuse (the sandbox draws one per output, by its hash)
    grey_background: float = 0.0  # the product on grey, not white
    small_product: float = 0.0  # the product filling 35-50 % of the frame
    missing_product: float = 0.0  # a white frame, no product
    unchanged_output: float = 0.0  # the input sent back as it was
    undersized_output: float = 0.0  # half the size asked for
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
            "early_502",
            "slow",
            "poll_reset",
            "storm_429",
            "trickle_output",
            "garbled_poll",
            "nonsense_metrics",
            "grey_background",
            "small_product",
            "missing_product",
            "unchanged_output",
            "undersized_output",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"fault rate {name} must be between 0 and 1, not {value}")

    def edits(self) -> dict[str, float]:
        """The rates of the edits' faults, by name (`EDIT_FAULTS`)."""
        return {name: getattr(self, name) for name in EDIT_FAULTS}

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

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
