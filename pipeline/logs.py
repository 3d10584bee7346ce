"""Structured logs: JSON lines in the run folder's `run.log`; nothing on the terminal."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import IO

import structlog

__all__ = ["configure_logging"]

_handle: IO[str] | None = None


def configure_logging(path: Path | None, level: int = logging.INFO) -> None:
    """Send structlog events to `path` as JSON lines (or drop them when path is None)."""
    global _handle
    if _handle is not None:
        _handle.close()
        _handle = None
    if path is None:
        structlog.configure(
            wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL),
            cache_logger_on_first_use=False,
        )
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    _handle = path.open("a", encoding="utf-8")
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.WriteLoggerFactory(file=_handle),
        cache_logger_on_first_use=False,
    )
