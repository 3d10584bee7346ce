"""The `wanbatch` command; the only module that prints."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import anyio
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from pipeline.config import load_config
from pipeline.errors import WanbatchError
from pipeline.journal import TRANSIENT_ERRORS
from pipeline.keys import keys_from_env
from pipeline.logs import configure_logging
from pipeline.report import summary_rows
from pipeline.runfolder import RunFolder
from pipeline.runner import ExitCode, Reprocess, RunSummary, run
from pipeline.sandbox import FaultRates, SandboxSettings, serve

__all__ = ["app", "main"]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Batch image edits with Wan 2.7 Image Edit on Eachlabs.",
)
_out = Console()
_err = Console(stderr=True, soft_wrap=True)  # a message stays one line, whatever the width


def _print_summary(summary: RunSummary) -> None:
    table = Table(title=f"wanbatch run: {summary.run_dir}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    for label, value in summary_rows(summary):
        table.add_row(label, value)
    _out.print(table)
    if summary.message:
        _err.print(Text(summary.message, style="yellow"))


def _execute(
    config_path: Path, *, force: bool, grace: float, fresh: bool, reprocess: Reprocess | None
) -> None:
    try:
        config = load_config(config_path)
        keys = keys_from_env()
        with RunFolder(config.output.dir, fresh=fresh) as folder:
            configure_logging(folder.log_path)
            summary = anyio.run(
                lambda: run(
                    config, keys, force=force, grace_s=grace, reprocess=reprocess, folder=folder
                )
            )
    except WanbatchError as exc:
        _err.print(Text.assemble(("error: ", "red"), str(exc)))
        raise typer.Exit(ExitCode.BAD_INPUT) from None
    _print_summary(summary)
    raise typer.Exit(summary.exit_code)


_Config = Annotated[Path, typer.Argument(metavar="CONFIG.yaml", help="The run's config.")]
_Force = Annotated[
    bool,
    typer.Option(help="Continue a run folder even if the config's mapping or manifest changed."),
]
_Grace = Annotated[
    float, typer.Option(help="Seconds jobs in flight get to end after SIGINT/SIGTERM.")
]


@app.command("run")
def run_command(
    config_path: _Config,
    force: _Force = False,
    fresh: Annotated[
        bool, typer.Option(help="Start over: remove the run folder's journal and results first.")
    ] = False,
    grace: _Grace = 30.0,
) -> None:
    """Run a config, or resume it where it stopped."""
    _execute(config_path, force=force, grace=grace, fresh=fresh, reprocess=None)


@app.command("retry")
def retry_command(
    config_path: _Config,
    errors: Annotated[
        str,
        typer.Option(
            help="Error types to run again, comma-separated, or 'all'. Default: the transient "
            f"ones ({', '.join(sorted(TRANSIENT_ERRORS))}). Rejected rows are never retried: "
            "fix them in the failures manifest and run it as a new manifest."
        ),
    ] = "transient",
    force: _Force = False,
    grace: _Grace = 30.0,
) -> None:
    """Run a config's failed rows again, in the same run folder (and finish any unfinished)."""
    wanted = {e.strip() for e in errors.split(",") if e.strip()}
    selection: frozenset[str] | None
    if wanted == {"all"}:
        selection = None
    else:
        named = wanted - {"transient"}
        selection = (TRANSIENT_ERRORS if "transient" in wanted else frozenset()) | named
    _execute(config_path, force=force, grace=grace, fresh=False, reprocess=Reprocess(selection))


@app.command("sandbox")
def sandbox_command(
    keys: Annotated[str, typer.Option(help="Accepted API keys, comma-separated.")],
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0 picks a free one).")] = 8765,
    time_scale: Annotated[float, typer.Option(help="Wall seconds per provider second.")] = 1.0,
    creates_per_window: int = 100,
    window_s: float = 60.0,
    max_concurrent: int = 10,
    latency_mean_s: float = 10.0,
    latency_spread: float = 0.2,
    seed: int = 0,
    image_scale: Annotated[
        float, typer.Option(help="Output size factor (1 = 1024/2048 px).")
    ] = 1.0,
    output_bytes: Annotated[
        int, typer.Option(help="Grow each output to this many bytes (a real 2K one: ~4 MB).")
    ] = 0,
    allow_loopback_urls: bool = False,
    fetch_inputs: Annotated[
        bool,
        typer.Option(
            help="Fetch loopback inputs as the provider does; fail jobs whose input fails."
        ),
    ] = False,
    ledger: Annotated[Path | None, typer.Option(help="Append the billing ledger here.")] = None,
    job_error: Annotated[float, typer.Option(help="Jobs that fail with a final code.")] = 0.0,
    transient_error: Annotated[
        float, typer.Option(help="Jobs that fail with a code the provider says to retry.")
    ] = 0.0,
    cancelled: Annotated[float, typer.Option(help="Jobs the provider cancels.")] = 0.0,
    legacy_errors: Annotated[
        bool, typer.Option(help="Failed jobs in the older message/details shape.")
    ] = False,
    create_5xx: float = 0.0,
    poll_5xx: float = 0.0,
    lost_create: float = 0.0,
    slow: float = 0.0,
    poll_reset: float = 0.0,
    storm_429: float = 0.0,
    key_faults: Annotated[
        list[str] | None,
        typer.Option(
            help="Faults of one key in place of the others', as KEY:name=value,... "
            "(e.g. KEY:storm_429=1,storm_s=30 for a throttled key); repeatable."
        ),
    ] = None,
) -> None:
    """Serve the sandbox (a local double of the provider); prints its base URL first."""
    try:
        per_key = {}
        for item in key_faults or ():
            secret, _, spec = item.partition(":")
            per_key[secret.strip()] = FaultRates.parse(spec)
        settings = SandboxSettings(
            keys=tuple(k.strip() for k in keys.split(",") if k.strip()),
            time_scale=time_scale,
            creates_per_window=creates_per_window,
            window_s=window_s,
            max_concurrent=max_concurrent,
            latency_mean_s=latency_mean_s,
            latency_spread=latency_spread,
            seed=seed,
            image_scale=image_scale,
            output_bytes=output_bytes,
            allow_loopback_urls=allow_loopback_urls,
            fetch_inputs=fetch_inputs,
            ledger_path=ledger,
            legacy_errors=legacy_errors,
            faults=FaultRates(
                job_error=job_error,
                transient_error=transient_error,
                cancelled=cancelled,
                create_5xx=create_5xx,
                poll_5xx=poll_5xx,
                lost_create=lost_create,
                slow=slow,
                poll_reset=poll_reset,
                storm_429=storm_429,
            ),
            key_faults=per_key,
        )
    except ValueError as exc:
        _err.print(Text.assemble(("error: ", "red"), str(exc)))
        raise typer.Exit(ExitCode.BAD_INPUT) from None
    serve(settings, port, announce=lambda line: print(line, flush=True))


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(ExitCode.INTERRUPTED)
