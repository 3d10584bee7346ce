"""The `wanbatch` command; the only module that prints (with `display`, its live view).

Every error a user can cause is one line on stderr and a documented exit code; `--debug` adds
the traceback. A run's folder remembers how its config was given (`run.json`: the config's
path or URL and the `--set` overrides, never a credential), so `retry` and `status` take the
folder itself.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import functools
import glob
import json
import logging
import os
import shutil
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import anyio
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from pipeline import __version__
from pipeline.cli.display import LineReporter, LiveReporter
from pipeline.cli.double import sandbox_command
from pipeline.core import (
    CHANNELS,
    ERROR_TYPES,
    JOURNAL,
    RUN_RECORD,
    TRANSIENT_ERRORS,
    ApiKey,
    ConfigError,
    ExitCode,
    RunConfig,
    WanbatchError,
    keys_from_env,
    load_config,
)
from pipeline.drive import Workers
from pipeline.intake import Estimate, read_header, recognise, starter_config
from pipeline.journal import reading
from pipeline.observe import Reporter, format_duration
from pipeline.outputs import RunSummary, checks_said, publish, summary_rows, write_report
from pipeline.provider import read_balance
from pipeline.runs import (
    FolderStatus,
    Reprocess,
    RunFolder,
    configure_logging,
    estimate,
    folder_status,
    level_named,
    run,
)
from pipeline.sandbox import open_embedded

__all__ = ["app", "main"]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Batch image edits with Wan 2.7 Image Edit on Eachlabs.",
)


class _Console(Console):
    def on_broken_pipe(self) -> None:
        """The reader went away (`wanbatch estimate ... | head`): nothing more is written,
        and the command ends quietly (rich's own default is exit 1)."""
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(ExitCode.OK)


_out = _Console()
_err = _Console(stderr=True, soft_wrap=True)  # a message stays one line, whatever the width


@dataclass(frozen=True)
class _Options:
    """The options given before the command, kept in click's context for the command."""

    debug: bool = False
    log_level: int | None = None  # --log-level: run.log and the terminal from this level


_OPTIONS = "wanbatch.options"  # where the context keeps them (click's `meta`)


def _opts(ctx: typer.Context) -> _Options:
    """The options given before the command (`meta` is shared by a command's contexts)."""
    found = ctx.meta.get(_OPTIONS)
    return found if isinstance(found, _Options) else _Options()


def _version(value: bool) -> None:
    if value:
        print(f"wanbatch {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    ctx: typer.Context,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
    debug: Annotated[bool, typer.Option(help="Show tracebacks of errors.")] = False,
    log_level: Annotated[
        str | None,
        typer.Option(help="debug, info, warning or error: run.log and the terminal from it."),
    ] = None,
) -> None:
    level = None
    if log_level is not None:
        try:
            level = level_named(log_level)
        except ValueError as exc:
            _fail(str(exc), ExitCode.BAD_INPUT)
    ctx.meta[_OPTIONS] = _Options(debug, level)


def _fail(message: str, code: int, *, debug: bool = False) -> None:
    if debug:
        traceback.print_exc()
    _err.print(Text.assemble(("error: ", "red"), message))
    raise typer.Exit(code)


def _guarded(ctx: typer.Context, action: Callable[[], int]) -> None:
    """Run a command: a WanbatchError (a user's to fix) is one line and exit 2; anything else
    is a bug, one line and exit 1, with the traceback under --debug."""
    debug = _opts(ctx).debug
    try:
        code = action()
        sys.stdout.flush()  # a reader gone shows here, not in click's own exit (exit 1)
    except WanbatchError as exc:
        _fail(str(exc), ExitCode.BAD_INPUT, debug=debug)
    except KeyboardInterrupt:
        raise typer.Exit(ExitCode.INTERRUPTED) from None
    except BrokenPipeError:
        # the reader went away (`wanbatch estimate ... | head`): nothing more to say, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(ExitCode.OK) from None
    except Exception as exc:  # noqa: BLE001 - a bug: said in one line, traceback with --debug
        _fail(
            f"internal error: {type(exc).__name__}: {exc} (run again with --debug for the "
            "traceback, and report it)",
            ExitCode.ERROR,
            debug=debug,
        )
    raise typer.Exit(code)


def _print_rows(rows: list[tuple[str, str]], width: int) -> None:
    """`label value` lines, each whole whatever the terminal's width (cron reads them)."""
    for label, value in rows:
        _out.print(f"{label:<{width}} {value}", highlight=False, markup=False, soft_wrap=True)


def _print_summary(summary: RunSummary) -> None:
    if not _out.is_terminal:  # a log or a pipe: every value whole, on its own line
        _out.print(
            f"wanbatch run: {summary.run_dir}", highlight=False, markup=False, soft_wrap=True
        )
        _print_rows(summary_rows(summary), 28)
        if summary.message:
            _err.print(summary.message, highlight=False, markup=False)
        return
    table = Table(title=f"wanbatch run: {summary.run_dir}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    for label, value in summary_rows(summary):
        table.add_row(label, value)
    _out.print(table)
    if summary.message:
        _err.print(Text(summary.message, style="yellow"))


@dataclass(frozen=True, slots=True)
class _Given:
    """How the user gave a config: a file or URL, or a run folder (read from its run.json)."""

    config: str
    sets: tuple[str, ...] = ()
    output_dir: Path | None = None
    run_date: datetime.date | None = None

    def load(self) -> RunConfig:
        return load_config(
            self.config, sets=self.sets, output_dir=self.output_dir, run_date=self.run_date
        )

    def record(self, folder: Path) -> None:
        """run.json: how to load this folder's config again (no --set of storage options,
        which may hold credentials)."""
        sets = [s for s in self.sets if not s.startswith("assets.storage_options")]
        where = self.config if "://" in self.config else str(Path(self.config).absolute())
        (folder / RUN_RECORD).write_text(json.dumps({"config": where, "set": sets}) + "\n")


def _given(
    config: str, sets: list[str] | None, output_dir: Path | None, run_date: str | None
) -> _Given:
    """The config as given; a run folder stands for the config that made it."""
    date = None
    if run_date is not None:
        try:
            date = datetime.date.fromisoformat(run_date)
        except ValueError:
            raise ConfigError(f"--run-date {run_date!r} is not a date (YYYY-MM-DD)") from None
    folder = Path(config)
    if "://" not in config and folder.is_dir():
        try:
            recorded = json.loads((folder / RUN_RECORD).read_text())
        except (OSError, ValueError):
            raise ConfigError(
                f"{folder} is a folder but not a run folder made by wanbatch 0.1 or later "
                f"(no {RUN_RECORD}): give the config file instead"
            ) from None
        earlier = tuple(recorded.get("set", ()))
        return _Given(recorded["config"], (*earlier, *(sets or ())), folder.absolute())
    return _Given(config, tuple(sets or ()), output_dir, date)


def _reporter(config: RunConfig) -> tuple[Reporter, float | None]:
    if _err.is_terminal:
        return LiveReporter(_err), 1.0
    return LineReporter(_err, config.progress.interval_s), None


def _execute(
    given: _Given,
    *,
    force: bool,
    grace: float,
    fresh: bool,
    reprocess: Reprocess | None,
    workers: Workers | None = None,
    opts: _Options,
) -> int:
    config = given.load()
    keys = keys_from_env()
    made = not config.output.dir.exists()
    try:
        summary = _run_in_folder(config, keys, given, opts, force, grace, fresh, reprocess, workers)
    except WanbatchError:
        # refused before anything was journaled (no key, no manifest, ...): a folder this
        # command made holds nothing worth keeping, and cron would find an empty run in it
        if made and not (config.output.dir / JOURNAL).exists():
            shutil.rmtree(config.output.dir, ignore_errors=True)
        raise
    _print_summary(summary)
    return int(summary.exit_code)


def _run_in_folder(
    config: RunConfig,
    keys: list[ApiKey],
    given: _Given,
    opts: _Options,
    force: bool,
    grace: float,
    fresh: bool,
    reprocess: Reprocess | None,
    workers: Workers | None,
) -> RunSummary:
    with RunFolder(config.output.dir, fresh=fresh) as folder:
        given.record(folder.path)
        level = opts.log_level or logging.INFO
        console = opts.log_level or (logging.WARNING if _err.is_terminal else logging.ERROR)
        configure_logging(folder.log_path, level, console, tracebacks=opts.debug)
        reporter, tick = _reporter(config)
        summary = anyio.run(
            lambda: run(
                config,
                keys,
                force=force,
                grace_s=grace,
                reprocess=reprocess,
                folder=folder,
                reporter=reporter,
                tick_s=tick,
                workers=workers,
                embedded=open_embedded,
            )
        )
    return summary


_Config = Annotated[
    str,
    typer.Argument(metavar="CONFIG", help="The run's config: a YAML file or its object URL."),
]
_Force = Annotated[
    bool,
    typer.Option(help="Continue a run folder even if the config's mapping or manifest changed."),
]
_Grace = Annotated[
    float, typer.Option(help="Seconds jobs in flight get to end after SIGINT/SIGTERM.")
]
_OutputDir = Annotated[
    Path | None, typer.Option(help="The run folder, in place of the config's output.dir.")
]
_RunDate = Annotated[
    str | None,
    typer.Option(help="YYYY-MM-DD for strftime fields in output.dir, in place of today."),
]
_Workers = Annotated[
    int | None,
    typer.Option(
        help="Spread the keys over N Ray workers (pip install -e '.\\[ray]' in the checkout); a "
        "local Ray cluster is started unless --ray-address or RAY_ADDRESS names one."
    ),
]
_RayAddress = Annotated[
    str | None,
    typer.Option(help="The Ray cluster for --workers (default: RAY_ADDRESS, else a local one)."),
]


def _workers(count: int | None, address: str | None) -> Workers | None:
    if count is None:
        if address is not None:
            raise ConfigError("--ray-address goes with --workers N")
        return None
    return Workers(count, address)


_Set = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config value: key.path=value (YAML); repeatable."),
]


@app.command("run")
def run_command(
    ctx: typer.Context,
    config: _Config,
    force: _Force = False,
    fresh: Annotated[
        bool, typer.Option(help="Start over: remove the run folder's journal and results first.")
    ] = False,
    grace: _Grace = 30.0,
    dry_run: Annotated[
        bool, typer.Option(help="Estimate only (as `wanbatch estimate`): nothing is sent.")
    ] = False,
    output_dir: _OutputDir = None,
    run_date: _RunDate = None,
    overrides: _Set = None,
    workers: _Workers = None,
    ray_address: _RayAddress = None,
) -> None:
    """Run a config, or resume it where it stopped."""

    def act() -> int:
        given = _given(config, overrides, output_dir, run_date)
        if dry_run:
            return _estimate(given)
        spread = _workers(workers, ray_address)
        return _execute(
            given,
            force=force,
            grace=grace,
            fresh=fresh,
            reprocess=None,
            workers=spread,
            opts=_opts(ctx),
        )

    _guarded(ctx, act)


def _error_selection(errors: str) -> frozenset[str] | None:
    """`--errors` read: the error types named ('transient' for the transient ones), or None
    for 'all'; ConfigError naming any word that is no error type, and the one meant."""
    wanted = {e.strip() for e in errors.split(",") if e.strip()}
    words = {"all", "transient"}
    unknown = sorted(wanted - ERROR_TYPES - words)
    if unknown or not wanted:
        meant = difflib.get_close_matches(unknown[0], [*ERROR_TYPES, *words], 1) if unknown else []
        hint = f" (did you mean {meant[0]!r}?)" if meant else ""
        known = ", ".join(sorted(ERROR_TYPES))
        raise ConfigError(
            f"--errors: {', '.join(map(repr, unknown)) or 'nothing'} is no error type{hint}; "
            f"give some of {known}, comma-separated, or 'transient' or 'all'"
        )
    if "all" in wanted:
        return None
    named = frozenset(wanted - words)
    return (TRANSIENT_ERRORS if "transient" in wanted else frozenset()) | named


@app.command("retry")
def retry_command(
    ctx: typer.Context,
    config: Annotated[
        str, typer.Argument(metavar="CONFIG|RUN_DIR", help="The config, or its run folder.")
    ],
    errors: Annotated[
        str | None,
        typer.Option(
            help="Error types to run again, comma-separated, or 'all'. Default: the transient "
            f"ones ({', '.join(sorted(TRANSIENT_ERRORS))}), or none with --rejected. Rejected "
            "rows are never retried: fix them in the failures manifest and run it as a new "
            "manifest."
        ),
    ] = None,
    rejected: Annotated[
        Path | None,
        typer.Option(
            help="A decisions file exported from the report's review: approvals are recorded "
            "(approved.csv), and each rejected edit is made again (a new seed unless the config "
            "fixes one; --set may change the prompt)."
        ),
    ] = None,
    approve_passing: Annotated[
        bool,
        typer.Option(
            "--approve-passing",
            help="Approve every edit no person has judged whose images passed every automatic "
            "check (checks:); flagged edits are left to review.",
        ),
    ] = False,
    force: _Force = False,
    grace: _Grace = 30.0,
    output_dir: _OutputDir = None,
    run_date: _RunDate = None,
    overrides: _Set = None,
    workers: _Workers = None,
    ray_address: _RayAddress = None,
) -> None:
    """Run a config's failed rows, or its rejected edits, again, in the same run folder (and
    finish any unfinished); approve the edits that passed the checks."""

    def act() -> int:
        if errors is not None:
            chosen = _error_selection(errors)
        else:
            review = rejected is not None or approve_passing
            chosen = frozenset() if review else TRANSIENT_ERRORS
        return _execute(
            _given(config, overrides, output_dir, run_date),
            force=force,
            grace=grace,
            fresh=False,
            reprocess=Reprocess(chosen, decisions=rejected, approve_passing=approve_passing),
            workers=_workers(workers, ray_address),
            opts=_opts(ctx),
        )

    _guarded(ctx, act)


@app.command("estimate")
def estimate_command(
    ctx: typer.Context,
    config: _Config,
    output_dir: _OutputDir = None,
    run_date: _RunDate = None,
    overrides: _Set = None,
) -> None:
    """Read and check the whole manifest, and say what a run would cost and take: nothing is
    sent to the provider, nothing uploaded."""
    _guarded(ctx, lambda: _estimate(_given(config, overrides, output_dir, run_date)))


def _estimate(given: _Given) -> int:
    config = given.load()
    keys = len(keys_from_env()) or (config.sandbox.keys if config.embedded_sandbox else 0)
    found = estimate(config, keys)
    env_keys = keys_from_env()
    if env_keys and not config.embedded_sandbox:
        api = config.api
        balance = anyio.run(
            functools.partial(read_balance, api.base_url, api.model, env_keys[0], auth=api.auth)
        )
        found = dataclasses.replace(found, balance_usd=balance)
    _print_rows(_estimate_rows(found, config), 28)
    if found.identical_unseeded:
        _err.print(
            f"note: {found.identical_unseeded:,} row(s) repeat an earlier row's input without a "
            "seed: each is sent and paid for (a new draw); give a seed to share one job",
            highlight=False,
            markup=False,
        )
    code = found.exit_code
    if code is ExitCode.BUDGET:
        _err.print(f"over budget.max_cost_usd ({config.budget.max_cost_usd:g}): exit {int(code)}")
    elif code is ExitCode.BALANCE:
        _err.print(
            f"the estimate passes the organisation's balance (${found.balance_usd:,.2f}): "
            f"exit {int(code)}"
        )
    elif code is ExitCode.ROWS_FAILED:
        _err.print(f"no valid row: nothing would be sent (exit {int(code)})")
    return code


def _estimate_rows(found: Estimate, config: RunConfig) -> list[tuple[str, str]]:
    rows = [
        ("rows", f"{found.rows:,}"),
        ("valid", f"{found.valid:,}"),
        ("rejected", f"{found.rejected:,}"),
    ]
    rows += [(f"  {n:,} x", rule) for rule, n in found.rejected_by_rule.most_common()]
    if found.skipped - found.filtered:
        rows.append(("skipped (skip_if_blank)", f"{found.skipped - found.filtered:,}"))
    if found.filtered:
        rows.append(("filtered (manifest.where)", f"{found.filtered:,}"))
    rows += [
        ("reused (incremental)", f"{found.reused:,}"),
        ("shared (same seeded input)", f"{found.shared:,}"),
        ("repeated without a seed", f"{found.identical_unseeded:,} (each sent and paid)"),
        ("to send", f"{found.to_send:,}"),
        ("images", f"{found.images:,}"),
        ("cost", f"${found.cost_usd:,.2f}"),
        ("keys", f"{found.keys:,}" if found.keys else "none: set EACHLABS_API_KEY(S)"),
        ("latency per job", f"{found.latency_s:g} s ({found.latency_from})"),
    ]
    rows.append(("expected duration", format_duration(found.wall_s) if found.keys else "unknown"))
    if found.over_budget:
        rows.append(("budget", f"over budget.max_cost_usd ({config.budget.max_cost_usd:g})"))
    if found.balance_usd is not None:
        over = " (the estimate passes it)" if found.over_balance else ""
        rows.append(("organisation balance", f"${found.balance_usd:,.2f}{over}"))
    return rows


@app.command("init")
def init_command(
    ctx: typer.Context,
    catalog: Annotated[
        Path,
        typer.Argument(
            metavar="CATALOG",
            help="Your export: CSV, TSV, .xlsx, Parquet, or a folder of Parquet parts.",
        ),
    ],
    out: Annotated[Path, typer.Option(help="Where the starter config is written.")] = Path(
        "wanbatch.yaml"
    ),
    url_base: Annotated[
        str | None,
        typer.Option(help="Your store's media URL, for exports with relative image paths."),
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace the file at --out.")] = False,
) -> None:
    """Recognise an export (Shopify, WooCommerce, Magento, BigCommerce, Amazon flat file,
    Merchant Center, or any other), write a commented starter config for it, and say what
    `estimate` says of it: nothing is sent."""

    def act() -> int:
        if not catalog.exists() and not glob.has_magic(str(catalog)):
            raise ConfigError(f"{catalog} does not exist")
        if out.exists() and not force:
            raise ConfigError(f"{out} exists: pass --force to replace it, or --out another file")
        header = read_header(catalog)
        layout = recognise(header)
        where = Path(os.path.relpath(catalog.absolute(), out.absolute().parent))
        out.write_text(starter_config(where, header, layout, url_base), encoding="utf-8")
        _out.print(
            f"{catalog}: a {layout.platform} export; starter config written to {out}",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
        _out.print(f"next: wanbatch run {out}", highlight=False, markup=False, soft_wrap=True)
        _out.print("estimate:", highlight=False, markup=False)
        return _estimate(_Given(str(out)))

    _guarded(ctx, act)


@app.command("report")
def report_command(
    ctx: typer.Context,
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="A run folder.")],
) -> None:
    """Write the run folder's report.html again from its journal: nothing is sent."""

    def act() -> int:
        with reading(run_dir) as journal:
            path = write_report(journal, run_dir, *_recorded_report(run_dir))
        _out.print(str(path), highlight=False, markup=False, soft_wrap=True)
        return ExitCode.OK

    _guarded(ctx, act)


def _recorded_report(run_dir: Path) -> tuple[str | None, list[str]]:
    """The id column and report columns of the config that made the folder, when it can
    still be loaded (none otherwise)."""
    try:
        config = _given(str(run_dir), None, None, None).load()
    except WanbatchError:
        return None, []
    return config.manifest.id_column_name, config.report.columns


@app.command("publish")
def publish_command(
    ctx: typer.Context,
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="A run folder.")],
    to: Annotated[
        str,
        typer.Option(
            "--to",
            metavar="DIR|s3://...",
            help="Where the copies go: a folder, or an object URL (s3://, gs://, az://).",
        ),
    ],
    channel: Annotated[
        str | None,
        typer.Option(
            help=f"Copies made for a channel and held to its rules ({', '.join(CHANNELS)})."
        ),
    ] = None,
    option: Annotated[
        list[str] | None,
        typer.Option(
            "--option",
            metavar="KEY=VALUE",
            help="A storage option for the destination (as assets.storage_options); the run's "
            "own are used when none is given.",
        ),
    ] = None,
) -> None:
    """Copy the run's approved edits to a shop's or feed's folder or bucket: named for the
    catalog, in the channel's format and size, tagged as AI-generated (IPTC
    DigitalSourceType), recorded in the destination's published.csv; removed products are
    retracted. A second publish copies nothing."""

    def act() -> int:
        options = dict(o.partition("=")[::2] for o in option or []) or _recorded_options(run_dir)
        done = publish(run_dir, to, channel, options)
        rows = [
            ("copied", f"{done.copied:,}"),
            ("already there", f"{done.unchanged:,}"),
            ("retracted products", f"{done.retracted:,}"),
            ("not published", f"{len(done.refused):,}"),
            ("record", done.record),
        ]
        _print_rows(rows, 20)
        for said in done.refused[:20]:
            _err.print(f"not published: {said}", highlight=False, markup=False)
        return ExitCode.OK if not done.refused else ExitCode.ROWS_FAILED

    _guarded(ctx, act)


def _recorded_options(run_dir: Path) -> dict[str, str]:
    """The storage options of the config that made the folder, when it can still be loaded."""
    try:
        return dict(_given(str(run_dir), None, None, None).load().assets.storage_options)
    except WanbatchError:
        return {}


@app.command("status")
def status_command(
    ctx: typer.Context,
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="A run folder.")],
) -> None:
    """A run folder's state from its journal alone: nothing is sent."""

    def act() -> int:
        found = folder_status(run_dir, keys_from_env())
        _print_rows(_status_rows(found), 22)
        return ExitCode.OK

    _guarded(ctx, act)


def _status_rows(found: FolderStatus) -> list[tuple[str, str]]:
    b = found.by_status
    held = f"yes, by {found.holder}" if found.holder else "no"
    state = {
        "finished": "finished",
        "running": "running (its jobs are being driven now)",
        "stopped": "stopped, unfinished (run the same command to resume)",
    }[found.state]
    rows = [
        ("run folder", str(found.run_dir)),
        ("running now", held),
        ("state", state),
        ("rows", f"{found.rows:,}" + ("" if found.ingest_complete else " (manifest not all read)")),
    ]
    rows += [(f"  {s}", f"{b[s]:,}") for s in sorted(b)]
    rows += [
        ("images", f"{found.images:,}"),
        ("cost so far", f"${found.cost_usd:,.2f}"),
        ("possible duplicates", f"{found.possible_duplicate_charges:,}"),
    ]
    if found.reviews:
        r = found.reviews
        rows.append(
            (
                "review",
                f"{r['approved']:,} approved, {r['rejected']:,} rejected, "
                f"{r['to_review']:,} to review",
            )
        )
    if found.checks.get("measured"):
        rows.append(("checks", checks_said(found.checks)))
    if found.images_by_state:
        rows.append(
            (
                "images by state",
                ", ".join(f"{k} {v:,}" for k, v in sorted(found.images_by_state.items())),
            )
        )
    if found.missing_keys:
        rows.append(
            (
                "waiting on keys",
                ", ".join(f"{k} ({n:,} rows)" for k, n in sorted(found.missing_keys.items()))
                + " not given in EACHLABS_API_KEYS",
            )
        )
    return rows


app.command("sandbox")(sandbox_command)


_GLOBAL = {"--debug": False, "--log-level": True}  # option -> takes a value


def global_first(argv: list[str]) -> list[str]:
    """The arguments with the global options (`--debug`, `--log-level L`) put before the
    subcommand, wherever they were given: `wanbatch run c.yaml --log-level debug` works as
    `wanbatch --log-level debug run c.yaml` does."""
    front: list[str] = []
    rest: list[str] = []
    at = 0
    while at < len(argv):
        word = argv[at]
        name = word.split("=", 1)[0]
        if word == "--":
            rest += argv[at:]
            break
        if name in _GLOBAL:
            takes = _GLOBAL[name] and "=" not in word and at + 1 < len(argv)
            front += argv[at : at + 2] if takes else [word]
            at += 2 if takes else 1
            continue
        rest.append(word)
        at += 1
    return front + rest


def main() -> None:
    try:
        app(args=global_first(sys.argv[1:]), prog_name="wanbatch")
    except KeyboardInterrupt:
        sys.exit(ExitCode.INTERRUPTED)
