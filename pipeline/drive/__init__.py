"""What drives the keys: jobs handed out, created, polled to their end and journaled.

engine.py      this process's slots (Local) or Ray workers (Distributed), and their services
dispatcher.py  jobs handed to free slots, in row order, within the budget
driver.py      the key driver: a slot's loop (take a job, create, poll, journal its end),
               composed of the parts below around one registry of the jobs in flight
creates.py     the creator: a job's create, and what its answer (or its loss) means
adopt.py       a lost create settled on the listing's evidence, and the seeds naming jobs
polls.py       the poller: a created job polled to its end; cancels confirmed by a poll
sweeps.py      a key's executions listing read: the ends it shows wake their jobs' polls
outcomes.py    a job's outcome read from the provider's answer, and journaled
flight.py      the jobs in flight: each one's key, row and create, and its cancel asked
listings.py    the executions listing's reads, shared by the sweeps and the lost creates
steps.py       the answers the parts hand each other between a job's steps
settings.py    what the driver takes of the config, every duration on the run's clock
outage.py      the provider's outages as the slots meet them
lanes.py       a key with its gate and cap; what each key is doing
assemble.py    the key side of a run built one way, here or on a Ray worker
ray/           the keys spread over Ray workers (`--workers`)
"""

from __future__ import annotations

from pipeline.drive.dispatcher import Dispatcher
from pipeline.drive.engine import Engine, open_engine
from pipeline.drive.ray.cluster import Workers, check_workers

__all__ = ["Dispatcher", "Engine", "Workers", "check_workers", "open_engine"]
