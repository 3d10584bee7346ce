"""wanbatch: batch image edits with Alibaba Wan 2.7 Image Edit on Eachlabs.

`pipeline.run(config)` runs (or resumes) a config from Python and returns its `RunSummary`;
`pipeline.load(config)` validates one. What a caller catches is here too: `ConfigError`,
`ManifestError`, `RunFolderError` (before anything is sent), and `RunEnded` with one subclass
per exit code (`RowsFailed`, `BudgetReached`, ...), each carrying its `RunSummary`. All are
imported on first use, so `import pipeline` stays light (see `pipeline.api`).
"""

from __future__ import annotations

from typing import Any

_API = ("run", "arun", "load")
_ERRORS = (
    "WanbatchError",
    "ConfigError",
    "ManifestError",
    "RunFolderError",
    "RunEnded",
    "RunFailed",
    "RunInterrupted",
    "KeysRefused",
    "BudgetReached",
    "RowsFailed",
    "KeysMissing",
    "CostsUnconfirmed",
    "BalanceOut",
    "ProviderDown",
    "ExitCode",
)

__all__ = ["RunSummary", "__version__", *_API, *_ERRORS]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _API:
        from pipeline import api

        return getattr(api, name)
    if name in _ERRORS:
        from pipeline import core

        return getattr(core, name)
    if name == "RunSummary":
        from pipeline.outputs import RunSummary

        return RunSummary
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
