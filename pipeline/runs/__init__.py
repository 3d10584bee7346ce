"""A run: its folder, its logs and its state, and the runner that wires the wings together.

runner.py    `run`: checks, the folder held, the engine driven, the books finished
driving.py   the engine with the ingest, the budget's cancel and the signals beside it
identity.py  which run a folder holds, and the manifest copy it keeps
verdict.py   the books finished; the exit code and its message
review.py    `retry --rejected`: a reviewer's decisions checked and recorded
folder.py    the run folder's lock and the checks before anything is sent
logs.py      run.log and the terminal's events (structlog)
status.py    `wanbatch status`: a folder's state from its journal alone
estimates.py `wanbatch estimate`: the manifest read as a run would, nothing sent
regenerate.py the edits that failed a check made again, within the budget
"""

from __future__ import annotations

from pipeline.runs.estimates import estimate
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
    "estimate",
    "folder_status",
    "level_named",
    "logging_to",
    "run",
]
