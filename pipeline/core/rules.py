"""The automatic checks' rules, stated once: each rule's name, its bound, its default threshold
and what it measures; which run on every edit; and each channel's preset.

The config validates `checks:` against it, `pipeline.checks` measures by it, the results carry
a column pair per rule in this order, and `wanbatch publish --channel` holds a copy to the
channel's preset. A threshold is a floor (`min`: the value must be at least it) or a ceiling
(`max`: at most it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["CHANNELS", "GENERIC", "PRESETS", "RULES", "Channel", "Rule", "Threshold"]


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    bound: Literal["min", "max"]
    default: float
    unit: str
    what: str


@dataclass(frozen=True, slots=True)
class Threshold:
    """A rule as one run holds an edit to it."""

    name: str
    bound: Literal["min", "max"]
    value: float

    def passes(self, measured: float) -> bool:
        return measured >= self.value if self.bound == "min" else measured <= self.value


RULES: dict[str, Rule] = {
    rule.name: rule
    for rule in (
        Rule("decodes", "min", 1.0, "", "the image decodes (1) or not (0)"),
        Rule(
            "not_blank",
            "min",
            4.0,
            "grey levels",
            "the spread (standard deviation) of the luminance: a blank image has none",
        ),
        Rule(
            "changed",
            "min",
            8.0,
            "bits",
            "perceptual-hash distance to the input, of 64 bits: below it the edit is its input",
        ),
        Rule(
            "size",
            "min",
            1.0,
            "of asked",
            "the long side over the one asked for (1K: 1024 px, 2K: 2048 px)",
        ),
        Rule(
            "product",
            "min",
            0.5,
            "SSIM",
            "structural similarity of the product in the input and in the edit, each cut out "
            "from its background: low is a product changed or lost",
        ),
        Rule(
            "white_background",
            "min",
            0.97,
            "share",
            "the share of the border's pixels that are pure white (every channel 250 or more)",
        ),
        Rule(
            "product_fill",
            "min",
            0.85,
            "share",
            "how much of the frame the product fills: its box's longer side over the frame's",
        ),
        Rule("long_side", "min", 1000.0, "px", "the image's longer side"),
        Rule("short_side", "min", 100.0, "px", "the image's shorter side"),
        Rule("max_side", "max", 5000.0, "px", "the image's longer side, as a ceiling"),
        Rule("megapixels", "max", 64.0, "MP", "width times height, in millions"),
        Rule("file_bytes", "max", 16_000_000.0, "bytes", "the file's size"),
    )
}

# measured on every edit unless the config turns them off
GENERIC = ("decodes", "not_blank", "changed", "size", "product")

PRESETS: dict[str, dict[str, float]] = {
    # Amazon's main image: pure white background, the product filling about 85 % of the
    # frame, at least 1,000 px on the long side
    "amazon_main": {"white_background": 0.97, "product_fill": 0.85, "long_side": 1000.0},
    # Google Merchant Center: at least 100 px a side (250 for apparel: override short_side),
    # at most 64 megapixels and 16 MB
    "google_merchant": {"short_side": 100.0, "megapixels": 64.0, "file_bytes": 16_000_000.0},
    # Shopify: at most 5,000 px a side and 20 MB
    "shopify": {"max_side": 5000.0, "file_bytes": 20_000_000.0},
}


@dataclass(frozen=True, slots=True)
class Channel:
    """How `wanbatch publish --channel` makes a copy: JPEG at this quality, fitted within
    `fit` px a side when given (never enlarged)."""

    preset: str
    fit: int | None
    quality: int = 92


CHANNELS: dict[str, Channel] = {
    "amazon_main": Channel("amazon_main", None),
    "google_merchant": Channel("google_merchant", None),
    "shopify": Channel("shopify", 2048),  # Shopify recommends 2048 x 2048
}
