"""drive."""

from __future__ import annotations

from pipeline.drive.dispatcher import Dispatcher
from pipeline.drive.engine import Engine, open_engine
from pipeline.drive.ray.cluster import Workers, check_workers

__all__ = ["Dispatcher", "Engine", "Workers", "check_workers", "open_engine"]
