"""Stored images never overwrite each other (issue 37): a name is unique by construction, with
64 bits of hash, and a file that would replace another row's is an error, never a silent
replace."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.journal.rows import of_edit, stem
from pipeline.outputs.downloads import FolderStore, image_name


def _remade(times: int) -> str:
    """A row's history after `times` rejected edits, as the journal keeps it."""
    return json.dumps([{"review": "rejected"} for _ in range(times)])


def test_a_remake_is_never_another_rows_name() -> None:
    remade = image_name(stem("P", _remade(1)), 0, "png")
    other = image_name(stem("P-redo1", None), 0, "png")
    assert remade.startswith("P-redo1-") and other.startswith("P-redo1-")
    assert remade != other
    # ids that read alike once made safe, found in seconds against a 32-bit hash
    alike = [image_name(stem(job_id, None), 0, "png") for job_id in ("SKU/@/::", "SKU=@+:;")]
    assert alike[0] != alike[1]
    # the same row's edit of another run (`--fresh`) is named apart, never over it
    fresh = [image_name(of_edit(stem("P", None), p), 0, "png") for p in ("pred-1", "pred-2")]
    assert fresh[0] != fresh[1] and all(name.startswith("P-") for name in fresh)


def test_an_id_with_colons_is_named_whole() -> None:
    assert image_name(stem("a:b:c", None, "pred-1"), 0, "png").startswith("a_b_c-")


_EDIT = st.tuples(st.text(max_size=20), st.integers(0, 3), st.sampled_from(["p1", "p2", None]))


@given(_EDIT, _EDIT, st.integers(0, 3))
def test_two_edits_never_share_a_name(
    one: tuple[str, int, str | None], two: tuple[str, int, str | None], index: int
) -> None:
    named = [
        image_name(stem(job_id, _remade(n) if n else None, p), index, "png")
        for job_id, n, p in (one, two)
    ]
    assert (named[0] == named[1]) == (one == two)


def test_a_file_that_is_another_images_is_never_replaced(tmp_path: Path) -> None:
    store = FolderStore(tmp_path / "images", tmp_path)
    store.check()
    where = store.put("P-0123456789abcdef-0.png", b"first")
    assert store.put("P-0123456789abcdef-0.png", b"first") == where  # the same image again
    with pytest.raises(OSError, match="holds another image"):
        store.put("P-0123456789abcdef-0.png", b"second")
    assert (tmp_path / where).read_bytes() == b"first"
