"""wanbatch: batch image edits with Alibaba Wan 2.7 Image Edit on Eachlabs."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
