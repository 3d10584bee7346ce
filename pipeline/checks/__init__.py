"""The automatic checks: every stored edit measured offline against the run's rules
(`pipeline.core.rules`), so a person reviews only what needs a person.

pixels.py   what is measured on an image (and against its input): Pillow, numpy, imagehash,
            scikit-image
stage.py    the pass over a run's stored edits, each judged and journaled
"""

from __future__ import annotations

from pipeline.checks.pixels import Picture, Unreadable, measure, picture
from pipeline.checks.stage import CheckStage, judge

__all__ = ["CheckStage", "Picture", "Unreadable", "judge", "measure", "picture"]
