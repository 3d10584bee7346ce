"""A faithful local double of the Eachlabs prediction API for Wan 2.7 Image Edit, on loopback.

Its settings are declared in core (`core/double.py`, which the config reads); the server, the
app and their libraries (starlette, uvicorn, Pillow) load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pipeline.core import FaultRates, SandboxSettings

if TYPE_CHECKING:
    from pipeline.sandbox.app import create_app
    from pipeline.sandbox.embedded import open_embedded
    from pipeline.sandbox.server import SandboxServer, ServerThread, serve
    from pipeline.sandbox.state import SandboxState, key_hash

__all__ = [
    "FaultRates",
    "SandboxServer",
    "SandboxSettings",
    "SandboxState",
    "ServerThread",
    "create_app",
    "key_hash",
    "open_embedded",
    "serve",
]

_LAZY = {
    "create_app": "pipeline.sandbox.app",
    "SandboxServer": "pipeline.sandbox.server",
    "ServerThread": "pipeline.sandbox.server",
    "serve": "pipeline.sandbox.server",
    "SandboxState": "pipeline.sandbox.state",
    "open_embedded": "pipeline.sandbox.embedded",
    "key_hash": "pipeline.sandbox.state",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline.sandbox' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
