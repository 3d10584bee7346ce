"""What a run (or an estimate) takes from its config, derived once: every duration the client
waits already on the run's clock, the budget with what is already spent, and the keys with
the caps they share. The parts take the plan, or the slice they need,
instead of the whole config; the estimate reads the same numbers as the run.

The config's durations are provider seconds; the run's clock runs `time_scale` wall seconds
per provider second (the embedded sandbox's `sandbox.time_scale`, else `api.time_scale`), so a
shrunk run keeps the real run's proportions. The scaling is applied here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pipeline.core.config import RunConfig
from pipeline.core.keys import ApiKey, resolve_groups

__all__ = ["Budget", "Plan", "Timings", "plan_run", "timings"]


@dataclass(frozen=True, slots=True)
class Timings:
    """The durations the client waits, in wall seconds on the run's clock."""

    scale: float  # wall seconds per provider second
    window_s: float  # limits.window_s: a key's creates are counted over it
    job_timeout_s: float
    cancel_grace_s: float
    expected_latency_s: float
    target_delay_s: float
    min_interval_s: float
    max_interval_s: float
    backoff_initial_s: float
    backoff_max_s: float
    retry_after_max_s: float
    lost_create_settle_s: float
    lost_create_patience_s: float
    outage_after_s: float
    outage_patience_s: float
    fallback_after_s: float
    fallback_interval_s: float

    def wall(self, provider_s: float) -> float:
        """Provider seconds (an estimate's duration) on the run's clock."""
        return provider_s * self.scale

    def provider(self, wall_s: float) -> float:
        """Seconds the run's clock saw (a latency kept in the state store) in provider
        seconds."""
        return wall_s / self.scale


def timings(config: RunConfig) -> Timings:
    """The config's durations scaled to the run's clock."""
    scale = config.time_scale
    p, r, w = config.polling, config.retries, config.webhook
    return Timings(
        scale=scale,
        window_s=config.limits.window_s * scale,
        job_timeout_s=p.job_timeout_s * scale,
        cancel_grace_s=p.cancel_grace_s * scale,
        expected_latency_s=p.expected_latency_s * scale,
        target_delay_s=p.target_delay_s * scale,
        min_interval_s=p.min_interval_s * scale,
        max_interval_s=p.max_interval_s * scale,
        backoff_initial_s=r.backoff_initial_s * scale,
        backoff_max_s=r.backoff_max_s * scale,
        retry_after_max_s=r.retry_after_max_s * scale,
        lost_create_settle_s=r.lost_create_settle_s * scale,
        lost_create_patience_s=r.lost_create_patience_s * scale,
        outage_after_s=r.outage_after_s * scale,
        outage_patience_s=r.outage_patience_s * scale,
        fallback_after_s=w.fallback_after_s * scale,
        fallback_interval_s=w.fallback_interval_s * scale,
    )


@dataclass(frozen=True, slots=True)
class Budget:
    """budget.max_cost_usd (None: no limit), and what earlier runs of the folder spent."""

    limit_usd: float | None
    spent_usd: float = 0.0

    @property
    def left_usd(self) -> float | None:
        return None if self.limit_usd is None else max(0.0, self.limit_usd - self.spent_usd)


@dataclass(frozen=True, slots=True)
class Plan:
    """A run's numbers, derived once from its config (see the module's docstring); a run with
    several rounds (checks.regenerate) plans each with what was spent by then."""

    timings: Timings
    budget: Budget
    keys: tuple[ApiKey, ...] = ()
    groups: list[list[str]] = field(default_factory=list)  # limits.groups as key names


def plan_run(config: RunConfig, keys: Sequence[ApiKey] = (), *, spent_usd: float = 0.0) -> Plan:
    """The plan of a run of `config` on `keys`, `spent_usd` spent already (ConfigError when
    limits.groups names a key that is not given); an estimate plans without keys."""
    given = tuple(keys)
    groups = resolve_groups(config.limits.groups, list(given)) if given else []
    return Plan(timings(config), Budget(config.budget.max_cost_usd, spent_usd), given, groups)
