"""Trusted reverse proxies: who the client is behind ``X-Forwarded-For`` or ``Forwarded``.

A forwarding header is text the client can write, so it is believed only from a configured
proxy (``security.trusted_proxies``, none by default) and only as far as trusted proxies
wrote it. Each proxy appends the address it received the request from, so the header is read
from the right: the connection's peer must be a trusted proxy, every entry that is itself a
trusted proxy is skipped, and the first one that is not is the client. Entries further left
came from the client and are never looked at, so ``X-Forwarded-For: 10.0.0.1`` sent by a
stranger changes nothing. When every entry is a trusted proxy, the leftmost is the client (a
request from inside the proxies' own network).

An entry that is not an address (``unknown``, an RFC 7239 obfuscated name ``_hidden``,
garbage) where the client should be gives the client as ``unknown``: the allow-list refuses
it when one is configured, rather than letting the proxy's own address stand in for it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence

from appliance.security.hosts import Network, client_address

UNKNOWN = "unknown"
HEADERS = {"x-forwarded-for": "X-Forwarded-For", "forwarded": "Forwarded"}
# One RFC 7239 parameter: name=token or name="quoted string".
_PARAMETER = re.compile(r'\s*([A-Za-z0-9!#$%&\'*+.^_`|~-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;,\s]*)\s*')


class TrustedProxies:
    """The client address of a request, given its peer and forwarding header lines."""

    def __init__(self, cidrs: Iterable[str], header: str = "x-forwarded-for") -> None:
        self.networks: list[Network] = [ipaddress.ip_network(c, strict=False) for c in cidrs]
        self.header = HEADERS[header]

    @property
    def enabled(self) -> bool:
        return bool(self.networks)

    def trusts(self, address: str | None) -> bool:
        ip = client_address(address)
        return ip is not None and any(ip in net for net in self.networks)

    def client(self, peer: str | None, lines: Sequence[str]) -> str | None:
        """The client's address: ``peer`` unless it is a trusted proxy that forwarded one.

        ``lines`` are the values of every :attr:`header` line, in order.
        """
        if not self.networks or not lines or not self.trusts(peer):
            return peer
        hops = _forwarded_for(lines) if self.header == "Forwarded" else _split(lines)
        if not hops:
            return peer
        for hop in reversed(hops):
            address = _address(hop)
            if address is None:
                return UNKNOWN
            if not self.trusts(address):
                return address
        return _address(hops[0]) or UNKNOWN


def _split(lines: Sequence[str]) -> list[str]:
    """``X-Forwarded-For`` entries, left to right, over all header lines."""
    return [item.strip() for line in lines for item in line.split(",") if item.strip()]


def _forwarded_for(lines: Sequence[str]) -> list[str]:
    """The ``for=`` value of each RFC 7239 element, left to right; an element without one
    counts as an unknown hop (a proxy that did not say whom it received the request from)."""
    hops: list[str] = []
    for line in lines:
        for element in _elements(line):
            found = UNKNOWN
            for match in _PARAMETER.finditer(element):
                if match.group(1).lower() == "for":
                    found = match.group(2).strip('"').replace('\\"', '"')
            hops.append(found)
    return hops


def _elements(line: str) -> list[str]:
    """Split a ``Forwarded`` line on the commas that are not inside quotes."""
    elements: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in line:
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            elements.append("".join(current))
            current = []
            continue
        current.append(char)
    elements.append("".join(current))
    return [e for e in elements if e.strip()]


def _address(hop: str) -> str | None:
    """The address in one hop (``1.2.3.4``, ``1.2.3.4:80``, ``[::1]:80``, ``::1``), or None."""
    text = hop.strip()
    if text.startswith("["):
        text = text[1:].split("]", 1)[0]
    elif text.count(":") == 1:  # IPv4 with a port; bare IPv6 has more colons
        text = text.split(":", 1)[0]
    address = client_address(text)
    return str(address) if address is not None else None


__all__ = ["HEADERS", "UNKNOWN", "TrustedProxies"]
