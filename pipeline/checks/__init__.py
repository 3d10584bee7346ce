"""The automatic checks: every stored edit measured offline against the run's rules
(`pipeline.core.rules`), so a person reviews only what needs a person.

pixels.py   what is measured on an image (and against its input): Pillow, numpy, imagehash,
            scikit-image
stage.py    the pass over a run's stored edits, each judged and journaled
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.checks.stage import CheckStage, judge

if TYPE_CHECKING:
    from pipeline.checks.pixels import Picture, Unreadable, measure, picture

__all__ = ["CheckStage", "Picture", "Unreadable", "judge", "measure", "picture"]
_PIXELS = frozenset({"Picture", "Unreadable", "measure", "picture"})


def __getattr__(name: str) -> Any:
    """The pixel side (numpy, scikit-image, imagehash) is loaded when first used, not when a
    run, the CLI or `wanbatch status` imports the package."""
    if name in _PIXELS:
        from pipeline.checks import pixels

        return getattr(pixels, name)
    raise AttributeError(f"module 'pipeline.checks' has no attribute {name!r}")
