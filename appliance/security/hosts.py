"""Network identity checks: the client allow-list and the DNS-rebinding (Host) guard.

DNS rebinding lets a web page on ``evil.example`` re-point its own name at the box's LAN
address, so the victim's browser sends requests to the box with ``Host: evil.example``.
Only a *name* can be rebound, so the guard accepts a Host that is an IP address literal (a
page would have to be served from that address itself), ``localhost``, the box's own names,
any ``*.local`` (mDNS) name and the configured names; anything else gets 403. The same test
applies to ``Origin`` when a browser sends one, which stops cross-site pages from driving
the API (simple cross-origin POSTs, WebSocket connections) even where no key is needed.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

from appliance.errors import Forbidden

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def client_address(peer: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The client's address; IPv4-mapped IPv6 (``::ffff:a.b.c.d``) as plain IPv4."""
    # No address with a zone is longer than 61 characters; longer text is not one, and
    # keeping it out bounds the cache below, which clients' headers also reach.
    if not peer or len(peer) > 64:
        return None
    return _parse_address(peer)


@functools.lru_cache(maxsize=1024)  # every request parses its peer's address: keep a few
def _parse_address(peer: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class AllowList:
    """Client networks allowed at all; empty allows everyone."""

    def __init__(self, cidrs: Iterable[str]) -> None:
        self.networks: list[Network] = [ipaddress.ip_network(c, strict=False) for c in cidrs]

    def check(self, peer: str | None) -> None:
        """Raise :class:`Forbidden` unless ``peer`` is in an allowed network."""
        if not self.networks:
            return
        address = client_address(peer)
        if address is not None and any(address in net for net in self.networks):
            return
        raise Forbidden(f"client address {peer or 'unknown'} is not allowed (security.allow)")


def is_loopback(host: str) -> bool:
    """Whether a bind address reaches only this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def own_names(device_id: str = "", extra: Iterable[str] = ()) -> set[str]:
    """The names this box answers to: its host name (short, FQDN, .local) and device id."""
    names = {"localhost"}
    host = socket.gethostname().lower()
    if host:
        short = host.split(".")[0]
        names |= {host, short, short + ".local"}
        with contextlib.suppress(OSError):
            names.add(socket.getfqdn(host).lower())
    if device_id:
        names |= {device_id, device_id + ".local"}
    names |= {n.lower() for n in extra if n}
    return names


class HostGuard:
    """Accepts Host (and Origin) headers that name this box; see the module docstring."""

    def __init__(self, names: Iterable[str], allowed: Iterable[str] = ()) -> None:
        allowed = [a.lower() for a in allowed]
        self.disabled = "*" in allowed
        self.names = {n.lower().rstrip(".") for n in names}
        self.names |= {a for a in allowed if not a.startswith("*.")}
        wildcards = [a[1:] for a in allowed if a.startswith("*.")]
        self.suffixes = (*wildcards, ".local", ".localhost")
        # Host headers already accepted: every request of a client sends the same one, and
        # accepting it takes lowering, port stripping and perhaps address parsing. Only
        # accepted ones are kept, at most _KNOWN_HOSTS of them (the header is the client's
        # text); a refused one is judged again each time.
        self._accepted: set[str] = set()

    def accepts(self, host: str) -> bool:
        """Whether a bare host name or address (no port) is acceptable."""
        host = host.lower().rstrip(".")
        if not host:
            return False
        if host in self.names or host.endswith(self.suffixes):
            return True
        try:
            ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
            return True
        except ValueError:
            return False

    def check(self, host_header: str | None, origin: str | None = None) -> None:
        """Raise :class:`Forbidden` for a Host or Origin that names another site."""
        if self.disabled:
            return
        # HTTP/1.0 clients may send no Host: no browser does.
        if host_header and host_header not in self._accepted:
            self._check_host(host_header)
        if origin is not None:
            parts = urlsplit(origin)
            if origin == "null" or not parts.hostname or not self.accepts(parts.hostname):
                raise Forbidden(
                    "requests from pages of other sites (Origin) are not "
                    "accepted; add the site's host to security.allowed_hosts"
                )

    def _check_host(self, host_header: str) -> None:
        if not self.accepts(_strip_port(host_header)):
            # The header is not echoed: it is the attacker's text.
            raise Forbidden(
                "the Host header does not name this appliance; add the name to "
                "security.allowed_hosts to use it"
            )
        if len(self._accepted) < _KNOWN_HOSTS:
            self._accepted.add(host_header)


_KNOWN_HOSTS = 256


def _strip_port(host: str) -> str:
    if host.startswith("["):  # [v6]:port
        return host[1:].split("]", 1)[0]
    if host.count(":") == 1:
        return host.split(":", 1)[0]
    return host


__all__ = ["AllowList", "HostGuard", "client_address", "is_loopback", "own_names"]
