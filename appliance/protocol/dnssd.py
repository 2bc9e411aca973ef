"""The DNS-SD contract between an announcing appliance and the clients that find it.

Service types, the TXT record keys and how they are encoded and parsed, and how interface
names or addresses from the configuration become the IPv4 addresses mDNS runs on. The
announcer (:mod:`appliance.ops.discovery`) builds records with :func:`build_txt`; the client
(:mod:`appliance.client`) and ``appliance discover`` read them with :func:`appliance_from_info`.
This module imports no zeroconf at run time, so it stays cheap to import.

TXT keys (version 1; values are ASCII, lists comma-separated):

``txtvers``  record format version (``1``)
``id``       device id (stable across renames and reboots)
``version``  appliance software version
``api``      protocols offered: ``openai``, ``oip-v2``, ``ollama``, and when they are on
             ``ws``, ``grpc`` and ``mqtt``
``openai``   path of the OpenAI-compatible API (``/v1``)
``oip``      path of the Open Inference Protocol v2 REST API (``/v2``)
``ollama``   path of the Ollama-compatible API (``/api``)
``ws``       path of the WebSocket endpoint (``/ws``), only when it is on
``grpc``     port of Open Inference Protocol v2 over gRPC, only when it is on
``mqtt``     MQTT topic base (``appliance/<id>``), only with MQTT on
``health``   path of the health endpoint (``/health``)
``path``     the human docs page, as ``_http._tcp`` browsers expect (``/docs``)
``tls``      ``1`` when HTTP is served over TLS
``auth``     ``apikey`` when requests need an API key, else ``none``
``ready``    ``1`` when the appliance serves requests
``models``   names of the models that are ready, trimmed to fit one TXT string
``nmodels``  how many models are ready; more than ``models`` lists means it was trimmed
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zeroconf import ServiceInfo

SERVICE_TYPE = "_appliance._tcp.local."
HTTP_SERVICE_TYPE = "_http._tcp.local."
TXT_VERSION = "1"

# RFC 6763 §6.1: one TXT string is at most 255 bytes, "key=value" included. §6.2: keep the
# whole record small enough for one packet; 1300 bytes leaves room for the other records.
MAX_TXT_STRING = 255
MAX_TXT_RECORD = 1300
# RFC 6763 §4.1.1: an instance name is one DNS label of at most 63 bytes of UTF-8.
MAX_INSTANCE_NAME = 63

OPENAI_PATH = "/v1"
OIP_PATH = "/v2"
OLLAMA_PATH = "/api"
WS_PATH = "/ws"
HEALTH_PATH = "/health"
DOCS_PATH = "/docs"


@dataclass(frozen=True)
class Announcement:
    """What an appliance says about itself; :func:`build_txt` turns it into TXT entries."""

    device_id: str
    version: str
    ready: bool
    models: Sequence[str] = ()
    tls: bool = False
    api_key_required: bool = False
    websocket: bool = False
    grpc_port: int | None = None
    mqtt_topic_base: str | None = None


def build_txt(announcement: Announcement) -> dict[str, str]:
    """TXT entries for ``announcement``, the model list trimmed to the size limits."""
    a = announcement
    optional = {
        "ws": WS_PATH if a.websocket else None,
        "grpc": str(a.grpc_port) if a.grpc_port else None,
        "mqtt": a.mqtt_topic_base or None,
    }
    offered = {key: value for key, value in optional.items() if value}
    txt = {
        "txtvers": TXT_VERSION,
        "id": a.device_id,
        "version": a.version,
        "api": ",".join(["openai", "oip-v2", "ollama", *offered]),
        "openai": OPENAI_PATH,
        "oip": OIP_PATH,
        "ollama": OLLAMA_PATH,
        **offered,
        "health": HEALTH_PATH,
        "path": DOCS_PATH,
    }
    txt |= {
        "tls": "1" if a.tls else "0",
        "auth": "apikey" if a.api_key_required else "none",
        "ready": "1" if a.ready else "0",
        "nmodels": str(len(a.models)),
    }
    for key, value in txt.items():
        if _entry_size(key, value) > MAX_TXT_STRING:
            raise ValueError(f"TXT entry {key!r} is longer than {MAX_TXT_STRING} bytes")
    used = sum(_entry_size(k, v) + 1 for k, v in txt.items())  # +1: each string's length byte
    budget = min(MAX_TXT_STRING, MAX_TXT_RECORD - used - 1) - len("models=")
    txt["models"] = _trim_names(a.models, budget)
    return txt


def _entry_size(key: str, value: str) -> int:
    return len(key.encode()) + 1 + len(value.encode())


def _trim_names(names: Sequence[str], budget: int) -> str:
    """As many whole names as fit in ``budget`` bytes, comma-separated, in the given order."""
    kept: list[str] = []
    size = 0
    for name in names:
        extra = len(name.encode()) + (1 if kept else 0)
        if size + extra > budget:
            break
        kept.append(name)
        size += extra
    return ",".join(kept)


def instance_name(name: str) -> str:
    """A DNS-SD instance name from a human device name: printable, at most 63 bytes."""
    cleaned = "".join(c if c.isprintable() else " " for c in name).strip() or "appliance"
    encoded = cleaned.encode()[:MAX_INSTANCE_NAME]
    return encoded.decode(errors="ignore").rstrip()


# ------------------------------------------------------------------------------ parsing


@dataclass(frozen=True)
class Appliance:
    """One appliance as found on the network (a resolved DNS-SD service)."""

    name: str  # the instance name, e.g. "Greenhouse 3" (or "Greenhouse 3-2" after a conflict)
    service: str  # the full service name, the key of this record on the network
    device_id: str
    host: str  # the mDNS host name (SRV target), e.g. "greenhouse-3.local."
    addresses: tuple[str, ...]
    port: int
    version: str
    ready: bool
    models: tuple[str, ...]
    model_count: int
    protocols: tuple[str, ...]
    tls: bool
    auth: str
    mqtt_topic_base: str | None
    paths: Mapping[str, str] = field(default_factory=dict)  # "openai": "/v1", "ws": …
    grpc_port: int | None = None
    txt: Mapping[str, str] = field(default_factory=dict)

    @property
    def models_complete(self) -> bool:
        """False when the TXT record could not hold every ready model's name."""
        return len(self.models) >= self.model_count

    @property
    def address(self) -> str:
        """The address clients should use: IPv4 before IPv6, LAN before loopback."""
        return _best_address(self.addresses) or self.host.rstrip(".")

    @property
    def url(self) -> str:
        """Base URL of the appliance's HTTP side, e.g. ``http://192.168.1.20:8080``."""
        host = self.address
        if ":" in host:
            host = f"[{host}]"
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        """What the OpenAI client's ``base_url`` should be, e.g. ``http://…:8080/v1``."""
        return self.url + self.paths.get("openai", OPENAI_PATH)

    def serves(self, model: str) -> bool:
        """Whether the appliance is ready and lists ``model`` as ready."""
        return self.ready and model in self.models

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "id": self.device_id,
            "address": self.address,
            "port": self.port,
            "addresses": list(self.addresses),
            "host": self.host,
            "url": self.url,
            "openai_base_url": self.openai_base_url,
            "version": self.version,
            "ready": self.ready,
            "models": list(self.models),
            "models_complete": self.models_complete,
            "protocols": list(self.protocols),
            "tls": self.tls,
            "auth": self.auth,
            "paths": dict(self.paths),
            "grpc_port": self.grpc_port,
            "mqtt": self.mqtt_topic_base,
            "service": self.service,
            "txt": dict(self.txt),
        }


def decode_txt(properties: Mapping[bytes, bytes | None]) -> dict[str, str]:
    """TXT entries as text; undecodable bytes are replaced, valueless keys become ``""``."""
    return {
        k.decode(errors="replace").lower(): (v or b"").decode(errors="replace")
        for k, v in properties.items()
    }


def appliance_from_info(info: ServiceInfo) -> Appliance | None:
    """The :class:`Appliance` a resolved service describes, or None if it is not one of ours
    (no ``id`` in its TXT) or is incomplete (no port)."""
    txt = decode_txt(info.properties)
    device_id = txt.get("id", "")
    if not device_id or not info.port:
        return None
    models = tuple(m for m in txt.get("models", "").split(",") if m)
    try:
        count = int(txt.get("nmodels", ""))
    except ValueError:
        count = len(models)
    grpc = txt.get("grpc", "")
    suffix = "." + info.type
    name = info.name[: -len(suffix)] if info.name.endswith(suffix) else info.name
    return Appliance(
        name=name,
        service=info.name,
        device_id=device_id,
        host=info.server or "",
        addresses=tuple(info.parsed_scoped_addresses()),
        port=info.port,
        version=txt.get("version", ""),
        ready=txt.get("ready") == "1",
        models=models,
        model_count=max(count, len(models)),
        protocols=tuple(p for p in txt.get("api", "").split(",") if p),
        tls=txt.get("tls") == "1",
        auth=txt.get("auth", "none"),
        mqtt_topic_base=txt.get("mqtt") or None,
        paths={
            k: txt[k]
            for k in ("openai", "oip", "ollama", "ws", "health", "path")
            if txt.get(k, "").startswith("/")
        },
        grpc_port=int(grpc) if grpc.isdigit() and 0 < int(grpc) < 65536 else None,
        txt=txt,
    )


def _best_address(addresses: Sequence[str]) -> str | None:
    def rank(text: str) -> tuple[int, int]:
        try:
            ip = ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            return (9, 9)
        return (int(ip.is_loopback) * 2 + int(ip.is_link_local), ip.version)

    return min(addresses, key=rank) if addresses else None


# --------------------------------------------------------------------------- interfaces


@dataclass(frozen=True)
class Interfaces:
    """IPv4 addresses mDNS should use, and the configured entries not present (yet)."""

    addresses: tuple[str, ...]
    missing: tuple[str, ...] = ()


def resolve_interfaces(wanted: Sequence[str]) -> Interfaces:
    """Turn interface names (``eth0``, ``lo``) or IPv4 addresses into the IPv4 addresses
    present on this machine now. Empty means every non-loopback interface.

    Blocking (``getifaddrs``); cheap, but call it off the event loop in the daemon.
    """
    import ifaddr

    by_name: dict[str, list[str]] = {}
    present: list[str] = []
    for adapter in ifaddr.get_adapters():
        ipv4 = [str(ip.ip) for ip in adapter.ips if ip.is_IPv4]
        by_name.setdefault(adapter.nice_name, []).extend(ipv4)
        if adapter.name != adapter.nice_name:
            by_name.setdefault(str(adapter.name), []).extend(ipv4)
        present.extend(ipv4)
    if not wanted:
        lan = [a for a in present if not ipaddress.ip_address(a).is_loopback]
        return Interfaces(tuple(dict.fromkeys(lan)))
    found: list[str] = []
    missing: list[str] = []
    for entry in wanted:
        if _is_ipv4(entry):
            (found if entry in present else missing).append(entry)
        elif by_name.get(entry):
            found.extend(by_name[entry])
        else:
            missing.append(entry)
    return Interfaces(tuple(dict.fromkeys(found)), tuple(missing))


def _is_ipv4(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).version == 4
    except ValueError:
        return False


def parse_interface_list(text: str) -> list[str]:
    """``"lo, eth0"`` → ``["lo", "eth0"]`` (the ``--interfaces`` and environment format)."""
    return [item.strip() for item in text.split(",") if item.strip()]


__all__ = [
    "HTTP_SERVICE_TYPE",
    "SERVICE_TYPE",
    "Announcement",
    "Appliance",
    "Interfaces",
    "appliance_from_info",
    "build_txt",
    "decode_txt",
    "instance_name",
    "parse_interface_list",
    "resolve_interfaces",
]
