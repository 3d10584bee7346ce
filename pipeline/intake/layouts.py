"""`wanbatch init`: an export recognised from its header, and a commented starter config for it.

Each platform writes its catalog its own way; what the starter config says for each is what
the platform's export needs (see docs/catalogs.md):

- Shopify: a product's fields on its first row (`fill_down`), variants without images
  (skipped), drafts and archived products left out (`where`), one edit per image row;
- WooCommerce: a gallery in one cell (`images: each`), drafts and private products left out;
- Magento 2: relative image paths (`url_base`), store-view rows repeating a product left out;
- BigCommerce: product rows only (not SKU or rule rows);
- Amazon flat file: template lines above the header (recognised), Delete rows left out;
- Google Merchant Center: one item per row, its main image;
- anything else: the columns that look like an id, an image and a title.
"""

from __future__ import annotations

import csv
import glob
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core import ManifestError
from pipeline.intake.manifest import AMAZON_HEADER_ROW, amazon_flat_file, tabbed

__all__ = ["Layout", "read_header", "recognise", "starter_config"]


@dataclass(frozen=True, slots=True)
class Layout:
    """What an export is, and the manifest settings its starter config gets."""

    platform: str  # shopify, woocommerce, magento, bigcommerce, amazon, merchant_center, generic
    manifest: dict[str, object]
    notes: list[str] = field(default_factory=list)  # comments written above the manifest


@dataclass(frozen=True, slots=True)
class Header:
    columns: list[str]
    header_row: int | None = None  # an Amazon flat file's line 3
    kind: str = "csv"


def read_header(path: Path) -> Header:
    """The export's column names (a Parquet struct's fields as `name.field`)."""
    if path.is_dir() or glob.has_magic(str(path)) or path.suffix.lower() in (".parquet", ".pq"):
        files = (
            [path]
            if path.is_file()
            else sorted(
                p
                for p in (
                    path.rglob("*.parquet") if path.is_dir() else map(Path, glob.glob(str(path)))
                )
                if not p.name.startswith((".", "_"))
            )
        )
        if not files:
            raise ManifestError(f"{path} holds no Parquet file")
        try:
            schema = pq.read_schema(files[0])
        except (pa.ArrowException, OSError) as exc:
            raise ManifestError(f"{files[0]} cannot be read as Parquet: {exc}") from None
        names: list[str] = []
        for f in schema:
            names.append(f.name)
            if pa.types.is_struct(f.type):
                names += [f"{f.name}.{child.name}" for child in f.type]
        return Header(names, kind="parquet")
    if path.suffix.lower() in (".xlsx", ".xlsm"):
        from openpyxl import load_workbook

        try:
            book = load_workbook(path, read_only=True, data_only=True)
            rows = [
                list(r)
                for _, r in zip(
                    range(3), book.worksheets[0].iter_rows(values_only=True), strict=False
                )
            ]
            book.close()
        except Exception as exc:  # noqa: BLE001 - openpyxl raises many kinds for a bad file
            raise ManifestError(f"{path} is not a readable .xlsx workbook: {exc}") from None
        line = AMAZON_HEADER_ROW if rows and amazon_flat_file(str(rows[0][0] or "")) else 1
        cells = rows[line - 1] if len(rows) >= line else []
        return Header(
            [str(c).strip() for c in cells if c is not None], line if line > 1 else None, "xlsx"
        )
    try:
        with path.open(encoding="utf-8-sig", errors="replace", newline="") as handle:
            lines = [handle.readline() for _ in range(3)]
    except OSError as exc:
        raise ManifestError(f"{path} cannot be read: {exc.strerror}") from None
    line = AMAZON_HEADER_ROW if amazon_flat_file(lines[0]) else 1
    text = lines[line - 1]
    delimiter = "\t" if tabbed(text) else ","
    names = next(csv.reader([text], delimiter=delimiter), [])
    kind = "tsv" if delimiter == "\t" else "csv"
    return Header([n.strip() for n in names], line if line > 1 else None, kind)


def _pick(columns: list[str], *words: str) -> str | None:
    """The first column whose name (lower case) is one of `words`, else contains one."""
    lower = {c.lower(): c for c in columns}
    for word in words:
        if word in lower:
            return lower[word]
    for word in words:
        for name, column in lower.items():
            if word in name:
                return column
    return None


def _shopify(c: list[str]) -> Layout:
    filled = [n for n in ("Title", "Vendor", "Type", "Status", "Published") if n in c]
    where = "Status != 'draft' and Status != 'archived'" if "Status" in c else None
    return Layout(
        "shopify",
        {
            "id_column": ["Handle", "Image Position"],
            "columns": {"img_url": "Image Src"},
            "fill_down": {"by": "Handle", "columns": filled},
            "skip_if_blank": ["img_url"],
            **({"where": where} if where else {}),
            "prompt_template": "Place this {Title} on a clean white studio background",
        },
        [
            "Shopify writes a product's Title, Vendor and Type on its first row only: "
            "fill_down carries them to its other rows",
            "variant rows without an image are skipped; each image row is one edit",
        ],
    )


def _woocommerce(c: list[str]) -> Layout:
    published = _pick(c, "published")
    return Layout(
        "woocommerce",
        {
            "id_column": "ID",
            "columns": {"img_url": "Images"},
            "images": "each",
            "skip_if_blank": ["img_url"],
            **({"where": f"`{published}` == 1"} if published else {}),
            "prompt_template": "Place this {Name} on a clean white studio background",
        },
        [
            "a product's gallery is one cell: each of its images is its own edit (<ID>/<n>)",
            "drafts (Published 0) and private products (-1) are left out",
        ],
    )


def _magento(c: list[str]) -> Layout:
    return Layout(
        "magento",
        {
            "id_column": "sku",
            "columns": {"img_url": "base_image"},
            "url_base": "https://YOUR-STORE/media/catalog/product",
            "skip_if_blank": ["img_url"],
            **({"where": "store_view_code == null"} if "store_view_code" in c else {}),
            "prompt_template": "Place this {name} on a clean white studio background",
        },
        [
            "Magento's image paths are relative (/m/b/mb01.jpg): set url_base to your "
            "store's media URL (init --url-base does)",
            "rows of a store view repeat their product: only the default rows are edited",
        ],
    )


def _bigcommerce(c: list[str]) -> Layout:
    image = _pick(c, "product image url - 1", "product image file - 1") or "Product Image File - 1"
    return Layout(
        "bigcommerce",
        {
            "id_column": "Product ID",
            "columns": {"img_url": image},
            "skip_if_blank": ["img_url"],
            "where": "`Item Type` == 'Product'",
            "prompt_template": "Place this {Product Name} on a clean white studio background",
        },
        ["only Product rows are edited; SKU and Rule rows share their product's images"],
    )


def _amazon_layout(c: list[str]) -> Layout:
    where = "update_delete != 'Delete'" if "update_delete" in c else None
    return Layout(
        "amazon",
        {
            "id_column": "item_sku",
            "columns": {"img_url": "main_image_url"},
            "skip_if_blank": ["img_url"],
            **({"where": where} if where else {}),
            "prompt_template": "Place this {item_name} on a pure white background",
        },
        [
            "the flat file's two template lines above its header are recognised and passed",
            "Delete rows are left out; parent rows without a main image are skipped",
        ],
    )


def _merchant(c: list[str]) -> Layout:
    return Layout(
        "merchant_center",
        {
            "id_column": "id",
            "columns": {"img_url": "image_link"},
            "skip_if_blank": ["img_url"],
            "prompt_template": "Place this {title} on a clean white studio background",
        },
        ["each item's image_link is edited; additional_image_link is left as it is"],
    )


def _generic(c: list[str]) -> Layout:
    image = _pick(c, "img_url", "image_url", "image", "img", "photo", "picture", "url")
    ident = _pick(c, "id", "sku", "handle", "product_id")
    title = _pick(c, "title", "name", "product_name")
    manifest: dict[str, object] = {"columns": {"img_url": image or "CHOOSE-THE-IMAGE-COLUMN"}}
    if ident:
        manifest["id_column"] = ident
    manifest["skip_if_blank"] = ["img_url"]
    subject = f"{{{title}}}" if title else "product"
    manifest["prompt_template"] = f"Place this {subject} on a clean white studio background"
    notes = ["no platform recognised: the columns below were chosen by their names"]
    if image is None:
        notes.append("no column looks like an image: set manifest.columns.img_url")
    return Layout("generic", manifest, notes)


_RECOGNISED: list[tuple[Callable[[set[str]], bool], Callable[[list[str]], Layout]]] = [
    (lambda s: {"Handle", "Image Src"} <= s, _shopify),
    (lambda s: {"ID", "Type", "Images"} <= s and ("Name" in s or "SKU" in s), _woocommerce),
    (lambda s: {"sku", "base_image"} <= s, _magento),
    (lambda s: {"Item Type", "Product ID"} <= s, _bigcommerce),
    (lambda s: {"item_sku"} <= s and ("main_image_url" in s), _amazon_layout),
    (lambda s: {"id", "image_link"} <= s, _merchant),
]


def recognise(header: Header) -> Layout:
    names = set(header.columns)
    for test, make in _RECOGNISED:
        if test(names):
            return make(header.columns)
    return _generic(header.columns)


def _yaml(value: object) -> str:
    return json.dumps(value, ensure_ascii=False)  # JSON is YAML: every value quoted as needed


def starter_config(path: Path, header: Header, layout: Layout, url_base: str | None) -> str:
    """The commented starter config for `path`, read from the folder it is written to."""
    manifest = dict(layout.manifest)
    if url_base is not None and "url_base" in manifest:
        manifest["url_base"] = url_base
    lines = [
        f"# wanbatch starter config for {path.name}: a {layout.platform} export",
        "# Runs on the embedded sandbox first (no key, nothing paid). For the real run, set",
        "# api.base_url to https://api.eachlabs.ai/v1 and EACHLABS_API_KEY in the environment.",
        "api:",
        "  base_url: sandbox",
        "manifest:",
        f"  path: {_yaml(str(path))}",
    ]
    if header.header_row:
        lines.append(f"  header_row: {header.header_row}  # the lines above it are template lines")
    for note in layout.notes:
        lines.append(f"  # {note}")
    for key, value in manifest.items():
        if isinstance(value, dict):
            lines.append(f"  {key}:")
            lines += [f"    {k}: {_yaml(v)}" for k, v in value.items()]
        else:
            lines.append(f"  {key}: {_yaml(value)}")
    lines += [
        "  defaults: {size: 2K, n: 1}",
        "output:",
        f"  dir: {_yaml('runs/' + path.stem.replace(' ', '_') + '/%Y-%m-%d')}",
        "budget:",
        "  max_cost_usd: 50  # a run stops sending when its cost would pass this",
        "sandbox:  # the embedded sandbox only: its durations shrunk 20x",
        "  time_scale: 0.05",
        "incremental:  # rows unchanged since the last night are not paid for again",
        "  enabled: true",
        f"  state: {_yaml('runs/' + path.stem.replace(' ', '_') + '/state.sqlite')}",
        "",
    ]
    return "\n".join(lines)
