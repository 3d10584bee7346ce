"""The checks' pass over a run: every stored edit not measured yet is read back from the store,
measured against its input, judged by the run's thresholds, and the result journaled.

It runs after each round's downloads, so a crash or a stop leaves the unmeasured images to the
next run of the same command, and a resumed or reused row is measured like any other. An input
that cannot be fetched (no network, a presigned upload) leaves the rules that compare with it
unmeasured (null), which never fails an edit: the rules that need nothing else still judge it.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import httpx
import structlog

from pipeline.core import (
    MAX_INPUT_BYTES,
    UPLOAD_TOKEN,
    ConfigError,
    ObjectTooLarge,
    Threshold,
    read_stored,
    sample_address,
    tls_context,
)
from pipeline.journal import CheckTarget, Journal, Measured

if TYPE_CHECKING:
    from pipeline.checks.pixels import Picture

__all__ = ["CheckStage", "judge"]

_log = structlog.get_logger("pipeline.checks.stage")
_LONG_SIDE = {"1K": 1024, "2K": 2048}
_HELD_INPUTS = 512  # inputs' working copies kept (a catalog's rows often share one)


def judge(
    thresholds: list[Threshold], values: dict[str, float | None]
) -> tuple[dict[str, float | None], list[str]]:
    """The measures kept (one per rule held) and the rules failed, in the rules' order; a rule
    not measured (None) does not fail."""
    kept = {t.name: values.get(t.name) for t in thresholds}
    failed = [t.name for t in thresholds if (v := kept[t.name]) is not None and not t.passes(v)]
    return kept, failed


class CheckStage:
    """Measures a run's stored edits; `run(journal)` in a thread, each image in a pool."""

    def __init__(
        self,
        thresholds: list[Threshold],
        run_dir: Path,
        storage_options: dict[str, str],
        *,
        image_scale: float = 1.0,
        samples_from: str | None = None,
        largest: int = 50_000_000,
    ) -> None:
        self._thresholds = thresholds
        self._wanted = {t.name for t in thresholds}
        self._run_dir = run_dir
        self._options = storage_options
        self._largest = largest  # assets.max_bytes: no stored edit is larger
        self._scale = image_scale
        self._samples_from = samples_from  # the embedded sandbox's root, for its samples
        self._inputs: OrderedDict[str, Picture | None] = OrderedDict()
        self._dead_hosts: set[str] = set()  # inputs' hosts that could not be reached
        self._lock = threading.Lock()

    def run(self, journal: Journal) -> int:
        """Measure every stored edit not measured yet; how many were."""
        if not self._thresholds:
            return 0
        done = 0
        with (
            httpx.Client(
                timeout=httpx.Timeout(30.0, connect=10.0),
                follow_redirects=True,
                verify=tls_context(),
            ) as http,
            ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1)), "checks") as pool,
        ):
            for batch in journal.checks.images_to_check():
                measured = list(pool.map(lambda t: self._one(t, http), batch))
                journal.checks.record_checks(measured)
                done += len(measured)
        if done:
            _log.info("checked", images=done)
        return done

    def _one(self, target: CheckTarget, http: httpx.Client) -> Measured:
        from pipeline.checks.pixels import Unreadable, measure, picture  # numpy & co., when used

        try:
            edit = picture(read_stored(target.path, self._run_dir, self._options, self._largest))
        except Unreadable:
            return self._undecodable(target)
        except (OSError, ConfigError, ObjectTooLarge) as exc:
            _log.warning("check_unread", row=target.row_number, error=str(exc)[:300])
            return self._undecodable(target)
        source = self._input(target.source, http) if target.source else None
        asked = _LONG_SIDE.get(target.size or "2K", 2048) * self._scale
        values, failed = judge(self._thresholds, measure(edit, source, asked, self._wanted))
        held = {t.name: (values[t.name], t.bound, t.value) for t in self._thresholds}
        return Measured(target.row_number, target.index, held, failed)

    def _undecodable(self, target: CheckTarget) -> Measured:
        """An edit that cannot be read back as an image fails `decodes`, measured or not."""
        held = {
            t.name: (0.0 if t.name == "decodes" else None, t.bound, t.value)
            for t in self._thresholds
        }
        return Measured(target.row_number, target.index, held, ["decodes"])

    def _input(self, url: str, http: httpx.Client) -> Picture | None:
        """The input's working copy (fetched once per address), or None when it cannot be had."""
        if url.startswith(UPLOAD_TOKEN):
            return None
        url = sample_address(url, self._samples_from) or url  # a demo sample: whatever its query
        with self._lock:
            if url in self._inputs:
                self._inputs.move_to_end(url)
                return self._inputs[url]
        found = self._fetch(url, http)
        with self._lock:
            self._inputs[url] = found
            if len(self._inputs) > _HELD_INPUTS:
                self._inputs.popitem(last=False)
        return found

    def _fetch(self, url: str, http: httpx.Client) -> Picture | None:
        from pipeline.checks.pixels import Unreadable, picture

        parts = urlsplit(url)
        if parts.netloc in self._dead_hosts:
            return None
        try:
            with http.stream("GET", url) as answer:
                answer.raise_for_status()
                data = bytearray()
                for chunk in answer.iter_bytes():
                    data += chunk
                    if len(data) > MAX_INPUT_BYTES:
                        return None
            return picture(bytes(data))
        except httpx.TransportError:
            self._dead_hosts.add(parts.netloc)  # one try per unreachable host, not per row
            return None
        except (httpx.HTTPError, Unreadable, ValueError, OverflowError) as exc:
            _log.debug("check_input_unavailable", error=f"{type(exc).__name__}: {exc}"[:300])
            return None
