"""What drives the keys: jobs handed out, created, polled to their end and booked.

engine.py      this process's slots (Local) or Ray workers (Distributed), and their services
dispatcher.py  jobs handed to free slots, in row order, within the budget
driver.py      the key driver: a slot's loop (take a job, create, poll, book)
creates.py     a job's create, and what its answer (or its loss) means
polls.py       a created job polled to its end; cancels confirmed by a poll
sweeps.py      a key's executions listing read: the ends it shows wake their jobs' polls
books.py       a job's outcome read from the provider's answer, and journaled
slot.py        the driver's state and settings, and the answers passed between its steps
lanes.py       a key with its gate and cap; what each key is doing
assemble.py    the key side of a run built one way, here or on a Ray worker
ray/           the keys spread over Ray workers (`--workers`)
"""

from __future__ import annotations

from pipeline.drive.dispatcher import Dispatcher
from pipeline.drive.engine import Engine, open_engine
from pipeline.drive.ray.cluster import Workers, check_workers

__all__ = ["Dispatcher", "Engine", "Workers", "check_workers", "open_engine"]
