"""Structured logs with structlog: JSON lines in the run folder's `run.log`, and the same events,
human-readable, on stderr from `console_level` up (warnings by default; `--log-level` lowers
it). Job events carry the job id and, once known, the prediction id; keys appear only by their
short hash. A traceback is logged without its frames' local variables (they hold request
headers: a key, a webhook secret). A log line that cannot be written (a full disk) is dropped
and counted, never raised into the run: the run's books come first.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, TextIO, cast

import structlog

__all__ = ["configure_logging", "dropped_lines", "level_named", "logging_to"]

_handle: _LogFile | None = None
# tracebacks as data, without locals: a frame's locals may hold a key or a webhook secret
_TRACEBACKS = structlog.processors.ExceptionRenderer(
    structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
)


class _LogFile:
    """run.log's file for structlog's WriteLogger: a write or flush that fails (a full disk,
    an I/O error) is dropped and counted instead of raised into whatever was logging."""

    def __init__(self, handle: IO[str]) -> None:
        self._handle = handle
        self.dropped = 0

    def write(self, text: str) -> None:
        try:
            self._handle.write(text)
        except OSError:
            self.dropped += 1

    def flush(self) -> None:
        try:
            self._handle.flush()
        except OSError:
            self.dropped += 1

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._handle.close()


def dropped_lines() -> int:
    """run.log lines that could not be written in this process's current log."""
    return _handle.dropped if _handle is not None else 0


def level_named(name: str) -> int:
    """A level from its name (debug, info, warning, error); ValueError for another."""
    level = logging.getLevelNamesMapping().get(name.upper())
    if level is None or name.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError(f"log level {name!r} is not one of debug, info, warning, error")
    return level


class _Console:
    """A processor that writes events at or above `level` to stderr, human-readable, and
    passes every event on to the JSON file. An event that carries `said` (a sentence for a
    person: what happens now) is shown as that sentence alone, from warnings up, whatever
    `level` is (the JSON file keeps the whole event)."""

    def __init__(self, level: int, tracebacks: bool) -> None:
        self._level = level
        self._tracebacks = tracebacks  # --debug: an error's traceback is shown too
        self._render = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())

    def __call__(
        self, logger: Any, method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        level = logging.getLevelNamesMapping().get(method.upper(), 0)
        if "said" in event and level >= logging.WARNING:
            with contextlib.suppress(OSError):
                print(f"wanbatch: {event['said']}", file=sys.stderr, flush=True)
        elif level >= self._level:
            shown = (
                dict(event)
                if self._tracebacks
                else {k: v for k, v in event.items() if k != "exc_info"}
            )
            with contextlib.suppress(OSError):  # a closed or broken stderr loses only this
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
        _handle = _LogFile(path.open("a", encoding="utf-8"))
        processors += [_TRACEBACKS, structlog.processors.JSONRenderer()]
        factory: Any = structlog.WriteLoggerFactory(file=cast(TextIO, _handle))  # write, flush
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
