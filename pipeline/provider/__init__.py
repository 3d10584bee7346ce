"""The provider, as the run speaks to it: requests and their answers, and the limits it sets.

client.py   create, poll and cancel; every failure translated into the exception tree
limits.py   a key's create gate (its sliding window), in-flight caps, the retry policy
polling.py  when to poll a running job: the schedule learned from the latencies seen
webhook.py  the callback receiver, and the hints it gives the polls
"""

from __future__ import annotations

from pipeline.provider.client import EachlabsClient, Prediction
from pipeline.provider.limits import CreateGate, GatePaused, InFlightCap, RetryPolicy, caps_for
from pipeline.provider.polling import PollPlanner
from pipeline.provider.webhook import Callbacks, Receiver, Waiter

__all__ = [
    "Callbacks",
    "CreateGate",
    "EachlabsClient",
    "GatePaused",
    "InFlightCap",
    "PollPlanner",
    "Prediction",
    "Receiver",
    "RetryPolicy",
    "Waiter",
    "caps_for",
]
