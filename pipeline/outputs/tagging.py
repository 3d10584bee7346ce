"""The AI tag a channel asks of a generated image: IPTC's `DigitalSourceType`
`trainedAlgorithmicMedia`, in the image's XMP packet (the IPTC Extension's property, which
lives in XMP), written by Pillow into a JPEG and read back to verify it.

Google Merchant Center's policy (February 2024) asks every AI-generated product image to carry
it, and to keep it.
"""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["AI_SOURCE", "TagMissing", "tagged_jpeg", "xmp_source"]

AI_SOURCE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
_IPTC_EXT = "http://iptc.org/std/Iptc4xmpExt/2008-02-29/"
_RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
_PACKET = (
    '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
    '<x:xmpmeta xmlns:x="adobe:ns:meta/">'
    f'<rdf:RDF xmlns:rdf="{_RDF}">'
    f'<rdf:Description rdf:about="" xmlns:Iptc4xmpExt="{_IPTC_EXT}"'
    f' Iptc4xmpExt:DigitalSourceType="{AI_SOURCE}"/>'
    "</rdf:RDF></x:xmpmeta>"
    '<?xpacket end="w"?>'
)


class TagMissing(Exception):
    """A copy that does not read back with the AI tag."""


def tagged_jpeg(image: Image.Image, quality: int) -> bytes:
    """`image` as a JPEG carrying the AI tag, verified by reading it back."""
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality, xmp=_PACKET.encode())
    data = out.getvalue()
    if xmp_source(data) != AI_SOURCE:
        raise TagMissing("the copy does not read back with DigitalSourceType")
    return data


def xmp_source(data: bytes) -> str | None:
    """The `DigitalSourceType` an image's XMP says (an attribute or an element), or None."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        packet = image.info.get("xmp")
    if not packet:
        return None
    text = packet.decode("utf-8", "replace") if isinstance(packet, bytes) else str(packet)
    start, end = text.find("<x:xmpmeta"), text.rfind("</x:xmpmeta>")
    if start < 0 or end < 0:
        return None
    try:
        root = ET.fromstring(text[start : end + len("</x:xmpmeta>")])
    except ET.ParseError:
        return None
    name = f"{{{_IPTC_EXT}}}DigitalSourceType"
    for node in root.iter(f"{{{_RDF}}}Description"):
        if name in node.attrib:
            return node.attrib[name]
        child = node.find(name)
        if child is not None and child.text:
            return child.text.strip()
    return None
