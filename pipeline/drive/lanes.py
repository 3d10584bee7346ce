"""The keys a process drives, as lanes: one API key with its create gate and its share of the
in-flight cap; and what each is doing, for the progress view."""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from pipeline.core import ApiKey
from pipeline.observe import KeyState, WorkerState
from pipeline.provider import CreateGate, InFlightCap

__all__ = ["KeyLane", "LocalView", "key_states"]


@dataclass
class KeyLane:
    """One API key with its create gate; retired when the provider refuses the key."""

    key: ApiKey
    gate: CreateGate
    cap: InFlightCap  # shared by the keys of one group (limits.groups)
    retired: bool = False
    serving: int = 0  # slots still asking for jobs
    # the ids of its latest answered creates, not journaled yet maybe: no lost create's job
    answered: deque[str] = field(default_factory=lambda: deque(maxlen=1024))

    def retire(self) -> None:
        """The provider refused the key: its slots take no more jobs."""
        self.retired = True

    def open_for_work(self) -> bool:
        """Serving and not paused by a 429: a job given back now can go out on this key."""
        return not self.retired and self.serving > 0 and self.gate.paused_for() == 0


class LocalView:
    """The keys driven by this process."""

    def __init__(self, lanes: Sequence[KeyLane], flying: Callable[[], Iterable[KeyLane]]) -> None:
        self._lanes = lanes
        self._flying = flying

    def keys(self) -> tuple[KeyState, ...]:
        return key_states(self._lanes, self._flying())

    def workers(self) -> tuple[WorkerState, ...]:
        return ()


def key_states(lanes: Sequence[KeyLane], flying: Iterable[KeyLane]) -> tuple[KeyState, ...]:
    """Each lane's jobs in flight (`flying`: the lane of each job in flight) and what it does."""
    counts = Counter(lane.key.name for lane in flying)
    return tuple(
        KeyState(lane.key.name, counts.get(lane.key.name, 0), _lane_state(lane)) for lane in lanes
    )


def _lane_state(lane: KeyLane) -> str:
    if lane.retired:
        return "retired"
    paused = lane.gate.paused_for()
    if paused > 0:
        return f"paused {paused:.0f} s (429)"
    return "working" if lane.serving else "idle"
