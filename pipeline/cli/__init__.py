"""The `wanbatch` command: run, retry, estimate, status, report and sandbox.

app.py      the commands (typer), and one line per error a user can cause
display.py  the live terminal view and the plain progress lines
"""

from __future__ import annotations

from pipeline.cli.app import main

__all__ = ["main"]
