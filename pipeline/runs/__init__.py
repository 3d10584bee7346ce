"""runs."""

from __future__ import annotations

from pipeline.runs.folder import RunFolder
from pipeline.runs.logs import configure_logging, level_named, logging_to
from pipeline.runs.runner import OpenSandbox, Reprocess, run
from pipeline.runs.status import FolderStatus, folder_status

__all__ = [
    "FolderStatus",
    "OpenSandbox",
    "Reprocess",
    "RunFolder",
    "configure_logging",
    "folder_status",
    "level_named",
    "logging_to",
    "run",
]
