"""intake."""

from __future__ import annotations

from pipeline.intake.estimating import Estimate, estimate
from pipeline.intake.inputs import Uploads
from pipeline.intake.manifest import Manifest

__all__ = ["Estimate", "Manifest", "Uploads", "estimate"]
