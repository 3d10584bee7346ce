"""Real catalogs as they are exported (issue 24): a Shopify product export, a Merchant Center
TSV feed, an Excel CSV in cp1252, a typed Parquet with a list of images, a DataFrame from
Python; and the promises that hold for any row and any manifest, searched by Hypothesis.

The sandbox's ledger is the judge: one result per row, every create's input as a person would
have sent it (each image field one URL, the prompt filled from the row), nothing refused by
the provider's schema (`refused_400`), cost recorded equal to cost billed.
"""

from __future__ import annotations

import csv
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pipeline
from pipeline.core import (
    IMAGE_FIELDS,
    ExitCode,
    JobSpec,
    ManifestError,
    Rejected,
    apply_overrides,
    check_input,
    parse_config,
)
from pipeline.core.schema import MODEL
from pipeline.intake import Manifest
from pipeline.intake.inputs import input_kind
from pipeline.intake.rowmap import PromptTemplate, RowMapper, split_images
from pipeline.outputs import RunSummary
from pipeline.runs import Reprocess, estimate
from pipeline.sandbox import FaultRates, SandboxServer
from tests.conftest import (
    KEY,
    SCALE,
    go,
    judge_against_ledger,
    ledger_cost,
    make_config,
    shrunk_sandbox,
)

Start = Callable[..., SandboxServer]


def _created_inputs(sb: SandboxServer) -> list[dict[str, Any]]:
    return [job.inputs for job in list(sb.state.jobs.values())]


def _judge(sb: SandboxServer, summary: RunSummary, rows: int) -> list[dict[str, Any]]:
    """One result per row, nothing the provider refused, cost as billed, and each image field
    of each create one URL."""
    table = pq.read_table(summary.results_path).to_pylist()
    assert sorted(r["row_number"] for r in table) == list(range(1, rows + 1))
    assert {r["status"] for r in table} <= {"succeeded", "failed", "rejected", "skipped"}
    assert sb.stats()["refused_400"] == 0
    assert sum(r["cost_usd"] for r in table) == pytest.approx(ledger_cost(sb))
    for inputs in _created_inputs(sb):
        for field in IMAGE_FIELDS:
            if field in inputs:
                assert split_images(inputs[field])[0] == [inputs[field]], inputs[field]
    return table


def _write(path: Path, header: list[str], rows: list[list[str]], **how: Any) -> Path:
    encoding = how.pop("encoding", "utf-8")
    with path.open("w", newline="", encoding=encoding) as out:
        writer = csv.writer(out, **how)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# -- a Shopify product export --------------------------------------------------------------

SHOPIFY = [
    "Handle", "Title", "Body (HTML)", "Vendor", "Type", "Tags", "Published", "Option1 Name",
    "Option1 Value", "Variant SKU", "Variant Price", "Image Src", "Image Position",
    "Image Alt Text", "Status",
]  # fmt: skip


def _shopify_rows() -> list[list[str]]:
    cdn = "https://cdn.shopify.com/s/files/1/0001/products"
    tee, mug = f"{cdn}/tee", f"{cdn}/mug"
    return [
        # a product with two variants: the first row carries its first image
        ["tee", "Classic Tee", "<p>Soft</p>", "Acme", "T-Shirt", "cotton", "true", "Size",
         "S", "TEE-S", "20.00", f"{tee}-front.jpg?v=1", "1", "front", "active"],
        ["tee", "", "", "", "", "", "", "", "M", "TEE-M", "20.00", "", "", "", ""],
        # an image-only row: Handle, the image and its position, nothing else
        ["tee", "", "", "", "", "", "", "", "", "", "", f"{tee}-back.jpg?v=1", "2", "back", ""],
        # a product with no image at all
        ["gift-card", "Gift Card", "", "Acme", "Card", "", "true", "Title", "Default",
         "GIFT", "25.00", "", "", "", "active"],
        ["mug", "Mug #1 {best}", "", "Acme: Home", "Mug", "", "true", "Title", "Default",
         "MUG", "12.00", f"{mug}.png", "1", "", "draft"],
    ]  # fmt: skip


@pytest.mark.anyio
async def test_a_shopify_export_runs_as_exported(sandbox: Start, tmp_path: Path) -> None:
    sb = shrunk_sandbox(sandbox)
    path = _write(tmp_path / "products_export_1.csv", SHOPIFY, _shopify_rows())
    config = make_config(
        tmp_path,
        sb.base_url,
        path,
        api={"time_scale": SCALE},
        manifest={
            "path": str(path),
            "id_column": ["Handle", "Image Position"],
            "columns": {"img_url": "Image Src"},
            "prompt_template": "Place this {Type} by {Vendor} on a marble countertop",
            "skip_if_blank": ["img_url"],
        },
    )
    summary = await go(config, [KEY])
    rows = {r["row_number"]: r for r in _judge(sb, summary, 5)}
    assert [rows[n]["status"] for n in range(1, 6)] == [
        "succeeded", "skipped", "rejected", "skipped", "succeeded",
    ]  # fmt: skip
    assert rows[1]["job_id"] == "tee/1" and rows[5]["job_id"] == "mug/1"
    # the image-only row has no Type to fill the template: rejected, naming the column
    assert "column 'Type' is blank" in rows[3]["error_message"]
    assert "skip_if_blank" in rows[2]["error_message"]
    # values go into the prompt as they are: braces, '#' and ':' stay text
    prompts = sorted(i["prompt"] for i in _created_inputs(sb))
    assert prompts == [
        "Place this Mug by Acme: Home on a marble countertop",
        "Place this T-Shirt by Acme on a marble countertop",
    ]
    # the shop's own columns are kept: `Status` beside ours, and the mapped `Image Src`
    assert rows[1]["manifest_Status"] == "active" and rows[1]["status"] == "succeeded"
    assert rows[1]["Image Src"].endswith("tee-front.jpg?v=1")
    # skipped rows are not failures: no failures manifest entry, no exit 6
    assert summary.exit_code is ExitCode.ROWS_FAILED  # the one rejected image-only row
    assert summary.counts["skipped"] == 2
    failures = (summary.run_dir / "failures.csv").read_text()
    assert "TEE-M" not in failures and "GIFT" not in failures
    # an estimate counts them the same way, before anything is sent
    found = estimate(config, keys=1)
    assert (found.rows, found.skipped, found.rejected, found.to_send) == (5, 2, 1, 2)
    assert found.rejected_by_rule == {"prompt_template: column 'Type' is blank": 1,
                                      "prompt_template: column 'Vendor' is blank": 1}  # fmt: skip


# -- a Merchant Center feed (TSV, several images in one cell) ----------------------------


def _feed_rows() -> list[list[str]]:
    img = "https://images.example.com"
    return [
        ["SKU1", "Red dress", f"{img}/1.jpg", f"{img}/1b.jpg,{img}/1c.jpg"],
        # a CDN's transform parameters hold commas: they stay inside their URL
        ["SKU2", "Blue shirt", f"{img}/2.jpg", f"{img}/2b.jpg?tr=w_800,h_800, {img}/2c.jpg"],
        ["SKU3", "Hat", f"{img}/3.jpg", ""],
        ["SKU4", "Scarf", f"{img}/4.jpg", ",".join(f"{img}/4{c}.jpg" for c in "bcde")],
    ]


@pytest.mark.anyio
@pytest.mark.parametrize("extra", ["reject", "keep_first"])
async def test_a_merchant_center_tsv_with_several_images_in_a_cell(
    sandbox: Start, tmp_path: Path, extra: str
) -> None:
    sb = shrunk_sandbox(sandbox)
    header = ["id", "title", "image_link", "additional_image_link"]
    path = _write(tmp_path / "feed.tsv", header, _feed_rows(), delimiter="\t")
    config = make_config(
        tmp_path,
        sb.base_url,
        path,
        api={"time_scale": SCALE},
        manifest={
            "path": str(path),
            "id_column": "id",
            "columns": {"img_url": "image_link", "img_url_2": "additional_image_link"},
            "prompt_template": "Put the {title} on a plain white background",
            "extra_images": extra,
        },
    )
    summary = await go(config, [KEY])
    rows = {r["id"]: r for r in _judge(sb, summary, 4)}
    sent = {i["prompt"].split(" ")[2]: i for i in _created_inputs(sb)}
    assert sent["Red"]["img_url_3"].endswith("/1c.jpg")
    assert sent["Blue"]["img_url_2"].endswith("/2b.jpg?tr=w_800,h_800")
    assert sent["Blue"]["img_url_3"].endswith("/2c.jpg")
    assert "img_url_2" not in sent["Hat"]
    if extra == "reject":  # four more images where three fields are left
        assert rows["SKU4"]["status"] == "rejected"
        assert "holds 4 images" in rows["SKU4"]["error_message"]
    else:
        assert sent["Scarf"]["img_url_4"].endswith("/4d.jpg")
        assert rows["SKU4"]["status"] == "succeeded"


# -- an Excel export in cp1252, and a typed Parquet -----------------------------------------


@pytest.mark.anyio
async def test_an_excel_export_in_cp1252_reads_as_written(sandbox: Start, tmp_path: Path) -> None:
    sb = shrunk_sandbox(sandbox)
    rows = [["A1", "Café table — oak", "https://x.example.com/a.jpg"]]
    path = _write(tmp_path / "excel.csv", ["sku", "prompt", "img_url"], rows, encoding="cp1252")
    config = make_config(
        tmp_path,
        sb.base_url,
        path,
        api={"time_scale": SCALE},
        manifest={"path": str(path), "id_column": "sku", "encoding": "cp1252"},
    )
    summary = await go(config, [KEY])
    assert summary.exit_code is ExitCode.OK, summary.message
    _judge(sb, summary, 1)
    assert _created_inputs(sb)[0]["prompt"] == "Café table — oak"


@pytest.mark.anyio
async def test_a_typed_parquet_with_a_list_of_images_and_nullable_ints(
    sandbox: Start, tmp_path: Path
) -> None:
    sb = shrunk_sandbox(sandbox)
    img = "https://x.example.com"
    table = pa.table(
        {
            "sku": pa.array([101, 102, 103], pa.int64()),
            "prompt": ["one", "two", "three"],
            "images": pa.array(
                [[f"{img}/1.jpg", f"{img}/1b.jpg"], [f"{img}/2.jpg"], []], pa.list_(pa.string())
            ),
            "seed": pa.array([7, None, 9], pa.int64()),
        }
    )
    path = tmp_path / "catalog.parquet"
    pq.write_table(table, path)
    config = make_config(
        tmp_path,
        sb.base_url,
        path,
        api={"time_scale": SCALE},
        manifest={"path": str(path), "id_column": "sku", "columns": {"img_url": "images"}},
    )
    summary = await go(config, [KEY])
    rows = {r["row_number"]: r for r in _judge(sb, summary, 3)}
    assert rows[3]["status"] == "rejected" and "img_url" in rows[3]["error_message"]
    sent = {i["prompt"]: i for i in _created_inputs(sb)}
    assert sent["one"]["img_url_2"] == f"{img}/1b.jpg" and sent["one"]["seed"] == 7
    # a null seed cell is no seed: one is drawn for the row, and the results name it
    assert sent["two"]["seed"] == rows[2]["seed"] != 7
    assert pq.read_schema(summary.results_path).field("sku").type == pa.int64()
    images = pq.read_table(summary.run_dir / "images.parquet")  # the id keeps its type there too
    assert images.schema.field("sku").type == pa.int64()
    made = zip(images["sku"].to_pylist(), images["index"].to_pylist(), strict=True)
    assert sorted(made) == [(101, 0), (102, 0)]


# -- from Python: a DataFrame in, a DataFrame out ----------------------------------------------


def test_a_dataframe_runs_and_resumes_from_python(sandbox: Start, tmp_path: Path) -> None:
    sb = shrunk_sandbox(sandbox)
    frame = pd.DataFrame(
        {
            "sku": ["A", "B", "C"],
            "prompt": ["p1", "p2", "p3"],
            "img_url": [f"https://x.example.com/{c}.jpg" for c in "abc"],
            "n": pd.array([1, None, 2], dtype="Int64"),
        }
    )
    config = {
        "api": {"base_url": sb.base_url, "time_scale": SCALE},
        "manifest": {"id_column": "sku"},  # no path: the DataFrame is the manifest
        "output": {"dir": str(tmp_path / "run")},
    }
    summary = pipeline.run(config, keys=[KEY], manifest=frame)
    assert summary.exit_code is ExitCode.OK, summary.message
    results = summary.results()
    assert list(results["sku"]) == ["A", "B", "C"]
    assert str(results["images"].dtype) == "int64[pyarrow]"
    assert list(results["images"]) == [1, 1, 2]
    assert (tmp_path / "run" / "manifest.parquet").is_file()
    again = pipeline.run(config, keys=[KEY], manifest=frame)  # the same table: a resume
    assert again.exit_code is ExitCode.OK and sb.stats()["creates"] == 3
    judge_against_ledger(sb, tmp_path / "run", 3)


# -- rows that crashed or vanished --------------------------------------------------------------


def _manifest(path: Path, **section: Any) -> Manifest:
    data = {"manifest": {"path": str(path), **section}, "output": {"dir": "o"}}
    config = parse_config(data, path.parent)
    return Manifest(config.manifest, model=MODEL, allow_loopback=False)


def _items(manifest: Manifest) -> list[JobSpec | Rejected]:
    return [item for batch in manifest.batches() for item in batch]


def test_a_quote_that_never_closes_names_its_line_and_every_row_it_swallowed(
    tmp_path: Path,
) -> None:
    lines = ["sku,prompt,img_url"]
    lines += [f"S{i},edit {i},https://x.example.com/{i}.jpg" for i in range(1, 41)]
    lines[20] = 'S20,"edit 20,https://x.example.com/20.jpg'  # row 20, line 21: never closed
    path = tmp_path / "m.csv"
    path.write_text("\n".join(lines) + "\n")
    items = _items(_manifest(path, id_column="sku"))
    assert [i.row_number for i in items] == list(range(1, 41))  # no row vanishes
    assert all(isinstance(i, JobSpec) for i in items[:19])
    broken = items[19]
    assert isinstance(broken, Rejected)
    assert "a quote opened on line 21 of the file never closes" in broken.reason
    assert all(isinstance(i, Rejected) and "unread" in i.reason for i in items[20:])


@pytest.mark.parametrize("cell", ["--5", "+-2", "²", "①", "5.5", "nan", "1e3"])
def test_numbers_a_person_would_not_send_are_rejected_not_a_crash(
    tmp_path: Path, cell: str
) -> None:
    path = tmp_path / "m.csv"
    path.write_text(f"sku,prompt,img_url,seed\nA,p,https://x.example.com/a.jpg,{cell}\n")
    (item,) = _items(_manifest(path, id_column="sku"))
    assert isinstance(item, Rejected) and "seed (column 'seed'): must be an integer" in item.reason


@pytest.mark.parametrize(
    "image", ["", "   ", "\u200b", "http://[::1", "https://x.example.com/a.gif"]
)
def test_a_bad_or_blank_primary_image_is_a_rejected_row(tmp_path: Path, image: str) -> None:
    path = tmp_path / "m.csv"
    path.write_text(f"sku,prompt,img_url\nA,p,{image}\nB,p,https://x.example.com/b.jpg\n")
    first, second = _items(_manifest(path, id_column="sku"))
    assert isinstance(first, Rejected) and "img_url" in first.reason
    assert isinstance(second, JobSpec)


def test_file_level_problems_stop_before_anything(tmp_path: Path) -> None:
    twice = pa.table([pa.array(["a"]), pa.array(["b"]), pa.array(["https://x/a.jpg"])],
                     names=["prompt", "prompt", "img_url"])  # fmt: skip
    pq.write_table(twice, tmp_path / "twice.parquet")
    with pytest.raises(ManifestError, match="repeated column name"):
        _manifest(tmp_path / "twice.parquet")
    path = tmp_path / "m.csv"
    path.write_text("sku,Title,img_url\nA,t,https://x.example.com/a.jpg\n")
    with pytest.raises(ManifestError, match=r"prompt_template names \{Vendor\}"):
        _manifest(path, prompt_template="A {Title} by {Vendor}")


def test_set_keeps_text_exactly_and_reads_numbers_and_lists() -> None:
    data = apply_overrides(
        {},
        [
            "manifest.defaults.prompt=Place on marble #1 best seller",
            "manifest.prompt_template=Background: pure white",
            "limits.max_concurrent=5",
            "manifest.skip_if_blank=[img_url]",
        ],
    )
    assert data["manifest"]["defaults"]["prompt"] == "Place on marble #1 best seller"
    assert data["manifest"]["prompt_template"] == "Background: pure white"
    assert data["limits"]["max_concurrent"] == 5
    assert data["manifest"]["skip_if_blank"] == ["img_url"]


# -- properties: any row, any manifest ----------------------------------------------------------

_TEXT = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40
) | st.sampled_from(
    ["", " ", "\u200b", "https://x.example.com/a.jpg", "https://x.example.com/a.jpg,https://x.example.com/b.png",
     "https://x.example.com/c.jpg?tr=w_1,h_2 https://x.example.com/d.webp", "2K", "1k", "4", "-1",
     "--5", "²", "http://[::1", "s3://bucket/a.jpg", "{x}", "x" * 6000]
)  # fmt: skip
_CELL = (
    _TEXT
    | st.none()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.booleans()
    | st.lists(_TEXT | st.none() | st.integers(), max_size=6)
    | st.dictionaries(st.text(max_size=5), _TEXT, max_size=3)
)
_COLUMNS = ["id", "prompt", "img", "more", "size", "n", "seed", "title"]


@settings(max_examples=150 if os.environ.get("CI") else 400)
@given(st.fixed_dictionaries({c: _CELL for c in _COLUMNS}), st.booleans(), st.booleans())
def test_any_row_maps_to_one_outcome_and_never_to_a_create_the_provider_refuses(
    record: dict[str, Any], templated: bool, keep_first: bool
) -> None:
    mapper = RowMapper(
        MODEL,
        {"prompt": "prompt", "img_url": "img", "img_url_2": "more", "size": "size", "n": "n",
         "seed": "seed"},
        {"size": "2K"},
        ("id",),
        False,
        PromptTemplate("Place the {title} on white") if templated else None,
        ("img_url",) if keep_first else (),
        "keep_first" if keep_first else "reject",
    )  # fmt: skip
    item = mapper.map(7, record)
    assert item.row_number == 7
    if isinstance(item, JobSpec):
        # a local file or an object is judged (and uploaded) by the input stage, after this
        later = {f for f in IMAGE_FIELDS if input_kind(str(item.inputs.get(f))) != "url"}
        assert [v for v in check_input(item.inputs) if v.field not in later] == []
        for field in IMAGE_FIELDS:
            if field in item.inputs:
                assert split_images(item.inputs[field])[0] == [item.inputs[field]]
    else:
        assert item.reason.startswith("row 7: ")


_ROW = st.fixed_dictionaries(
    {
        "sku": st.text(max_size=8),
        "prompt": _TEXT,
        "img_url": _TEXT,
        "seed": _TEXT,
        "note": st.text(max_size=30),
    }
)


@settings(max_examples=10, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(_ROW, min_size=1, max_size=12), tsv=st.booleans())
def test_any_manifest_runs_to_one_result_per_row_and_no_refused_create(
    sandbox: Start, rows: list[dict[str, Any]], tsv: bool
) -> None:
    sb = shrunk_sandbox(sandbox, latency_mean_s=1)  # one per example: its ledger is the judge
    with tempfile.TemporaryDirectory(prefix="wanbatch-property-") as name:
        folder = Path(name)
        path = folder / ("m.tsv" if tsv else "m.csv")
        with path.open("w", newline="", encoding="utf-8") as out:
            writer = csv.writer(out, delimiter="\t" if tsv else ",")
            writer.writerow(list(rows[0]))
            writer.writerows([list(r.values()) for r in rows])
        config = make_config(folder, sb.base_url, path, api={"time_scale": SCALE})
        summary = anyio.run(go, config, [KEY])
        assert summary.exit_code in (ExitCode.OK, ExitCode.ROWS_FAILED), summary.message
        table = pq.read_table(summary.results_path).to_pylist()
    assert sorted(r["row_number"] for r in table) == list(range(1, len(rows) + 1))
    assert sb.stats()["refused_400"] == 0  # no create the provider's schema refuses
    billed = ledger_cost(sb)
    assert sum(r["cost_usd"] for r in table) == pytest.approx(billed)


@pytest.mark.anyio
async def test_last_nights_folder_is_retried_after_tonights_export_replaced_the_file(
    sandbox: Start, tmp_path: Path
) -> None:
    sb = shrunk_sandbox(sandbox, faults=FaultRates(job_error=0.3), seed=11)
    path = _write(
        tmp_path / "export.csv",
        ["sku", "prompt", "img_url"],
        [[f"S{i}", f"edit {i}", f"https://x.example.com/{i}.jpg"] for i in range(1, 21)],
    )
    config = make_config(tmp_path, sb.base_url, path, api={"time_scale": SCALE})
    first = await go(config, [KEY])
    failed = first.counts.get("failed", 0)
    assert failed > 0 and (first.run_dir / "manifest-source.csv").is_file()
    # tonight's export replaces the file: last night's folder still reads what it started with
    _write(path, ["sku", "prompt", "img_url"], [["T1", "other", "https://x.example.com/t.jpg"]])
    again = await go(config, [KEY], reprocess=Reprocess(None))
    assert again.requeued is not None and sum(again.requeued.values()) == failed
    assert sb.stats()["creates"] == 20 + failed + first.stats.job_retries + again.stats.job_retries
    assert all(r["sku"].startswith("S") for r in again.results().to_dict("records"))
    # --force takes the file as it is now: its one row differs from row 1 as sent (a row
    # sent keeps what was sent), and the 19 rows it no longer has were paid for, so are kept
    forced = await go(config, [KEY], force=True)
    assert forced.forced == {"changed_after_sent": 1, "kept": 19}
