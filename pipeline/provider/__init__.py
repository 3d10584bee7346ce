"""The provider, as the run speaks to it: requests and their answers, and the limits it sets.

client.py   create, poll and cancel; every failure translated into the exception tree
limits.py   a key's create gate (its sliding window), in-flight caps, the retry policy
polling.py  when to poll a running job: the schedule learned from the latencies seen
listing.py  the executions listing's shape: one request tells the ends of many jobs
timeline.py the provider's clock against ours, and what a listing proves of a lost create
readings.py a job's predict time and cost as the provider reports them, judged
webhook.py  the callback receiver, and the hints it gives the polls
"""

from __future__ import annotations

from pipeline.provider.client import EachlabsClient, Listed, Prediction, read_balance
from pipeline.provider.limits import CreateGate, GatePaused, InFlightCap, RetryPolicy, caps_for
from pipeline.provider.listing import ENDED, Execution
from pipeline.provider.polling import PollPlanner
from pipeline.provider.timeline import ProviderClock
from pipeline.provider.webhook import Callbacks, Receiver, Waiter

__all__ = [
    "ENDED",
    "Callbacks",
    "CreateGate",
    "EachlabsClient",
    "Execution",
    "GatePaused",
    "InFlightCap",
    "Listed",
    "PollPlanner",
    "Prediction",
    "ProviderClock",
    "Receiver",
    "RetryPolicy",
    "Waiter",
    "caps_for",
    "read_balance",
]
