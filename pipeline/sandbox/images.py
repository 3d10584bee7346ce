"""Pictures for the sandbox: sample product photos to edit, and the "edited" outputs.

Everything is drawn with Pillow, deterministically, so no binary file ships with the project.
An output is made from its input as a product photo: the input's product cut out from its
ground and set on pure white, filling 87-92 % of the frame (the seed says where in that range),
at the long side the size promises (1024 or 2048 px, times the sandbox's image scale) and the
aspect ratio of the LAST input image, as the provider does. At set rates an output has one of
the faults a marketplace refuses (`EDIT_FAULTS`), drawn from the output's own hash.
"""

from __future__ import annotations

import functools
import hashlib
import io
import random
import weakref

from PIL import Image, ImageChops, ImageDraw, ImageEnhance, ImageOps

from pipeline.core import EDIT_FAULTS

__all__ = [
    "EDIT_FAULTS",
    "SAMPLES",
    "edit_fault",
    "pad_jpeg",
    "render_output",
    "sample_image",
    "sample_picture",
    "sample_png",
    "synthetic_input",
    "target_size",
]

# name: (width, height, background, product colour, shape)
SAMPLES: dict[str, tuple[int, int, str, str, str]] = {
    "sneaker-red.png": (800, 800, "#f4f1ea", "#c0392b", "shoe"),
    "sneaker-blue.png": (800, 800, "#eef2f5", "#2e6fb7", "shoe"),
    "mug-white.png": (800, 600, "#dfe6e9", "#fdfdfd", "mug"),
    "mug-black.png": (800, 600, "#f7e9d7", "#2d3436", "mug"),
    "tshirt-green.png": (600, 800, "#fafafa", "#27ae60", "shirt"),
    "tshirt-yellow.png": (600, 800, "#ececec", "#f1c40f", "shirt"),
    "lamp-brass.png": (600, 900, "#f5f5f0", "#b8860b", "lamp"),
    "backpack-grey.png": (900, 600, "#e8ecef", "#7f8c8d", "bag"),
}

_ASPECTS = ((1, 1), (4, 3), (3, 4), (16, 9), (2, 3))


def _draw_product(size: tuple[int, int], background: str, colour: str, shape: str) -> Image.Image:
    w, h = size
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    cx, cy, r = w // 2, h // 2, min(w, h) // 3
    if shape == "shoe":
        draw.rounded_rectangle((cx - r, cy - r // 3, cx + r, cy + r // 2), r // 4, fill=colour)
        draw.ellipse((cx - r // 2, cy - r, cx + r // 3, cy), fill=colour)
        draw.rectangle((cx - r, cy + r // 2, cx + r, cy + r // 2 + r // 8), fill="#333333")
    elif shape == "mug":
        draw.rectangle(
            (cx - r // 2, cy - r // 2, cx + r // 2, cy + r // 2),
            fill=colour,
            outline="#555555",
            width=4,
        )
        draw.arc((cx + r // 3, cy - r // 4, cx + r, cy + r // 4), 270, 90, fill="#555555", width=12)
    elif shape == "shirt":
        draw.polygon(
            [
                (cx - r, cy - r // 2),
                (cx - r // 3, cy - r),
                (cx + r // 3, cy - r),
                (cx + r, cy - r // 2),
                (cx + r // 2, cy - r // 4),
                (cx + r // 2, cy + r),
                (cx - r // 2, cy + r),
                (cx - r // 2, cy - r // 4),
            ],
            fill=colour,
        )
    elif shape == "lamp":
        draw.polygon(
            [
                (cx - r // 2, cy - r // 4),
                (cx + r // 2, cy - r // 4),
                (cx + r // 4, cy - r),
                (cx - r // 4, cy - r),
            ],
            fill=colour,
        )
        draw.rectangle((cx - 6, cy - r // 4, cx + 6, cy + r), fill="#444444")
        draw.ellipse((cx - r // 3, cy + r - 12, cx + r // 3, cy + r + 12), fill="#444444")
    else:
        draw.rounded_rectangle((cx - r // 2, cy - r, cx + r // 2, cy + r), r // 3, fill=colour)
        draw.rectangle((cx - r // 3, cy, cx + r // 3, cy + r // 2), outline="#333333", width=5)
    return image


@functools.cache
def sample_picture(name: str) -> Image.Image | None:
    """A sample product photo by its file name: the one picture, shared by every caller (drawn
    once; not to be drawn on: `sample_image` gives a copy for that)."""
    spec = SAMPLES.get(name)
    if spec is None:
        return None
    w, h, background, colour, shape = spec
    return _draw_product((w, h), background, colour, shape)


def sample_image(name: str) -> Image.Image | None:
    """A sample product photo by its file name (a copy: a caller may draw on it)."""
    image = sample_picture(name)
    return None if image is None else image.copy()


@functools.cache
def sample_png(name: str) -> bytes | None:
    """A sample's PNG file, encoded once: the samples are fixed pictures, served often."""
    image = sample_picture(name)
    return None if image is None else encode_png(image)


def synthetic_input(url: str) -> Image.Image:
    """A stand-in for an input the sandbox may not fetch: a product drawn from the URL's hash."""
    digest = hashlib.sha256(url.encode()).digest()
    aw, ah = _ASPECTS[digest[0] % len(_ASPECTS)]
    size = (64 * aw, 64 * ah) if max(aw, ah) <= 4 else (48 * aw, 48 * ah)
    colour = "#{:02x}{:02x}{:02x}".format(*digest[1:4])
    shape = ("shoe", "mug", "shirt", "lamp", "bag")[digest[4] % 5]
    return _draw_product(size, "#f0f0f0", colour, shape)


def target_size(size: str, aspect_from: tuple[int, int], image_scale: float) -> tuple[int, int]:
    """Long side 1024 (1K) or 2048 (2K) px times image_scale, with the given aspect ratio."""
    long_side = max(8, round((1024 if size == "1K" else 2048) * image_scale))
    w, h = aspect_from
    if w >= h:
        return long_side, max(1, round(long_side * h / w))
    return max(1, round(long_side * w / h)), long_side


def edit_fault(prediction_id: str, index: int, rates: dict[str, float]) -> str | None:
    """Which fault (if any) this output has: one draw from the output's own hash, so every
    fetch of it gives the same picture and a test can tell each output's fault."""
    draw = int.from_bytes(hashlib.sha256(f"{prediction_id}:{index}".encode()).digest()[:8]) / 2**64
    for name in EDIT_FAULTS:
        rate = rates.get(name, 0.0)
        if draw < rate:
            return name
        draw -= rate
    return None


# the cut-outs of the sources rendered lately: a job's outputs, and a catalog's rows that share
# a photo, are drawn from one source (kept by the sandbox per input address)
_CUTS: dict[int, tuple[weakref.ref[Image.Image], tuple[Image.Image, Image.Image]]] = {}
_CUTS_HELD = 256


def _product(source: Image.Image) -> tuple[Image.Image, Image.Image]:
    """The source's product cut out (its box) and its mask: what differs from the colour of
    the source's corners; cut once per source picture (neither is drawn on afterwards)."""
    held = _CUTS.get(id(source))
    if held is not None and held[0]() is source:
        return held[1]
    rgb = source.convert("RGB")
    ground = Image.new("RGB", rgb.size, rgb.getpixel((0, 0)))
    mask = ImageChops.difference(rgb, ground).convert("L").point(lambda v: 255 if v > 24 else 0)
    box = mask.getbbox() or (0, 0, rgb.width, rgb.height)
    cut = rgb.crop(box), mask.crop(box)
    if len(_CUTS) >= _CUTS_HELD:
        _CUTS.clear()
    _CUTS[id(source)] = (weakref.ref(source), cut)
    return cut


def render_output(
    source: Image.Image, size: tuple[int, int], seed: int, index: int, fault: str | None = None
) -> bytes:
    """The edited picture, as a product photo: the source's product on pure white, filling
    87-92 % of the frame (the seed sets where in that range, and a slight shift of light), or
    the fault's picture; JPEG bytes."""
    rng = random.Random(f"{seed}:{index}")
    if fault == "unchanged_output":
        image = ImageOps.fit(source.convert("RGB"), size)
    else:
        if fault == "undersized_output":
            size = (max(1, size[0] // 2), max(1, size[1] // 2))
        grey = rng.randrange(150, 205)
        ground = (grey, grey, grey) if fault == "grey_background" else (255, 255, 255)
        image = Image.new("RGB", size, ground)
        if fault != "missing_product":
            part, mask = _product(source)
            fill = rng.uniform(0.35, 0.5) if fault == "small_product" else rng.uniform(0.87, 0.92)
            scale = fill / max(part.width / size[0], part.height / size[1])
            fitted = (max(1, round(part.width * scale)), max(1, round(part.height * scale)))
            part = ImageEnhance.Brightness(part.resize(fitted)).enhance(rng.uniform(0.96, 1.04))
            at = ((size[0] - fitted[0]) // 2, (size[1] - fitted[1]) // 2)
            image.paste(part, at, mask.resize(fitted))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


_NOISE = random.Random(7).randbytes(65_533)  # incompressible, as a photo's entropy is


def pad_jpeg(body: bytes, at_least: int) -> bytes:
    """The same JPEG grown to `at_least` bytes with application segments (APP15) of noise
    after its start marker: a real 2K output's size on the wire and on disk, still one valid
    image that decodes to the same pixels, without drawing 4 MB worth of picture."""
    segments = []
    missing = at_least - len(body)
    while missing > 0:
        chunk = _NOISE[: min(len(_NOISE), missing)]
        segments.append(b"\xff\xef" + (len(chunk) + 2).to_bytes(2, "big") + chunk)
        missing -= len(chunk) + 4
    return body[:2] + b"".join(segments) + body[2:]


def encode_png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
