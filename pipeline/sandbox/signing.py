"""How the provider signs its callbacks, in the two shapes the sandbox serves."""

from __future__ import annotations

import hashlib
import hmac
import time

__all__ = ["sign_body", "sign_webhook"]


def sign_body(secret: str, body: bytes) -> dict[str, str]:
    """The reference's example signature: the hex HMAC-SHA256 of the raw body alone."""
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {"X-Webhook-Signature": digest}


def sign_webhook(secret: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    """The provider's signature headers: HMAC-SHA256 of "<timestamp>.<raw body>"."""
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    digest = hmac.new(secret.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return {"X-Webhook-Timestamp": stamp, "X-Webhook-Signature": f"sha256={digest}"}
