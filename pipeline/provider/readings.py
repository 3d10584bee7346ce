"""The numbers the provider reports about a job (its predict time, its cost), judged once for
every answer that carries them: a poll, a listing entry."""

from __future__ import annotations

__all__ = ["MAX_JOB_COST_USD", "MAX_PREDICT_TIME_S", "reading"]

# a job's predict time or cost beyond these is no reading: it is taken as not given
MAX_PREDICT_TIME_S = 7 * 86400.0
MAX_JOB_COST_USD = 10_000.0


def reading(value: object, most: float) -> float | None:
    """A number the provider reports, or None when it is missing or no reading at all (not a
    number, NaN, infinite, negative, absurdly large)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer past a float's range
        return None
    return number if 0.0 <= number <= most else None
