"""The organisation's balance ("today" shape): what a create may cost before it is refused
(402, or the low-balance 429), `GET /v1/billing/balance`, `GET /v1/models/{slug}` with its
cost, and `POST /_admin/balance` (a top-up)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pipeline.core import SandboxSettings
from pipeline.core.schema import MODEL
from pipeline.sandbox.state import SandboxState

__all__ = ["afford", "billing_routes", "top_up"]


def afford(state: SandboxState, key: str, n: int) -> tuple[int, str] | None:
    """The balance's refusal of a create of `n` images (402, or the low-balance 429), or None.
    Nothing is created or billed for a refusal."""
    if state.balance.usd is None:
        return None
    price = state.settings.price_per_image_usd
    left = state.balance.usd - sum(state.owed.values()) - n * price
    if left < -1e-9:
        status, reason = 402, "Insufficient balance: top up to create more predictions"
    elif left < state.settings.low_balance_usd and state.owed:
        status, reason = 429, "Balance is low: wait for a running prediction to end"
    else:
        return None
    state.log({"event": "refused", "key": key, "status": status, "reason": reason})
    return status, reason


def top_up(state: SandboxState, amount: float) -> float:
    """Add to the organisation's balance (a balance of None stays unlimited)."""
    state.balance.move(amount)
    if state.balance.usd is None:
        return math.inf
    state.log({"event": "top_up", "amount_usd": amount, "balance_usd": state.balance.usd})
    return state.balance.usd


def billing_routes(
    authenticate: Callable[[Request], str | Response],
    state: SandboxState,
    settings: SandboxSettings,
) -> list[Route]:
    async def balance(request: Request) -> Response:
        key = authenticate(request)
        if isinstance(key, Response):
            return key
        if not settings.today:
            return JSONResponse({"error": "Not found"}, status_code=404)
        return JSONResponse({"balance": state.balance.usd, "currency": "USD"})

    async def model(request: Request) -> Response:
        key = authenticate(request)
        if isinstance(key, Response):
            return key
        if not settings.today or request.path_params["slug"] != MODEL:
            return JSONResponse({"error": "Model not found"}, status_code=404)
        schema = {"type": "object", "required": ["prompt", "img_url"]}
        cost = settings.price_per_image_usd
        return JSONResponse({"slug": MODEL, "cost": cost, "request_schema": schema})

    async def add(request: Request) -> Response:
        try:
            amount = float(json.loads(await request.body())["add"])
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": 'expected {"add": a number of USD}'}, status_code=400)
        return JSONResponse({"balance": top_up(state, amount)})

    return [
        Route("/v1/billing/balance", balance, methods=["GET"]),
        Route("/v1/models/{slug}", model, methods=["GET"]),
        Route("/_admin/balance", add, methods=["POST"]),
    ]
