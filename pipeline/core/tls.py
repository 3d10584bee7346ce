"""One TLS context for the run's HTTP clients. httpx builds a context from the CA bundle for
every client it makes (about 30 ms of CPU each); a run makes several (the provider's client,
the downloader, the inputs' and the checks' fetches) and a Ray worker its own, so they share
one, made as httpx makes it: `SSL_CERT_FILE` or `SSL_CERT_DIR` when set, else certifi's
bundle."""

from __future__ import annotations

import functools
import os
import ssl

__all__ = ["tls_context"]


def tls_context() -> ssl.SSLContext:
    """The context for the environment's CA settings as they are now (a changed
    `SSL_CERT_FILE` gets a context of its own)."""
    return _context(os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))


@functools.lru_cache(maxsize=4)
def _context(cafile: str | None, capath: str | None) -> ssl.SSLContext:
    import httpx  # the clients' own rules for the environment's CA settings

    return httpx.create_ssl_context(verify=True, trust_env=True)
