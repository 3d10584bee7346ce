"""wanbatch: batch image edits with Alibaba Wan 2.7 Image Edit on Eachlabs.

`pipeline.run(config)` runs (or resumes) a config from Python and returns its `RunSummary`;
`pipeline.load(config)` validates one. Both are imported on first use, so `import pipeline`
stays light (see `pipeline.api`).
"""

from __future__ import annotations

from typing import Any

__all__ = ["__version__", "arun", "load", "run"]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in ("run", "arun", "load"):
        from pipeline import api

        return getattr(api, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
