"""A newcomer's first hour (issue 36): what used to be found out by trial is said or just works.
A sandbox in its own process says how to point a config at it, a taken port is one line,
global options go anywhere, a closed pipe ends quietly, the closing summary is whole off a
terminal, a run refused before it starts leaves no folder behind, `estimate` honours key
groups and counts a rule once, and every message names only commands that exist."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from pipeline.cli.app import app, global_first
from pipeline.core import parse_config
from pipeline.intake import Manifest
from pipeline.intake.estimating import rule_of
from pipeline.runs import estimate
from tests.conftest import catalog, write_manifest
from tests.test_faults import _cli

CLI = CliRunner()
_ENV = {k: v for k, v in os.environ.items() if not k.startswith("EACHLABS_API_KEY")}


def _wanbatch(*args: str) -> subprocess.CompletedProcess[str]:
    """`wanbatch ARGS` in its own process, with no API key in its environment."""
    return _cli(*args, env=_ENV)


def _config(tmp_path: Path, rows: int = 3, **manifest: Any) -> Path:
    path = write_manifest(tmp_path / "catalog.csv", catalog(rows))
    data = {
        "api": {"base_url": "sandbox"},
        "manifest": {"path": str(path), "id_column": "sku", **manifest},
        "output": {"dir": str(tmp_path / "a-rather-long-folder-name-for-tonight" / "run")},
        "sandbox": {"time_scale": 0.02, "keys": 1},
    }
    config = tmp_path / "wanbatch.yaml"
    config.write_text(yaml.safe_dump(data))
    return config


def test_global_options_are_taken_after_the_subcommand(tmp_path: Path) -> None:
    argv = ["run", "c.yaml", "--log-level", "debug", "--set", "a=1", "--debug"]
    assert global_first(argv) == [
        "--log-level",
        "debug",
        "--debug",
        "run",
        "c.yaml",
        "--set",
        "a=1",
    ]
    assert global_first(["estimate", "--log-level=info", "c.yaml"])[0] == "--log-level=info"
    done = _wanbatch("estimate", str(_config(tmp_path)), "--log-level", "debug")
    assert done.returncode == 0, done.stderr
    assert "to send" in done.stdout


def test_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    config = _config(tmp_path)
    err = tmp_path / "err.txt"
    done = subprocess.run(
        ["bash", "-o", "pipefail", "-c", f"'{sys.executable}' -m pipeline estimate "
         f"'{config}' 2>'{err}' | true"],
        env=_ENV, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0 and err.read_text() == ""


def test_the_closing_summary_is_whole_off_a_terminal(tmp_path: Path) -> None:
    done = _wanbatch("run", str(_config(tmp_path)))
    assert done.returncode == 0, done.stderr
    run_dir = tmp_path / "a-rather-long-folder-name-for-tonight" / "run"
    assert str(run_dir / "results.parquet") in done.stdout and "…" not in done.stdout
    assert any(line.startswith("rows ") for line in done.stdout.splitlines())


def test_a_run_refused_before_it_starts_leaves_no_folder_behind(tmp_path: Path) -> None:
    config = _config(tmp_path)
    done = _wanbatch("run", str(config), "--set", "api.base_url=https://127.0.0.1:9/v1")
    assert done.returncode == 2 and "no API key" in done.stderr
    assert not (tmp_path / "a-rather-long-folder-name-for-tonight" / "run").exists()
    missing = _wanbatch("run", str(config), "--set", f"manifest.path={tmp_path / 'gone.csv'}")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert not (tmp_path / "a-rather-long-folder-name-for-tonight" / "run").exists()


def test_a_sandbox_says_how_to_point_a_config_at_it_and_a_taken_port_is_one_line() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "sandbox", "--port", "0", "--keys", "k1,k2",
         "--time-scale", "0.05", "--faults", "job_error=0.1,create_5xx=0.02"],
        stdout=subprocess.PIPE, text=True, env=_ENV,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline().strip() for _ in range(9)]
        base = lines[0]
        assert base.startswith("http://127.0.0.1:") and base.endswith("/v1")
        assert (
            f"#     base_url: {base}" in lines
            and "#     time_scale: 0.05   # as this sandbox's --time-scale" in lines
            and "#   EACHLABS_API_KEYS=k1,k2" in lines
        )
        port = base.removeprefix("http://127.0.0.1:").removesuffix("/v1")
        taken = _wanbatch("sandbox", "--keys", "k", "--port", port)
        assert taken.returncode == 2
        assert taken.stderr.strip().count("\n") == 0 and f"port {port}" in taken.stderr
        assert "Traceback" not in taken.stderr
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_a_fault_has_one_name_and_every_sandbox_flag_its_help() -> None:
    bad = CLI.invoke(app, ["sandbox", "--keys", "k", "--faults", "create-5xx=0.1"])
    assert bad.exit_code == 2 and "create_5xx" in bad.output  # the names it takes, listed
    helped = CLI.invoke(app, ["sandbox", "--help"], env={"COLUMNS": "200"}).output
    options = re.findall(r"^│ [ *] +(--[\w-]+)(.*?)│$", helped, flags=re.M)
    assert len(options) > 30
    bare = [name for name, rest in options if not re.sub(r"<\w+>|\[[^]]*\]", "", rest).strip()]
    assert bare == []


def test_estimate_honours_key_groups_and_counts_a_rule_once(tmp_path: Path) -> None:
    path = write_manifest(tmp_path / "m.csv", catalog(400))
    data: dict[str, Any] = {
        "api": {"base_url": "https://127.0.0.1:9/v1"},
        "limits": {"creates_per_window": 100, "window_s": 60, "max_concurrent": 10},
        "polling": {"expected_latency_s": 30},
        "manifest": {"path": str(path), "id_column": "sku"},
        "output": {"dir": str(tmp_path / "run")},
    }
    apart = estimate(parse_config(data, tmp_path), 2)
    data["limits"]["groups"] = [[1, 2]]
    shared = estimate(parse_config(data, tmp_path), 2)
    # 10 jobs in flight for two keys of one account, not 20: the concurrency binds at 30 s jobs
    assert shared.duration_s - 30 == (apart.duration_s - 30) * 2
    assert apart.wall_s == apart.duration_s  # the provider's own time
    # a shrunk clock (a sandbox of --time-scale 0.1 at that URL): the wall time the run takes
    data["api"]["time_scale"] = 0.1
    assert estimate(parse_config(data, tmp_path), 2).wall_s == pytest.approx(shared.duration_s / 10)
    assert rule_of("row 3: has 3 fields; the header has 4") == ["has 3 fields; the header has 4"]
    assert len(rule_of("row 3: prompt (column 'p'): x; img_url (column 'i'): y")) == 2


def test_retry_names_only_what_it_has(tmp_path: Path) -> None:
    config = _config(tmp_path)
    assert _wanbatch("run", str(config)).returncode == 0
    # the mapping changed since: retry says what to do with commands that exist
    done = _wanbatch("retry", str(config), "--set", "manifest.defaults.size=1K")
    assert done.returncode == 2
    said = " ".join(done.stderr.split())
    assert "wanbatch run CONFIG --fresh" in said and "run with --fresh" not in said


def test_column_names_match_ignoring_the_spaces_around_them(tmp_path: Path) -> None:
    path = tmp_path / "sheet.csv"
    path.write_text("sku ,Prompt, Image URL \nA,edit a,https://x.example.com/a.jpg\n")
    config = parse_config(
        {
            "api": {"base_url": "sandbox"},
            "manifest": {"path": str(path), "id_column": " sku",
                         "columns": {"prompt": "Prompt ", "img_url": "Image URL"}},
            "output": {"dir": str(tmp_path / "run")},
        },
        tmp_path,
    )  # fmt: skip
    manifest = Manifest(config.manifest, model=config.api.model, allow_loopback=False)
    (item,) = [i for batch in manifest.batches() for i in batch]
    assert item.job_id == "A" and item.inputs["img_url"] == "https://x.example.com/a.jpg"  # type: ignore[union-attr]


def test_init_never_replaces_a_config_unasked(tmp_path: Path) -> None:
    export = write_manifest(tmp_path / "export.csv", catalog(2))
    out = tmp_path / "wanbatch.yaml"
    out.write_text("mine\n")
    done = CLI.invoke(app, ["init", str(export), "--out", str(out)])
    assert done.exit_code == 2 and "--force" in done.output and out.read_text() == "mine\n"
    again = CLI.invoke(app, ["init", str(export), "--out", str(out), "--force"])
    assert again.exit_code == 0 and "generic export" in again.output
    assert yaml.safe_load(out.read_text())["manifest"]["columns"] == {"img_url": "img_url"}


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["A", "B", "C", "D", ""]),  # ids repeat, or are blank
            st.sampled_from(["p1", "p2"]),
            st.sampled_from(["https://cdn.example.com/1.jpg", ""]),  # blank images skip
            st.sampled_from(["", "7", "8"]),  # seeded or not
        ),
        min_size=1,
        max_size=30,
    ),
    st.integers(1, 7),
)
@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_an_estimate_does_not_depend_on_where_batches_end(
    tmp_path: Path, rows: list[tuple[str, str, str, str]], batch: int
) -> None:
    """Repeated ids, shared seeded inputs, identical unseeded ones and skipped rows are counted
    alike whether the rows come in one batch or many (what earlier batches saw is kept on
    disk, not in memory)."""
    path = tmp_path / "m.csv"
    lines = ["sku,prompt,img_url,seed"] + [",".join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")

    def counted(batch_rows: int) -> tuple[int, ...]:
        data = {
            "api": {"base_url": "sandbox"},
            "manifest": {
                "path": str(path),
                "id_column": "sku",
                "skip_if_blank": ["img_url"],
                "batch_rows": batch_rows,
            },
            "output": {"dir": str(tmp_path / "run")},
        }
        found = estimate(parse_config(data, tmp_path), 1)
        return (
            found.rows,
            found.rejected,
            found.skipped,
            found.shared,
            found.identical_unseeded,
            found.to_send,
        )

    assert counted(batch) == counted(10_000)
