"""Thumbnails for the HTML report, made locally (never hot-linked) into the run folder's
`report-thumbs/`: each output's when it is stored, each input's when it is read (uploads) or
fetched beside the downloads (public URLs). Names come from the row and index, or from the
input's content hash or URL hash, never from text of the manifest or the provider.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Protocol

from pipeline.core.files import THUMBS
from pipeline.core.schema import UPLOAD_TOKEN

__all__ = [
    "THUMBS",
    "FolderThumbs",
    "ThumbSink",
    "input_thumb",
    "make_thumbnail",
    "output_thumb",
    "save_thumb",
    "write_thumb",
]

_SIDE = 160  # px, the longer side


def output_thumb(row_number: int, index: int) -> str:
    return f"o-{row_number:08d}-{index}.jpg"


def input_thumb(value: str) -> str:
    """The thumbnail name of an input: by its content hash when uploaded, else its URL's hash."""
    if value.startswith(UPLOAD_TOKEN):
        return f"i-{value.removeprefix(UPLOAD_TOKEN).rsplit('/', 1)[-1].split('.')[0][:40]}.jpg"
    return f"i-{hashlib.sha256(value.encode()).hexdigest()[:40]}.jpg"


def make_thumbnail(data: bytes) -> bytes:
    """A small JPEG of an image (JPEG sources are decoded at a reduced scale: cheap)."""
    from PIL import Image  # loaded only when thumbnails are made

    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (_SIDE * 2, _SIDE * 2))
        image.thumbnail((_SIDE, _SIDE))
        out = io.BytesIO()
        image.convert("RGB").save(out, format="JPEG", quality=70)
    return out.getvalue()


def write_thumb(folder: Path, name: str, data: bytes) -> None:
    """Write a thumbnail of `data` as `name`, whole or not at all; OSError and a picture
    Pillow cannot read (ValueError, OSError) are the caller's to ignore."""
    save_thumb(folder, name, make_thumbnail(data))


def save_thumb(folder: Path, name: str, thumbnail: bytes) -> None:
    """Write a thumbnail already made, whole or not at all."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.tmp"
    tmp.write_bytes(thumbnail)
    os.replace(tmp, folder / name)


class ThumbSink(Protocol):
    """Where the downloader's thumbnails go: the run folder, or (on a Ray worker) the driver,
    which writes them there."""

    def put(self, name: str, data: bytes) -> None:
        """A thumbnail of the image `data`, as `name` (raises as `write_thumb` does)."""


class FolderThumbs:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def put(self, name: str, data: bytes) -> None:
        write_thumb(self.folder, name, data)
