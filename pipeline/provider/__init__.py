"""provider."""

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
