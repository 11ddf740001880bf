"""XMP packets for png, webp and jpeg: the record per key and as JSON, plus the AI-disclosure fields.

Besides renderfleet's own properties (namespace :data:`XMP_NAMESPACE`, prefix ``renderfleet``)
a packet carries IPTC's ``Iptc4xmpExt:DigitalSourceType`` = ``trainedAlgorithmicMedia`` and
``xmp:CreatorTool``, the fields AI-disclosure readers look for.  Another tool's packet is kept:
renderfleet's description is merged into it, replacing an earlier renderfleet one.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ElementTree
from xml.sax.saxutils import escape

from pipelines.media.provenance.record import GENERATOR, TRAINED_ALGORITHMIC_MEDIA, parse_record, record_json

__all__ = ["XMP_NAMESPACE", "record_from_xmp", "xmp_packet"]

XMP_NAMESPACE = "urn:renderfleet:provenance:1.0/"
"""XMP namespace of renderfleet's properties (prefix ``renderfleet``)."""

_XMP_NS = {
    "x": "adobe:ns:meta/",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
    "xmp": "http://ns.adobe.com/xap/1.0/",
    "Iptc4xmpExt": "http://iptc.org/std/Iptc4xmpExt/2008-02-29/",
    "renderfleet": XMP_NAMESPACE,
}
_INVALID_XML_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _xml_text(value: str) -> str:
    """Text safe inside an XML element (invalid characters replaced, markup escaped)."""
    return escape(_INVALID_XML_CHARS.sub("\ufffd", value))


def _xmp_description(record: dict[str, str], standard_fields: bool) -> str:
    """renderfleet's rdf:Description: the record per key and as JSON, plus CreatorTool/DigitalSourceType."""
    lines = [
        '  <rdf:Description rdf:about=""',
        f'    xmlns:xmp="{_XMP_NS["xmp"]}"',
        f'    xmlns:Iptc4xmpExt="{_XMP_NS["Iptc4xmpExt"]}"',
        f'    xmlns:renderfleet="{XMP_NAMESPACE}">',
    ]
    if standard_fields:
        lines.append(f"   <xmp:CreatorTool>{_xml_text(record.get('generator', GENERATOR))}</xmp:CreatorTool>")
        lines.append(f"   <Iptc4xmpExt:DigitalSourceType>{TRAINED_ALGORITHMIC_MEDIA}</Iptc4xmpExt:DigitalSourceType>")
    for key, value in record.items():
        lines.append(f"   <renderfleet:{key}>{_xml_text(value)}</renderfleet:{key}>")
    lines.append(f"   <renderfleet:record>{_xml_text(record_json(record))}</renderfleet:record>")
    lines.append("  </rdf:Description>")
    return "\n".join(lines)


_OUR_DESCRIPTION_RE = re.compile(
    r"\s*<rdf:Description\b[^>]*xmlns:renderfleet=\"" + re.escape(XMP_NAMESPACE) + r"\".*?</rdf:Description>",
    re.DOTALL,
)


def xmp_packet(record: dict[str, str], existing: bytes | None = None) -> bytes:
    """An XMP packet with renderfleet's description; merged into ``existing`` (another tool's XMP) when given."""
    if existing:
        text = existing.decode("utf-8", errors="replace")
        text = _OUR_DESCRIPTION_RE.sub("", text)
        close = text.rfind("</rdf:RDF>")
        if close >= 0 and "<rdf:Description" in text:
            # Another tool's packet: add our description, without repeating properties it already sets.
            standard = "CreatorTool>" not in text and "DigitalSourceType>" not in text
            merged = text[:close].rstrip() + "\n" + _xmp_description(record, standard) + "\n " + text[close:]
            return merged.encode("utf-8")
    packet = "\n".join(
        [
            '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>',
            f'<x:xmpmeta xmlns:x="{_XMP_NS["x"]}" x:xmptk="{GENERATOR}">',
            f' <rdf:RDF xmlns:rdf="{_XMP_NS["rdf"]}">',
            _xmp_description(record, True),
            " </rdf:RDF>",
            "</x:xmpmeta>",
            '<?xpacket end="w"?>',
        ]
    )
    return packet.encode("utf-8")


def record_from_xmp(packet: bytes | str | None) -> dict[str, str]:
    """The record from an XMP packet's renderfleet:record property, or {}."""
    if not packet:
        return {}
    text = packet.decode("utf-8", errors="replace") if isinstance(packet, bytes) else packet
    start = text.find("<x:xmpmeta")
    end = text.rfind("</x:xmpmeta>")
    if start < 0 or end < 0:
        return {}
    try:
        root = ElementTree.fromstring(text[start : end + len("</x:xmpmeta>")])
    except ElementTree.ParseError:
        return {}
    node = root.find(".//{%s}record" % XMP_NAMESPACE)
    return parse_record(node.text or "") if node is not None else {}
