"""An image cell's text made into what a person would send, or the reason it cannot be.

A spreadsheet's image cell is typed or pasted by people: two URLs glued together, a host
without `https://`, a file name with spaces, a Google Drive or Dropbox page in place of the
image, a relative path that the shop's media base completes (`manifest.url_base`). Each image
is tidied here before the schema's rules judge it: spaces and other characters a browser would
encode are percent-encoded, a relative path is joined to the base, and what no person would
send is refused with the form they meant.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qs, quote, urlsplit

from pipeline.core import IMAGE_EXTENSIONS, UPLOAD_TOKEN, is_object_url

__all__ = ["tidy_image"]

# a second URL's scheme straight after the first URL's text, with no separator
_GLUED = re.compile(r"(?<=[^\s,;])(?=https?://)", re.IGNORECASE)
# a host at the start of a path with no scheme: `cdn.shop.com/a.jpg`, `www.shop.com/a.jpg`
_BARE_HOST = re.compile(r"(?:www\.)?[a-z0-9-]+(?:\.[a-z0-9-]+)*\.[a-z]{2,24}(?::\d+)?/", re.I)
_DRIVE = re.compile(r"https?://drive\.google\.com/(?:file/d/|open\?id=)([\w-]+)", re.IGNORECASE)
_SAFE = ":/?#[]@!$&'()*+,;=%~"  # what a browser leaves as it is in a URL it sends


def _said(exc: ValueError) -> str:
    text = str(exc)
    return text[:1].lower() + text[1:]  # "port out of range 0-65535"


def _host_like(value: str) -> bool:
    match = _BARE_HOST.match(value)
    if match is None:
        return False
    first = match.group().rstrip("/").rsplit(":", 1)[0]
    return first.rsplit(".", 1)[-1].lower() not in IMAGE_EXTENSIONS  # `photo.jpg/` is a folder


def _page_link(url: str) -> str | None:
    """Why a share page is not the image, with the direct link's form, or None."""
    drive = _DRIVE.match(url)
    if drive is not None:
        direct = f"https://drive.google.com/uc?export=download&id={drive.group(1)}"
        return f"is a Google Drive page, not the image; its direct link is {direct}"
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if host in ("dropbox.com", "www.dropbox.com"):
        query = parse_qs(parts.query)
        if query.get("raw") != ["1"] and query.get("dl") != ["1"]:
            kept = "&".join(p for p in parts.query.split("&") if p and not p.startswith("dl="))
            direct = parts._replace(query=f"{kept}&raw=1" if kept else "raw=1").geturl()
            return f"is a Dropbox page, not the image; its direct link is {direct}"
    return None


def tidy_image(value: str, url_base: str | None) -> tuple[str, str | None]:
    """The image as it is sent (or read, for a file or object), or the rule it breaks."""
    try:
        return _tidy(value.strip(), url_base)
    except ValueError as exc:  # a URL that does not split (`http://[::1`)
        return value, f"is not a usable URL ({_said(exc)})"


def _tidy(text: str, url_base: str | None) -> tuple[str, str | None]:
    if text.startswith(UPLOAD_TOKEN) or is_object_url(text):
        return text, None
    lower = text.lower()
    if lower.startswith("data:"):
        return text, (
            "is a data: URL (the image written into the cell), which the provider cannot "
            "fetch: give an HTTPS URL, or save it as a file"
        )
    glued = _GLUED.split(text)
    if len(glued) > 1:
        shown = " and ".join(repr(part) for part in glued)
        return text, f"holds URLs glued together with no separator: {shown}"
    if text.startswith("//"):
        return text, f"has no scheme: did you mean https:{text}?"
    if "://" not in text:
        if url_base is not None and not lower.startswith("file:"):
            text = f"{url_base.rstrip('/')}/{text.lstrip('/')}"
        elif _host_like(text):
            return text, f"has no scheme: did you mean https://{text}?"
        else:
            return text, None  # a local file: read, judged and uploaded by InputStage
    if not lower.startswith(("http://", "https://")):
        return text, None  # the schema's rules name any other scheme
    text = quote(text, safe=_SAFE)
    try:
        urlsplit(text).port  # noqa: B018 - raises on a port out of range
    except ValueError as exc:
        return text, f"is not a usable URL ({_said(exc)})"
    page = _page_link(text)  # the URL splits: read above
    return (text, page) if page is not None else (text, None)
