"""Structured logs with structlog: JSON lines in the run folder's `run.log`, and the same events,
human-readable, on stderr from `console_level` up (warnings by default; `--log-level` lowers
it). Job events carry the job id and, once known, the prediction id; keys appear only by their
short hash.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import structlog

__all__ = ["configure_logging", "level_named", "logging_to"]

_handle: IO[str] | None = None


def level_named(name: str) -> int:
    """A level from its name (debug, info, warning, error); ValueError for another."""
    level = logging.getLevelNamesMapping().get(name.upper())
    if level is None or name.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError(f"log level {name!r} is not one of debug, info, warning, error")
    return level


class _Console:
    """A processor that writes events at or above `level` to stderr, human-readable, and
    passes every event on to the JSON file."""

    def __init__(self, level: int, tracebacks: bool) -> None:
        self._level = level
        self._tracebacks = tracebacks  # --debug: an error's traceback is shown too
        self._render = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())

    def __call__(
        self, logger: Any, method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        if logging.getLevelNamesMapping().get(method.upper(), 0) >= self._level:
            shown = (
                dict(event)
                if self._tracebacks
                else {k: v for k, v in event.items() if k != "exc_info"}
            )
            print(self._render(logger, method, shown), file=sys.stderr, flush=True)
        return event


def configure_logging(
    path: Path | None,
    level: int = logging.INFO,
    console_level: int | None = None,
    tracebacks: bool = False,
) -> None:
    """Send structlog events to `path` as JSON lines (or drop them when path is None), and
    those at `console_level` and up to stderr (None: none), with tracebacks if asked."""
    global _handle
    if _handle is not None:
        _handle.close()
        _handle = None
    if path is None and console_level is None:
        structlog.configure(
            wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL),
            cache_logger_on_first_use=False,
        )
        return
    processors: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if console_level is not None:
        processors.append(_Console(console_level, tracebacks))
    lowest = min(level, console_level if console_level is not None else level)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        _handle = path.open("a", encoding="utf-8")
        processors += [structlog.processors.dict_tracebacks, structlog.processors.JSONRenderer()]
        factory: Any = structlog.WriteLoggerFactory(file=_handle)
    else:
        processors.append(_drop)
        factory = structlog.ReturnLoggerFactory()
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(lowest),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )


def _drop(logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
    return ""


@contextmanager
def logging_to(path: Path) -> Iterator[None]:
    """run.log for the duration of a run called from Python (`pipeline.run`): structlog's
    configuration is put back as it was afterwards, and the file closed."""
    global _handle
    before = structlog.get_config()
    configure_logging(path)
    try:
        yield
    finally:
        if _handle is not None:
            _handle.close()
            _handle = None
        structlog.configure(**before)
