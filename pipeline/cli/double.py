"""`wanbatch sandbox`: the provider's double served in this process. Its options are made from
the sandbox's settings (`pipeline.core.double`), each declared there once with its help:
an option per setting, named by its field (`--time-scale` for `time_scale`), a `--no-` flag for
a setting that is on by default, and the setting's own parser for those given as text."""

from __future__ import annotations

import errno
import inspect
import typing
from dataclasses import MISSING, Field, fields
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

from pipeline.core import ExitCode, SandboxSettings

__all__ = ["sandbox_command"]

_err = Console(stderr=True, soft_wrap=True)
_PORT = inspect.Parameter(
    "port",
    inspect.Parameter.KEYWORD_ONLY,
    default=8765,
    annotation=Annotated[int, typer.Option(help="Port on 127.0.0.1 (0 picks a free one).")],
)


def _option(f: Field[Any], kind: Any) -> inspect.Parameter:
    """The command line's option for one setting."""
    meta = f.metadata
    flag = meta.get("flag", "--" + f.name.replace("_", "-"))
    default: Any = f.default if f.default is not MISSING else None
    if "parse" in meta:  # given as text, read by the setting's own parser
        kind = list[str] | None if meta.get("many") else str | None
        default = None
    text = meta["help"]
    if kind is bool and default:  # on unless turned off: the flag turns it off
        flag, default, text = f"--no-{flag[2:]}", False, f"Off: {text}"
    option = typer.Option(flag, help=text, show_default=not meta.get("required"))
    if meta.get("required"):
        kind, default = str, inspect.Parameter.empty
    return inspect.Parameter(
        f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, option]
    )


def _parameters() -> list[inspect.Parameter]:
    hints = typing.get_type_hints(SandboxSettings)
    return [_PORT, *(_option(f, hints[f.name]) for f in fields(SandboxSettings))]


def settings_from(given: dict[str, Any]) -> SandboxSettings:
    """The settings the options gave; a setting given as text read by its parser (ValueError
    names what is wrong)."""
    values: dict[str, Any] = {}
    for f in fields(SandboxSettings):
        value = given[f.name]
        if f.default is True:  # given as its --no- flag
            value = not value
        parse = f.metadata.get("parse")
        if parse is not None:
            if value is None:
                continue
            value = parse(value)
        values[f.name] = value
    return SandboxSettings(**values)


def recipe(base_url: str, keys: tuple[str, ...], time_scale: float) -> list[str]:
    """The config lines and environment that point a run at a sandbox in its own process."""
    return [
        "# a run against this sandbox, in your config:",
        "#   api:",
        f"#     base_url: {base_url}",
        f"#     time_scale: {time_scale:g}   # as this sandbox's --time-scale",
        "#   manifest:",
        "#     allow_loopback_urls: true   # only for inputs served on this machine",
        "# and in the environment:",
        f"#   EACHLABS_API_KEYS={','.join(keys)}",
    ]


def _refuse(message: str) -> typer.Exit:
    _err.print(Text.assemble(("error: ", "red"), message))
    return typer.Exit(ExitCode.BAD_INPUT)


def sandbox_command(**given: Any) -> None:
    """Serve the sandbox (a local double of the provider) in this process; prints its base
    URL first, then the config lines that point a run at it."""
    from pipeline.sandbox import serve  # starlette, uvicorn, Pillow: for this command only

    port: int = given.pop("port")
    try:
        settings = settings_from(given)
    except ValueError as exc:
        raise _refuse(str(exc)) from None

    def announce(base_url: str) -> None:
        for line in (base_url, *recipe(base_url, settings.keys, settings.time_scale)):
            print(line, flush=True)

    try:
        serve(settings, port, announce=announce)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        raise _refuse(
            f"port {port} on 127.0.0.1 is taken (another sandbox?): pass --port 0 for a free "
            "one, or another port"
        ) from None


_SIGNATURE = _parameters()
sandbox_command.__signature__ = inspect.Signature(_SIGNATURE)  # type: ignore[attr-defined]
sandbox_command.__annotations__ = {p.name: p.annotation for p in _SIGNATURE}
