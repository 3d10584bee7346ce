"""What the checks measure on an edit, offline: Pillow decodes, numpy counts pixels, imagehash
gives the perceptual hash and scikit-image the structural similarity (SSIM).

An image is measured on a working copy of at most `WORK` px a side: a JPEG is decoded straight
at a reduced scale (`Image.draft`, the DCT's own 1/2 to 1/8), so a 2K edit costs a few
milliseconds, not a whole decode. The product is told from its background by colour distance
from the border's median colour, the classic separation for product photos on a plain ground.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import imagehash
import numpy as np
import numpy.typing as npt
from PIL import Image, UnidentifiedImageError
from skimage.metrics import structural_similarity

__all__ = ["WORK", "Picture", "Unreadable", "measure", "picture"]

WORK = 256  # the working copy's longer side
_BORDER = 0.03  # the border band, of the shorter side (at least 2 px)
_WHITE = 250  # every channel at least this: pure white after JPEG's rounding
_APART = 40.0  # a pixel this far (largest channel difference) from the background is product
_LINE = 0.01  # a line of the box holds product on at least this share of its pixels
_SSIM_SIDE = 64  # both products are compared at this size

Pixels = npt.NDArray[np.float32]


class Unreadable(Exception):
    """The bytes are no image Pillow can decode."""


@dataclass(slots=True)
class Picture:
    """An image's working copy (RGB, 0-255) and what its header and file say; its product's
    box and its perceptual hash, once measured, are kept (an input is compared with each of
    its edits)."""

    rgb: Pixels
    width: int
    height: int
    size_bytes: int
    _box: tuple[int, int, int, int] | None = None
    _boxed: bool = False
    _hash: imagehash.ImageHash | None = None

    def box(self) -> tuple[int, int, int, int] | None:
        if not self._boxed:
            self._box, self._boxed = _box(self.rgb), True
        return self._box

    def hash(self) -> imagehash.ImageHash:
        if self._hash is None:
            self._hash = imagehash.phash(Image.fromarray(self.rgb.astype(np.uint8)))
        return self._hash


def picture(data: bytes) -> Picture:
    """Decode `data` into its working copy; Unreadable when it is not an image."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            image.draft("RGB", (WORK, WORK))  # JPEG: decoded at 1/2 to 1/8 scale
            work = image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise Unreadable(str(exc)) from None
    work.thumbnail((WORK, WORK), Image.Resampling.BILINEAR)
    return Picture(np.asarray(work, dtype=np.float32), width, height, len(data))


def _border(rgb: Pixels) -> Pixels:
    h, w = rgb.shape[:2]
    band = max(2, round(min(h, w) * _BORDER))
    return np.concatenate(
        [
            rgb[:band].reshape(-1, 3),
            rgb[-band:].reshape(-1, 3),
            rgb[band:-band, :band].reshape(-1, 3),
            rgb[band:-band, -band:].reshape(-1, 3),
        ]
    )


def _box(rgb: Pixels) -> tuple[int, int, int, int] | None:
    """The product's box (top, bottom, left, right; ends excluded), or None when the image is
    all background."""
    ground = np.median(_border(rgb), axis=0)
    apart = np.abs(rgb - ground)
    # the largest channel difference, channel by channel: max over a last axis of 3 is slow
    mask = np.maximum(np.maximum(apart[..., 0], apart[..., 1]), apart[..., 2]) > _APART
    h, w = mask.shape
    rows = np.flatnonzero(mask.sum(axis=1) > max(1, w * _LINE))
    cols = np.flatnonzero(mask.sum(axis=0) > max(1, h * _LINE))
    if rows.size == 0 or cols.size == 0:
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _cut(rgb: Pixels, box: tuple[int, int, int, int]) -> Pixels:
    top, bottom, left, right = box
    part = Image.fromarray(rgb[top:bottom, left:right].astype(np.uint8))
    side = (_SSIM_SIDE, _SSIM_SIDE)
    return np.asarray(part.resize(side, Image.Resampling.BILINEAR), dtype=np.float32)


def measure(
    edit: Picture, source: Picture | None, asked_long_side: float | None, wanted: set[str]
) -> dict[str, float | None]:
    """Each wanted rule's value on `edit` (None where it cannot be measured: no input to
    compare with, or no size asked)."""
    rgb = edit.rgb
    found: dict[str, float | None] = {"decodes": 1.0}
    long_side, short_side = max(edit.width, edit.height), min(edit.width, edit.height)
    found["long_side"], found["short_side"] = float(long_side), float(short_side)
    found["max_side"] = float(long_side)
    found["megapixels"] = round(edit.width * edit.height / 1e6, 3)
    found["file_bytes"] = float(edit.size_bytes)
    found["size"] = round(long_side / asked_long_side, 3) if asked_long_side else None
    luminance = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    found["not_blank"] = round(float(luminance.std()), 2)
    if "white_background" in wanted:
        white = (_border(rgb) >= _WHITE).all(axis=1)
        found["white_background"] = round(float(white.mean()), 4)
    box = edit.box() if wanted & {"product_fill", "product"} else None
    if "product_fill" in wanted:
        h, w = rgb.shape[:2]
        fill = 0.0 if box is None else max((box[1] - box[0]) / h, (box[3] - box[2]) / w)
        found["product_fill"] = round(fill, 3)
    found["changed"] = None
    found["product"] = None
    if source is not None and "changed" in wanted:
        found["changed"] = float(edit.hash() - source.hash())
    if source is not None and "product" in wanted:
        found["product"] = _kept(source, rgb, box)
    return {name: value for name, value in found.items() if name in wanted}


def _kept(source: Picture, rgb: Pixels, box: tuple[int, int, int, int] | None) -> float | None:
    """SSIM of the input's product and the edit's (0 when the edit has none; None when the
    input shows none to compare)."""
    theirs = source.box()
    if theirs is None:
        return None
    if box is None:
        return 0.0
    similarity = structural_similarity(  # type: ignore[no-untyped-call]
        _cut(source.rgb, theirs), _cut(rgb, box), channel_axis=2, data_range=255.0
    )
    return round(float(similarity), 3)
