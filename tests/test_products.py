"""Catalogs as products (issue 36): exports written the way each platform writes them, each
recognised by `wanbatch init`, run with the starter config it writes, and judged against the
sandbox's ledger: what was sent, how often, and for which row. Nothing a person would not
send is sent; the run ends 0, or 6 with only what a person would call bad listed.
"""

from __future__ import annotations

import csv
import json
import os
import re
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openpyxl import Workbook
from typer.testing import CliRunner

from pipeline.cli.app import app
from pipeline.core import (
    IMAGE_FIELDS,
    ExitCode,
    JobSpec,
    ManifestError,
    load_config,
    parse_config,
)
from pipeline.core.schema import MODEL
from pipeline.intake import Manifest, shape_catalog
from pipeline.intake.inputs import input_kind
from pipeline.intake.layouts import read_header, recognise
from pipeline.intake.where import WhereError, compile_where
from pipeline.outputs import RunSummary
from pipeline.runs import Reprocess
from pipeline.sandbox import SandboxServer
from tests.conftest import KEY, SCALE, go, ledger_cost, shrunk_sandbox

Start = Callable[..., SandboxServer]
CLI = CliRunner()
ROOT = Path(__file__).resolve().parent.parent


def _write(path: Path, rows: list[list[Any]], delimiter: str = ",") -> Path:
    with path.open("w", newline="", encoding="utf-8") as out:
        csv.writer(out, delimiter=delimiter).writerows(rows)
    return path


def _init(tmp_path: Path, export: Path, *extra: str) -> Path:
    """`wanbatch init EXPORT`: its platform, and the config it wrote."""
    config = tmp_path / "wanbatch.yaml"
    done = CLI.invoke(app, ["init", str(export), "--out", str(config), *extra])
    assert done.exit_code in (0, 6), done.output
    assert "starter config written" in done.output and "to send" in done.output
    return config


async def _run(
    sb: SandboxServer, tmp_path: Path, config: Path, *sets: str, **how: Any
) -> RunSummary:
    loaded = load_config(
        str(config),
        sets=[
            f"api.base_url={sb.base_url}",
            f"api.time_scale={SCALE}",
            f"output.dir={tmp_path / 'run'}",
            *sets,
        ],
    )
    return await go(loaded, [KEY], **how)


def _sent(sb: SandboxServer) -> list[dict[str, Any]]:
    return [job.inputs for job in list(sb.state.jobs.values())]


def _judge(sb: SandboxServer, summary: RunSummary, images: list[str]) -> list[dict[str, Any]]:
    """The ledger holds one create for each of `images` (the primary image of each edit),
    nothing else; each image field one clean HTTPS URL; the cost recorded is the cost billed;
    every results row has one final status."""
    sent = _sent(sb)
    assert Counter(i["img_url"] for i in sent) == Counter(images)
    for inputs in sent:
        for field in IMAGE_FIELDS:
            url = inputs.get(field)
            if url is not None:
                assert re.fullmatch(r"https://[^\s,]+", url) and url.count("://") == 1, url
    assert sb.stats()["refused_400"] == 0
    table = pq.read_table(summary.results_path).to_pylist()
    assert sorted(r["row_number"] for r in table) == list(range(1, len(table) + 1))
    assert {r["status"] for r in table} <= {"succeeded", "rejected", "skipped"}
    assert sum(r["cost_usd"] for r in table) == pytest.approx(ledger_cost(sb))
    return table


def _by_id(table: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["job_id"]: r for r in table}


# -- Shopify: variants under a product's first row, galleries as image rows -------------

SHOPIFY = [
    "Handle", "Title", "Body (HTML)", "Vendor", "Product Category", "Type", "Tags", "Published",
    "Option1 Name", "Option1 Value", "Variant SKU", "Variant Price", "Image Src",
    "Image Position", "Image Alt Text", "Variant Image", "Status",
]  # fmt: skip
CDN = "https://cdn.shopify.com/s/files/1/0533/products"


def _shopify() -> list[list[str]]:
    def line(handle: str, **cells: str) -> list[str]:
        return [handle if c == "Handle" else cells.get(c.replace(" ", "_"), "") for c in SHOPIFY]

    return [
        SHOPIFY,
        line("uni-tee", Title="Unisex Tee", Vendor="Acme", Type="T-Shirt", Published="true",
             Option1_Name="Size", Option1_Value="S", Variant_SKU="TEE-S",
             Image_Src=f"{CDN}/tee-front.jpg?v=17", Image_Position="1", Status="active"),
        line("uni-tee", Option1_Value="M", Variant_SKU="TEE-M"),
        line("uni-tee", Option1_Value="L", Variant_SKU="TEE-L"),
        line("uni-tee", Image_Src=f"{CDN}/tee-back.jpg?v=17", Image_Position="2"),
        line("uni-tee", Image_Src=f"{CDN}/tee-detail.jpg?v=17", Image_Position="3"),
        line("cap", Title="Dad Cap", Vendor="Acme", Type="Hat", Published="true",
             Option1_Name="Color", Option1_Value="Navy", Variant_SKU="CAP-N",
             Image_Src=f"{CDN}/cap.png", Image_Position="1", Status="active"),
        line("cap", Option1_Value="Olive", Variant_SKU="CAP-O"),
        line("mug", Title="Mug", Vendor="Acme", Type="Mug", Published="false",
             Image_Src=f"{CDN}/mug.jpg", Image_Position="1", Status="draft"),
        line("old-hat", Title="Old Hat", Vendor="Acme", Type="Hat", Published="false",
             Image_Src=f"{CDN}/old-hat.jpg", Image_Position="1", Status="archived"),
    ]  # fmt: skip


# what a Shopify export of `_shopify()` sends: the tee's three images and the cap's one
SHOPIFY_SENT = [
    f"{CDN}/{n}"
    for n in ("tee-front.jpg?v=17", "tee-back.jpg?v=17", "tee-detail.jpg?v=17", "cap.png")
]


def _readme_recipe() -> dict[str, Any]:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", readme, re.S)
    assert block is not None
    recipe: dict[str, Any] = yaml.safe_load(block.group(1))
    return recipe


@pytest.mark.anyio
async def test_the_readme_recipe_runs_a_shopify_export_with_variants_to_exit_0(
    sandbox: Start, tmp_path: Path
) -> None:
    sb = shrunk_sandbox(sandbox)
    export = _write(tmp_path / "products_export.csv", _shopify())
    recipe = _readme_recipe()
    recipe["budget"] = {"max_cost_usd": 5}
    config = tmp_path / "nightly.yaml"
    config.write_text(yaml.safe_dump(recipe))
    summary = await _run(sb, tmp_path, config)
    assert summary.exit_code is ExitCode.OK, summary.message
    table = _judge(sb, summary, SHOPIFY_SENT)
    rows = _by_id(table)
    # every image of the tee is edited with the product's Title, filled down from its first row
    prompts = {i["img_url"].rsplit("/", 1)[1]: i["prompt"] for i in _sent(sb)}
    assert all("Unisex Tee" in prompts[f"tee-{n}.jpg?v=17"] for n in ("front", "back", "detail"))
    # imageless variants are skipped, never "id repeats"; drafts and archived ones are filtered
    skipped = [r for r in table if r["status"] == "skipped"]
    assert len(skipped) == 5 and not any("repeats" in r["error_message"] for r in skipped)
    assert "manifest.where" in rows["mug/1"]["error_message"]
    assert summary.counts.get("rejected", 0) == 0 and export.is_file()


@pytest.mark.anyio
async def test_init_recognises_a_shopify_export_and_its_config_runs(
    sandbox: Start, tmp_path: Path
) -> None:
    sb = shrunk_sandbox(sandbox)
    export = _write(tmp_path / "products_export_1.csv", _shopify())
    assert recognise(read_header(export)).platform == "shopify"
    summary = await _run(sb, tmp_path, _init(tmp_path, export))
    assert summary.exit_code is ExitCode.OK, summary.message
    _judge(sb, summary, SHOPIFY_SENT)
    assert all(i["prompt"].startswith("Place this ") for i in _sent(sb))


# -- WooCommerce: a gallery in one cell, variations, drafts, a GIF --------------------------

WOO = "https://shop.example.com/wp-content/uploads/2024/05"


def _woocommerce() -> list[list[str]]:
    header = ["ID", "Type", "SKU", "Name", "Published", "Is featured?", "Visibility in catalog",
              "Short description", "Regular price", "Categories", "Images", "Parent"]  # fmt: skip
    return [
        header,
        ["101", "variable", "HOOD", "Hoodie", "1", "0", "visible", "Warm", "", "Tops",
         f"{WOO}/hoodie-1.jpg, {WOO}/hoodie-2.jpg, {WOO}/hoodie-3.jpg", ""],
        ["102", "variation", "HOOD-R", "Hoodie - Red", "1", "0", "visible", "", "45", "",
         f"{WOO}/hoodie-red.jpg", "id:101"],
        ["103", "variation", "HOOD-B", "Hoodie - Blue", "1", "0", "visible", "", "45", "", "",
         "id:101"],
        ["104", "simple", "MUG", "Draft Mug", "0", "0", "visible", "", "12", "Home",
         f"{WOO}/mug.jpg", ""],
        ["105", "simple", "CAP", "Private Cap", "-1", "0", "hidden", "", "20", "Hats",
         f"{WOO}/cap.jpg", ""],
        ["106", "simple", "STK", "Sticker", "1", "0", "visible", "", "3", "Fun",
         f"{WOO}/sticker.gif, {WOO}/sticker-2.png", ""],
    ]  # fmt: skip


@pytest.mark.anyio
async def test_a_woocommerce_gallery_is_one_edit_per_image_and_drafts_are_left_out(
    sandbox: Start, tmp_path: Path
) -> None:
    sb = shrunk_sandbox(sandbox)
    export = _write(tmp_path / "wc-product-export-7-12-2026.csv", _woocommerce())
    summary = await _run(sb, tmp_path, _init(tmp_path, export))
    images = ["hoodie-1.jpg", "hoodie-2.jpg", "hoodie-3.jpg", "hoodie-red.jpg", "sticker-2.png"]
    table = _judge(sb, summary, [f"{WOO}/{n}" for n in images])
    rows = _by_id(table)
    # each image its own edit and result row, `<id>/<position>`, with the row's other fields
    assert {"101/1", "101/2", "101/3", "102/1", "106/2"} <= {
        r["job_id"] for r in table if r["status"] == "succeeded"
    }
    assert rows["101/3"]["Name"] == "Hoodie" and rows["101/3"]["wanbatch_image"] == "3"
    assert rows["101/3"]["manifest_Images"] == f"{WOO}/hoodie-3.jpg"  # the image alone
    assert all(i.get("img_url_2") is None for i in _sent(sb))  # no gallery sent as references
    # only the GIF is what a person would call bad: exit 6, it alone rejected
    assert summary.exit_code is ExitCode.ROWS_FAILED
    rejected = [r for r in table if r["status"] == "rejected"]
    assert [r["job_id"] for r in rejected] == ["106/1"] and ".gif" in rejected[0]["error_message"]
    assert {rows[i]["status"] for i in ("104", "105")} == {"skipped"}


# -- an Amazon flat file: template lines, parent rows, Delete rows --------------------------


def _amazon() -> list[list[str]]:
    img = "https://m.media-amazon.com/images/I"
    return [
        ["TemplateType=fptcustom", "Version=2023.0613", "TemplateSignature=U0hPRVM=",
         "The top 3 rows are for Amazon.com use only. Do not modify or delete the top 3 rows.",
         "", "", "", ""],
        ["Product Type", "Seller SKU", "Brand Name", "Product Name", "Main Image URL",
         "Parentage", "Parent SKU", "Update Delete"],
        ["feed_product_type", "item_sku", "brand_name", "item_name", "main_image_url",
         "parent_child", "parent_sku", "update_delete"],
        ["shirt", "RUN-TEE", "Acme", "Running Tee", "", "parent", "", "Update"],
        ["shirt", "RUN-TEE-S", "Acme", "Running Tee S", f"{img}/61aS.jpg", "child", "RUN-TEE",
         "Update"],
        ["shirt", "RUN-TEE-M", "Acme", "Running Tee M", f"{img}/61aM.jpg", "child", "RUN-TEE",
         "PartialUpdate"],
        ["shirt", "OLD-TEE", "Acme", "Old Tee", f"{img}/51old.jpg", "", "", "Delete"],
    ]  # fmt: skip


@pytest.mark.anyio
async def test_an_amazon_flat_file_is_read_below_its_template_lines(
    sandbox: Start, tmp_path: Path
) -> None:
    sb = shrunk_sandbox(sandbox)
    export = _write(tmp_path / "Flat.File.Shirt.txt", _amazon(), delimiter="\t")
    summary = await _run(sb, tmp_path, _init(tmp_path, export))
    assert summary.exit_code is ExitCode.OK, summary.message
    img = "https://m.media-amazon.com/images/I"
    rows = _by_id(_judge(sb, summary, [f"{img}/61aS.jpg", f"{img}/61aM.jpg"]))
    assert rows["OLD-TEE"]["status"] == "skipped"  # a Delete row is never sent
    assert rows["RUN-TEE"]["status"] == "skipped"  # the parent has no image of its own
    assert "Running Tee S" in next(i["prompt"] for i in _sent(sb) if "61aS" in i["img_url"])


# -- Magento 2: relative image paths, store-view rows ---------------------------------------


def _magento() -> list[list[str]]:
    header = ["sku", "store_view_code", "attribute_set_code", "product_type", "categories",
              "product_websites", "name", "price", "base_image", "base_image_label",
              "small_image", "thumbnail_image", "additional_images"]  # fmt: skip
    return [
        header,
        ["MB01", "", "Bag", "simple", "Gear/Bags", "base", "Joust Duffle Bag", "34",
         "/m/b/mb01-blue-0.jpg", "Joust", "/m/b/mb01-blue-0.jpg", "/m/b/mb01-blue-0.jpg",
         "/m/b/mb01-black-0.jpg,/m/b/mb01-back.jpg"],
        ["MB01", "de", "Bag", "simple", "", "base", "Joust Reisetasche", "", "", "", "", "", ""],
        ["MB02", "", "Bag", "simple", "Gear/Bags", "base", "Strive Shoulder Pack", "32",
         "/m/b/mb02-gray-0.jpg", "", "", "", ""],
        ["MB02", "fr", "Bag", "simple", "", "base", "Sac Strive", "", "/m/b/mb02-gray-0.jpg", "",
         "", "", ""],
        ["24-MG04", "", "Gear", "simple", "Gear", "base", "Aim Analog Watch", "45",
         "m/g/mg04-bk-0.jpg", "", "", "", ""],
    ]  # fmt: skip


@pytest.mark.anyio
async def test_magento_relative_paths_join_the_media_url_and_store_views_are_left_out(
    sandbox: Start, tmp_path: Path
) -> None:
    sb = shrunk_sandbox(sandbox)
    export = _write(tmp_path / "catalog_product.csv", _magento())
    media = "https://shop.example.com/media/catalog/product"
    summary = await _run(sb, tmp_path, _init(tmp_path, export, "--url-base", media))
    assert summary.exit_code is ExitCode.OK, summary.message
    names = ["m/b/mb01-blue-0.jpg", "m/b/mb02-gray-0.jpg", "m/g/mg04-bk-0.jpg"]
    table = _judge(sb, summary, [f"{media}/{n}" for n in names])
    views = [r for r in table if r["store_view_code"]]
    assert len(views) == 2 and {r["status"] for r in views} == {"skipped"}


# -- a Google Sheets download: glued, schemeless, spaced and Drive URLs ---------------------


def _sheet() -> list[list[str]]:
    cdn = "https://cdn.shop.example"
    return [
        ["SKU", "Product Name", "Image URL "],  # Sheets keeps the space a person typed
        ["S1", "Lamp", f"{cdn}/lamp.jpg"],
        ["S2", "Chair", f"{cdn}/chair-a.jpg{cdn}/chair-b.jpg"],  # two pasted with no separator
        ["S3", "Table", "cdn.shop.example/table.jpg"],
        ["S4", "Sofa", f"{cdn}/summer sale/sofa 1.jpg"],
        ["S5", "Rug", "https://drive.google.com/file/d/1AbCdEfGh/view?usp=sharing"],
        ["S6", "Vase", "http://[::1]:99999/vase.jpg"],
        ["S7", "Shelf", "data:image/png;base64,iVBORw0KGgo="],
    ]


@pytest.mark.anyio
async def test_a_sheets_download_sends_only_what_a_person_would(
    sandbox: Start, tmp_path: Path
) -> None:
    sb = shrunk_sandbox(sandbox)
    export = _write(tmp_path / "Catalog - Sheet1.csv", _sheet())
    summary = await _run(sb, tmp_path, _init(tmp_path, export))
    cdn = "https://cdn.shop.example"
    rows = _by_id(_judge(sb, summary, [f"{cdn}/lamp.jpg", f"{cdn}/summer%20sale/sofa%201.jpg"]))
    assert summary.exit_code is ExitCode.ROWS_FAILED
    said = {k: rows[k]["error_message"] for k in ("S2", "S3", "S5", "S6", "S7")}
    assert f"'{cdn}/chair-a.jpg' and '{cdn}/chair-b.jpg'" in said["S2"]
    assert "did you mean https://cdn.shop.example/table.jpg" in said["S3"]
    assert "uc?export=download&id=1AbCdEfGh" in said["S5"]
    assert "port" in said["S6"] and "data: URL" in said["S7"]
    assert all(rows[k]["error_type"] == "invalid_row" for k in said)


# -- a Spark output folder with a struct and a list ------------------------------------------


def _spark(folder: Path) -> Path:
    media = pa.struct([("hero_image", pa.string()), ("gallery", pa.list_(pa.string()))])
    schema = pa.schema([("sku", pa.string()), ("title", pa.string()), ("media", media)])
    img = "https://img.example.com"
    parts = {
        "country=de": [("D1", "Stuhl", f"{img}/d1.jpg", [f"{img}/d1-ref.jpg"]),
                       ("D2", "Tisch", f"{img}/d2.jpg", [])],
        "country=fr": [("F1", "Chaise", f"{img}/f1.jpg", [f"{img}/f1-ref.jpg", f"{img}/x.jpg"])],
    }  # fmt: skip
    for number, (part, rows) in enumerate(parts.items()):
        (folder / part).mkdir(parents=True)
        table = pa.Table.from_pylist(
            [
                {"sku": s, "title": t, "media": {"hero_image": h, "gallery": g}}
                for s, t, h, g in rows
            ],
            schema=schema,
        )
        name = f"part-0000{number}-4f1c.c000.snappy.parquet"
        pq.write_table(table, folder / part / name)
        (folder / part / f".{name}.crc").write_bytes(b"crc\x00")
    (folder / "_SUCCESS").write_bytes(b"")
    return folder


@pytest.mark.anyio
async def test_a_spark_folder_with_a_struct_and_a_list_is_one_catalog(
    sandbox: Start, tmp_path: Path
) -> None:
    sb = shrunk_sandbox(sandbox)
    export = _spark(tmp_path / "catalog.parquet")
    config = _init(tmp_path, export)
    assert "media.hero_image" in config.read_text()
    summary = await _run(sb, tmp_path, config, "manifest.columns.img_url_2=media.gallery[0]")
    assert summary.exit_code is ExitCode.OK, summary.message
    img = "https://img.example.com"
    table = _judge(sb, summary, [f"{img}/d1.jpg", f"{img}/d2.jpg", f"{img}/f1.jpg"])
    refs = {i["img_url"]: i.get("img_url_2") for i in _sent(sb)}
    assert refs == {
        f"{img}/d1.jpg": f"{img}/d1-ref.jpg",
        f"{img}/d2.jpg": None,
        f"{img}/f1.jpg": f"{img}/f1-ref.jpg",
    }
    assert sorted(r["country"] for r in table) == ["de", "de", "fr"]  # the partition kept


# -- an .xlsx workbook ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_an_xlsx_feed_is_read_from_its_first_sheet(sandbox: Start, tmp_path: Path) -> None:
    sb = shrunk_sandbox(sandbox)
    book = Workbook()
    sheet = book.active
    assert sheet is not None
    img = "https://images.example.com/feed"
    for line in (
        ["id", "title", "description", "link", "image_link", "price", "availability"],
        [1001, "Café — oak chair", "Solid oak", "https://shop.example/1001", f"{img}/1001.jpg",
         129.0, "in stock"],
        [1002, "Lamp", None, "https://shop.example/1002", f"{img}/1002.jpg", 19.99, "in stock"],
        [None, None, None, None, None, None, None],
        [1003, "Rug", "", "https://shop.example/1003", None, 80, "preorder"],
    ):  # fmt: skip
        sheet.append(line)
    book.create_sheet("notes").append(["not", "the", "catalog"])
    export = tmp_path / "Merchant feed.xlsx"
    book.save(export)
    summary = await _run(sb, tmp_path, _init(tmp_path, export))
    assert summary.exit_code is ExitCode.OK, summary.message
    rows = _by_id(_judge(sb, summary, [f"{img}/1001.jpg", f"{img}/1002.jpg"]))
    assert rows["1001"]["status"] == "succeeded" and rows["1003"]["status"] == "skipped"
    assert any("Café — oak chair" in i["prompt"] for i in _sent(sb))


# -- properties: where, fill_down and images: each, for any catalog -------------------------

_WORDS = st.sampled_from(["a", "b", "draft", "1", "0", "-1", "", " ", "2.5", "null", "x y"])
_IMAGE = st.sampled_from(
    ["https://i.example.com/a.jpg", "https://i.example.com/b.png", "", "nope",
     "https://i.example.com/c.gif", "www.i.example.com/d.jpg"]
)  # fmt: skip


@given(st.text(max_size=40))
def test_any_where_text_compiles_or_names_its_position(text: str) -> None:
    try:
        found = compile_where(text)
    except WhereError as exc:
        assert 1 <= exc.position <= len(text) + 1 and "at character" in str(exc)
    else:
        assert isinstance(found.keeps({}), bool)


_OPS = st.sampled_from(["==", "!=", "<", "<=", ">", ">="])
_LITERALS = st.sampled_from(["'a'", "'draft'", "1", "0", "-1", "2.5", "null", "'x y'"])


@given(
    st.dictionaries(st.sampled_from(["s", "p", "`q r`"]), _WORDS | st.none() | st.integers()),
    _OPS,
    _LITERALS,
    _LITERALS,
)
def test_where_is_logic_whatever_the_cells(
    record: dict[str, Any], op: str, one: str, two: str
) -> None:
    cells = {k.strip("`"): v for k, v in record.items()}
    this = compile_where(f"s {op} {one}").keeps
    other = compile_where(f"`q r` == {two}").keeps
    assert compile_where(f"not (s {op} {one})").keeps(cells) is not this(cells)
    both = compile_where(f"s {op} {one} and `q r` == {two}").keeps(cells)
    assert both is (this(cells) and other(cells))
    among = compile_where(f"s in [{one}, {two}]").keeps(cells)
    equal = compile_where(f"s == {one} or s == {two}").keeps(cells)
    assert among is equal
    assert compile_where(f"s not in [{one}, {two}]").keeps(cells) is not among


_PRODUCT = st.tuples(
    st.sampled_from(["p1", "p2", "p3", ""]),  # Handle
    _WORDS,  # Title (blank on later rows, as Shopify writes it)
    _WORDS,  # Status
    st.lists(_IMAGE, max_size=4),  # the gallery cell
)


def _catalog(rows: list[tuple[str, str, str, list[str]]], folder: Path) -> Path:
    return _write(
        folder / "catalog.csv",
        [["Handle", "Title", "Status", "Images"]]
        + [[h, t, s, ", ".join(g)] for h, t, s, g in rows],
    )


def _expected(rows: list[tuple[str, str, str, list[str]]]) -> int:
    """One result per image of each row the filter keeps; one for any other row."""
    return sum(
        max(1, len([i for i in gallery if i])) if status.strip() != "draft" else 1
        for _, _, status, gallery in rows
    )


@settings(max_examples=60 if os.environ.get("CI") else 200, deadline=None)
@given(st.lists(_PRODUCT, min_size=1, max_size=8))
def test_any_catalog_reads_to_one_item_per_image_and_never_a_traceback(
    rows: list[tuple[str, str, str, list[str]]],
) -> None:
    with tempfile.TemporaryDirectory(prefix="wanbatch-products-") as name:
        folder = Path(name)
        config = _each_config(folder, _catalog(rows, folder), "sandbox")
        shaped = shape_catalog(
            config.manifest, folder, again=True, model=MODEL, allow_loopback=False
        )
        manifest = Manifest(shaped, model=MODEL, allow_loopback=False)
        items = [item for batch in manifest.batches() for item in batch]
    assert len(items) == _expected(rows)
    assert [i.row_number for i in items] == list(range(1, len(items) + 1))
    for item in items:
        if isinstance(item, JobSpec):
            image = item.inputs["img_url"]  # a local file is judged by the input stage, after
            assert image.startswith("https://") or input_kind(image) == "file", image
            assert re.fullmatch(r"[^/]*/\d+", item.job_id), item.job_id
        else:
            assert item.reason.startswith(f"row {item.row_number}")


def _each_config(folder: Path, path: Path, base_url: str) -> Any:
    return parse_config(
        {
            "api": {"base_url": base_url, "time_scale": SCALE},
            "manifest": {
                "path": str(path),
                "id_column": "Handle",
                "columns": {"img_url": "Images"},
                "images": "each",
                "fill_down": {"by": "Handle", "columns": ["Title"]},
                "where": "Status != 'draft'",
                "prompt_template": "Place this {Title} on white",
            },
            "output": {"dir": str(folder / "run")},
            "polling": {"expected_latency_s": 2},
        },
        folder,
    )


@settings(max_examples=6, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_PRODUCT, min_size=1, max_size=6))
def test_any_catalog_runs_to_one_result_per_image_and_no_refused_create(
    sandbox: Start, rows: list[tuple[str, str, str, list[str]]]
) -> None:
    sb = shrunk_sandbox(sandbox, latency_mean_s=1)  # one per example: its ledger is the judge
    with tempfile.TemporaryDirectory(prefix="wanbatch-products-") as name:
        folder = Path(name)
        config = _each_config(folder, _catalog(rows, folder), sb.base_url)
        summary = anyio.run(go, config, [KEY])
        assert summary.exit_code in (ExitCode.OK, ExitCode.ROWS_FAILED), summary.message
        table = pq.read_table(summary.results_path).to_pylist()
    assert len(table) == _expected(rows)
    assert sb.stats()["refused_400"] == 0
    assert sum(r["cost_usd"] for r in table) == pytest.approx(ledger_cost(sb))
    sent = Counter(i["img_url"] for i in _sent(sb))
    assert sum(sent.values()) == sum(r["status"] == "succeeded" for r in table)


# -- removed products -----------------------------------------------------------------------


def _removed(run_dir: Path) -> dict[str, dict[str, Any]]:
    """removed.csv by id, with whether each stored image is there."""
    with (run_dir / "removed.csv").open(encoding="utf-8") as handle:
        rows = {r["job_id"]: dict(r) for r in csv.DictReader(handle)}
    for row in rows.values():
        row["stored"] = bool(row["path"]) and Path(row["path"]).is_file()
    return rows


@pytest.mark.anyio
async def test_a_product_gone_since_last_night_is_listed_in_removed_csv(
    sandbox: Start, tmp_path: Path
) -> None:
    sb = shrunk_sandbox(sandbox)
    export = _write(tmp_path / "products_export.csv", _shopify())
    config = _init(tmp_path, export)
    night = tmp_path / "night1"
    first = await _run(sb, tmp_path, config, f"output.dir={night}")
    assert first.exit_code is ExitCode.OK and first.removed == 0
    assert not (night / "removed.csv").exists()
    # the reviewer approves the cap's edit, then the shop deletes the cap
    decisions = _write(
        tmp_path / "d.csv", [["job_id", "row", "decision"], ["cap/1", "6", "approve"]]
    )
    await _run(
        sb, tmp_path, config, f"output.dir={night}", reprocess=Reprocess((), decisions=decisions)
    )
    _write(export, [row for row in _shopify() if row[0] != "cap"])
    second = await _run(sb, tmp_path, config, f"output.dir={tmp_path / 'night2'}")
    assert second.exit_code is ExitCode.OK and second.removed == 2  # cap/1, and its variant row
    by_id = _removed(tmp_path / "night2")
    assert set(by_id) == {"cap/1", "cap/"}
    assert by_id["cap/1"]["approved"] == "yes" and by_id["cap/1"]["prediction_id"]
    assert by_id["cap/1"]["last_run"] == str(night) and by_id["cap/1"]["stored"]
    assert by_id["cap/"]["last_status"] == "skipped" and by_id["cap/"]["approved"] == "no"
    summary = json.loads((tmp_path / "night2" / "summary.json").read_text())
    assert summary["removed_products"] == 2
    # listed once: a third night without the cap has nothing removed; back, it is present again
    third = await _run(sb, tmp_path, config, f"output.dir={tmp_path / 'night3'}")
    assert third.removed == 0 and not (tmp_path / "night3" / "removed.csv").exists()


# -- the parts: identity after skipping, filters that cannot be read ------------------------


@pytest.mark.anyio
async def test_a_skipped_row_never_holds_its_id_against_a_row_that_is_sent(
    sandbox: Start, tmp_path: Path
) -> None:
    sb = shrunk_sandbox(sandbox)
    export = _write(
        tmp_path / "variants.csv",
        [["Handle", "Image Src", "Title"],
         ["tee", "", "Tee"],  # a variant first, without an image: skipped
         ["tee", "", ""],
         ["tee", f"{CDN}/tee.jpg", ""],  # the product's image, in a later batch
         ["mug", f"{CDN}/mug.jpg", "Mug"],
         ["mug", f"{CDN}/mug-2.jpg", ""]],  # a real repeat: rejected, naming row 4
    )  # fmt: skip
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"manifest": {
        "path": str(export), "id_column": "Handle", "columns": {"img_url": "Image Src"},
        "skip_if_blank": ["img_url"], "fill_down": {"by": "Handle", "columns": ["Title"]},
        "prompt_template": "Place this {Title} on white", "batch_rows": 1,
    }}))  # fmt: skip
    summary = await _run(sb, tmp_path, config)
    table = _judge(sb, summary, [f"{CDN}/tee.jpg", f"{CDN}/mug.jpg"])
    by_row = {r["row_number"]: r for r in table}
    assert [by_row[n]["status"] for n in range(1, 6)] == [
        "skipped", "skipped", "succeeded", "succeeded", "rejected",
    ]  # fmt: skip
    assert by_row[3]["job_id"] == "tee" and by_row[1]["job_id"] == "tee#row-1"
    assert "repeats row 4" in by_row[5]["error_message"]


@pytest.mark.parametrize(
    ("where", "said"),
    [
        ("Status == 'active' and", "at character 23: expected a column name"),
        ("Status = 'x'", "at character 8: cannot read"),
        ("Staus == 'x'", "names column 'Staus'"),
        ("Status in ['a', 'b'", "at character 20: expected ',' or ']'"),
        ("`Item Type == 'x'", "at character 1: cannot read"),
    ],
)
def test_a_filter_that_cannot_be_read_stops_before_anything_naming_where(
    tmp_path: Path, where: str, said: str
) -> None:
    export = _write(tmp_path / "c.csv", [["id", "Status", "img"], ["1", "active", "x.jpg"]])
    config = parse_config(
        {"manifest": {"path": str(export), "where": where}, "output": {"dir": str(tmp_path)}},
        tmp_path,
    )
    with pytest.raises(ManifestError, match=re.escape(said)):
        Manifest(config.manifest, model=MODEL, allow_loopback=False)


@pytest.mark.parametrize(
    ("name", "lines", "platform"),
    [
        ("products_export_1.csv", [SHOPIFY], "shopify"),
        ("wc-product-export.csv", _woocommerce()[:1], "woocommerce"),
        ("catalog_product.csv", _magento()[:1], "magento"),
        ("products-2026-12-07.csv", [["Item Type", "Product ID", "Product Name",
                                     "Product Image File - 1", "Product Image URL - 1"]],
         "bigcommerce"),
        ("Flat.File.txt", _amazon()[:3], "amazon"),
        ("feed.tsv", [["id", "title", "description", "link", "image_link", "price"]],
         "merchant_center"),
        ("my shop.csv", [["Artikelnummer", "Name", "Bild URL"]], "generic"),
    ],
)  # fmt: skip
def test_init_recognises_each_platform_by_its_header(
    tmp_path: Path, name: str, lines: list[list[str]], platform: str
) -> None:
    delimiter = "\t" if name.endswith((".tsv", ".txt")) else ","
    export = _write(tmp_path / name, lines, delimiter)
    config = _init(tmp_path, export)
    written = yaml.safe_load(config.read_text())
    assert f"a {platform} export" in config.read_text()
    assert written["manifest"]["columns"]["img_url"] in {c for line in lines for c in line}
    if platform == "bigcommerce":
        assert written["manifest"]["columns"]["img_url"] == "Product Image URL - 1"
    if platform == "amazon":
        assert written["manifest"]["header_row"] == 3
