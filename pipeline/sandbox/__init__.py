"""A faithful local double of the Eachlabs prediction API for Wan 2.7 Image Edit, on loopback."""

from __future__ import annotations

from pipeline.sandbox.app import create_app
from pipeline.sandbox.server import SandboxServer, ServerThread, serve
from pipeline.sandbox.settings import FaultRates, SandboxSettings
from pipeline.sandbox.state import SandboxState, key_hash

__all__ = [
    "FaultRates",
    "SandboxServer",
    "SandboxSettings",
    "SandboxState",
    "ServerThread",
    "create_app",
    "key_hash",
    "serve",
]
