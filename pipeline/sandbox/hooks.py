"""The sandbox's job-end callbacks: their bodies and signatures in the shape `api_shape` names,
and their delivery (retried with backoff, counted)."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import httpx

from pipeline.core import SandboxSettings
from pipeline.sandbox.signing import sign_body, sign_webhook
from pipeline.sandbox.state import Job, SandboxState

__all__ = ["Hooks", "callback"]

_log = logging.getLogger("pipeline.sandbox")


def callback(
    settings: SandboxSettings, job: Job, seed: dict[str, Any], shaped: dict[str, Any]
) -> tuple[bytes, dict[str, str]]:
    """A job-end callback's body and signature headers: `seed` is its poll's body in the seed
    shape, `shaped` in the reference's."""
    succeeded = seed["status"] == "success"
    payload: dict[str, Any]
    if settings.api_shape == "reference":
        names = ("id", "status", "output", "input", "metrics", "logs")
        payload = {k: shaped[k] for k in names if k in shaped}
        payload["status"] = "success" if succeeded else "failed"
    else:
        payload = {
            "exec_id": job.prediction_id,
            "status": "succeeded" if succeeded else "failed",
            "output": seed["output"][0] if succeeded else "",
            "error": "" if succeeded else job.error_code or seed["status"],
        }
    data = json.dumps(payload).encode()
    if job.webhook_secret is None:
        return data, {}
    if settings.api_shape == "reference":
        return data, sign_body(job.webhook_secret, data)
    return data, sign_webhook(job.webhook_secret, data)


class Hooks:
    """Delivers callbacks over one kept-alive client (made on the first)."""

    def __init__(self, settings: SandboxSettings, state: SandboxState) -> None:
        self.settings = settings
        self.state = state
        self._hooks: httpx.AsyncClient | None = None

    async def aclose(self) -> None:
        if self._hooks is not None:
            await self._hooks.aclose()

    async def send(self, job: Job, data: bytes, headers: dict[str, str]) -> None:
        assert job.webhook_url is not None
        if self._hooks is None:
            timeout = httpx.Timeout(self.settings.scaled(30.0), connect=self.settings.scaled(10.0))
            self._hooks = httpx.AsyncClient(
                timeout=timeout,
                limits=httpx.Limits(max_connections=64),
                headers={"User-Agent": "sandbox-webhook"},
                trust_env=False,  # the receiver is on loopback, never behind a proxy
            )
        delay = self.settings.scaled(1.0)
        for _ in range(self.settings.webhook_attempts):  # the same signature each time
            try:
                answer = await self._hooks.post(job.webhook_url, content=data, headers=headers)
                if answer.is_success:
                    self.state.webhooks["delivered"] += 1
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(delay)
            delay *= 2
        self.state.webhooks["failed"] += 1
        _log.warning("webhook for %s was not accepted", job.prediction_id)
