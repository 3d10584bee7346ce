"""The inputs of the sandbox's jobs, as the provider gets them: a sample by its path, a
loopback URL fetched (when allowed) and judged as an image, or one drawn from the URL."""

from __future__ import annotations

import asyncio
import io
from urllib.parse import urlsplit

import httpx
from PIL import Image

from pipeline.core import SandboxSettings
from pipeline.core.schema import MAX_INPUT_BYTES, is_loopback_host
from pipeline.sandbox import images

__all__ = ["InputImages"]

_KEPT = 256  # inputs kept decoded, for the outputs drawn from them


def _decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


class InputImages:
    """The inputs fetched and decoded so far, and the client that fetches them."""

    def __init__(self, settings: SandboxSettings) -> None:
        self.settings = settings
        self._inputs: dict[str, Image.Image] = {}
        self._fetcher: httpx.AsyncClient | None = None  # made on the first input fetched

    async def aclose(self) -> None:
        if self._fetcher is not None:
            await self._fetcher.aclose()

    def _keep(self, url: str, image: Image.Image) -> None:
        if len(self._inputs) > _KEPT:
            self._inputs.clear()
        self._inputs[url] = image

    async def image(self, url: str) -> Image.Image:
        """A job's input: a known sample by path, a loopback fetch when allowed, else drawn."""
        cached = self._inputs.get(url)
        if cached is not None:
            return cached
        parts = urlsplit(url)
        name = parts.path.rsplit("/", 1)[-1]
        # a sample: the one shared picture (never drawn on here), so its product is cut out
        # once however many rows name it, each with a query of its own
        image = images.sample_picture(name) if parts.path.startswith("/samples/") else None
        if (
            image is None
            and self.settings.allow_loopback_urls
            and is_loopback_host(parts.hostname or "")
        ):
            try:
                async with httpx.AsyncClient(timeout=5) as client:
                    answer = await client.get(url)
                answer.raise_for_status()
                image = Image.open(io.BytesIO(answer.content))
                image.load()
            except (httpx.HTTPError, OSError):
                image = None
        if image is None:
            image = images.synthetic_input(url)
        self._keep(url, image)
        return image

    async def fetch(self, url: str) -> tuple[tuple[str, str] | None, int]:
        """Fetch one input: (error code, why) when it cannot be used, and its size."""
        if self._fetcher is None:
            self._fetcher = httpx.AsyncClient(timeout=10.0, trust_env=False)
        data = bytearray()
        try:
            async with self._fetcher.stream("GET", url) as answer:
                if not answer.is_success:
                    return ("INPUT_DOWNLOAD_ERROR", f"input answered HTTP {answer.status_code}"), 0
                async for chunk in answer.aiter_bytes():
                    data += chunk
                    if len(data) > MAX_INPUT_BYTES:
                        return ("INPUT_VALIDATION_ERROR", "input is over 20 MB"), len(data)
        except httpx.HTTPError as exc:
            return ("INPUT_DOWNLOAD_ERROR", f"input could not be fetched: {exc!r}"), 0
        try:
            image = await asyncio.to_thread(_decode, bytes(data))
        except (OSError, ValueError, Image.DecompressionBombError):
            return ("INPUT_VALIDATION_ERROR", "input is not an image"), len(data)
        self._keep(url, image)
        return None, len(data)
