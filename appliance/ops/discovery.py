"""mDNS/DNS-SD announcer: the appliance tells the LAN where it is and what it serves.

A lifecycle unit started once the HTTP socket is bound (so the real port is known). It
registers two services under the device's name, our own ``_appliance._tcp`` for clients
that look for appliances and ``_http._tcp`` for anything that lists web services, both
carrying the TXT record of :mod:`appliance.protocol.dnssd`. The record is rebuilt when model states
change (debounced, so a burst of loads is one update), the interfaces are rescanned every
``mdns.rescan_interval`` seconds (a box that boots before DHCP answers still gets announced,
a new address is re-announced), a name taken by another device is replaced by a unique one
(logged), and goodbye packets go out on shutdown so browsers drop the appliance at once.

python-zeroconf resolves a conflict only while probing, so two boxes that boot at the same
moment with the same name (a fleet flashed from one image, after a power cut) could both
keep it. The announcer therefore keeps watching: when another host answers for our name
with different data, the tie-break of RFC 6762 §8.2 (lexicographically later data wins)
decides; the loser takes a new name, the winner re-announces so caches drop the loser.

mDNS is best-effort: a failure is logged and retried on the next scan, never fatal to the
daemon serving its models.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Callable, Sequence
from types import TracebackType

from zeroconf import IPVersion, RecordUpdate, RecordUpdateListener, Zeroconf
from zeroconf._dns import DNSService  # zeroconf re-exports it, but not in __all__
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from appliance import __version__
from appliance.config import Config
from appliance.core.service import Core
from appliance.core.types import ModelState
from appliance.protocol.dnssd import (
    HTTP_SERVICE_TYPE,
    SERVICE_TYPE,
    Announcement,
    Interfaces,
    build_txt,
    instance_name,
    resolve_interfaces,
)

log = logging.getLogger(__name__)

DEBOUNCE = 0.2  # seconds a burst of model state changes may take to become one update
STOP_TIMEOUT = 3.0  # seconds goodbye packets and closing the sockets may take
_WILDCARD = ("", "0.0.0.0", "::")


class Announcer:
    """Announces one appliance on the interfaces ``[mdns]`` names, while entered."""

    def __init__(
        self,
        config: Config,
        core: Core,
        http_addresses: Sequence[tuple[str, int]],
        *,
        started: Sequence[object] = (),
        api_key_required: bool = False,
    ) -> None:
        """``http_addresses`` are the bound HTTP sockets; ``started`` the lifecycle units
        started before this one (the gRPC server among them tells its bound port);
        ``api_key_required`` what the access policy decided at start-up."""
        self._config = config
        self._api_key_required = api_key_required
        self._grpc_port: Callable[[], int] | None = None
        if config.grpc.enabled:
            from appliance.transports.grpc.server import GrpcServer

            grpc = next((u for u in started if isinstance(u, GrpcServer)), None)
            if grpc is not None:
                self._grpc_port = lambda: grpc.port
        self._core = core
        self._port = http_addresses[0][1]
        self._bound = [host for host, _ in http_addresses if host not in _WILDCARD]
        self._instance = instance_name(config.device.name or config.device.id)
        self._server = f"{config.device.id}.local."
        self._zc: AsyncZeroconf | None = None
        self._interfaces = Interfaces(())
        self._infos: dict[str, AsyncServiceInfo] = {}  # service type → what is registered
        self._published: dict[str, tuple[dict[str, str], list[str]]] = {}  # → (TXT, addresses)
        self._scanned = False
        self._watch = _ConflictWatch(self)
        self._lost: set[str] = set()  # service types whose name another host won
        self._won: set[str] = set()  # … and those where we won: re-announce
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._unlisten: Callable[[], None] | None = None

    @property
    def names(self) -> dict[str, str]:
        """Service type → the full service name announced (after any conflict rename)."""
        return {type_: info.name for type_, info in self._infos.items()}

    async def __aenter__(self) -> Announcer:
        self._unlisten = self._core.add_model_listener(self._dirty.set)
        self._task = asyncio.create_task(self._run(), name="appliance-mdns")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop updating, send goodbye packets and close the sockets."""
        if self._unlisten is not None:
            self._unlisten()
            self._unlisten = None
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        zc, self._zc = self._zc, None
        if zc is None:
            return
        zc.zeroconf.async_remove_listener(self._watch)
        try:
            await asyncio.wait_for(self._goodbye(zc), STOP_TIMEOUT)
        except asyncio.TimeoutError:
            log.warning("mDNS: goodbye packets not sent within %.0fs", STOP_TIMEOUT)
        except Exception:
            log.exception("mDNS: error while withdrawing the announcement")
        finally:
            self._infos.clear()
            self._published.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(zc.async_close(), STOP_TIMEOUT)

    async def _goodbye(self, zc: AsyncZeroconf) -> None:
        sent = [await zc.async_unregister_service(info) for info in self._infos.values()]
        await asyncio.gather(*sent)
        if self._infos:
            log.info("mDNS: withdrew %s", ", ".join(sorted(self.names.values())))

    # -- the background loop ------------------------------------------------------------

    async def _run(self) -> None:
        interval = self._config.mdns.rescan_interval
        if (
            self._bound
            and not self._interfaces_loopback_only()
            and all(_is_loopback(host) for host in self._bound)
        ):
            log.warning(
                "mDNS: HTTP listens on %s only; LAN clients that find this appliance "
                "cannot reach it (set http.host)",
                ", ".join(self._bound),
            )
        while True:
            try:
                await self._scan_interfaces()
                if self._zc is not None:
                    await self._publish(self._zc)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("mDNS: announcing failed; retrying in %.0fs", interval)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), interval)
                # Let a burst of model state changes settle into one update.
                await asyncio.sleep(DEBOUNCE)
            self._dirty.clear()

    def _interfaces_loopback_only(self) -> bool:
        wanted = self._config.mdns.interfaces
        return bool(wanted) and all(w == "lo" or _is_loopback(w) for w in wanted)

    async def _scan_interfaces(self) -> None:
        wanted = self._config.mdns.interfaces
        found = await asyncio.to_thread(resolve_interfaces, wanted)
        previous, self._interfaces = self._interfaces, found
        first, self._scanned = not self._scanned, True
        if found.missing and found.missing != previous.missing:
            log.warning(
                "mDNS: interface(s) %s have no IPv4 address (yet)", ", ".join(found.missing)
            )
        if not found.addresses:
            if first or previous.addresses:
                what = ", ".join(wanted) if wanted else "any non-loopback interface"
                log.warning("mDNS: no IPv4 address on %s yet; announcing once there is one", what)
            return
        if found.addresses == previous.addresses and self._zc is not None:
            return
        if self._zc is None:
            self._zc = AsyncZeroconf(interfaces=list(found.addresses), ip_version=IPVersion.V4Only)
            self._zc.zeroconf.async_add_listener(self._watch, None)
        else:
            await self._zc.async_update_interfaces(list(found.addresses))
        log.info("mDNS: using %s", ", ".join(found.addresses))

    def _service_addresses(self) -> list[str]:
        """Where clients should connect: the bound address, or with a wildcard bind the
        addresses of the announcing interfaces (loopback only when there is nothing else)."""
        if self._bound:
            return list(self._bound)
        addresses = list(self._interfaces.addresses)
        lan = [a for a in addresses if not _is_loopback(a)]
        return lan or addresses

    def announcement(self) -> Announcement:
        """What the TXT record says right now."""
        config = self._config
        ready = sorted(m.name for m in self._core.list_models() if m.state is ModelState.READY)
        mqtt = config.mqtt
        return Announcement(
            device_id=config.device.id,
            version=__version__,
            ready=self._core.ready,
            models=ready,
            tls=config.http.tls_cert_file is not None,
            api_key_required=self._api_key_required,
            websocket=config.websocket.enabled,
            grpc_port=self._grpc_port() if self._grpc_port is not None else None,
            # The MQTT transport's rule for its base topic (transports/mqtt/transport.py).
            mqtt_topic_base=(mqtt.base_topic or f"appliance/{config.device.id}")
            if mqtt.enabled
            else None,
        )

    def _on_service_record(self, record: DNSService) -> None:
        """Another host's SRV record for one of our names: a conflict to settle."""
        for type_, info in self._infos.items():
            if record.key != info.key or record.ttl == 0:
                continue
            ours = _srv_rdata(info.priority, info.weight, self._port, self._server)
            theirs = _srv_rdata(record.priority, record.weight, record.port, record.server)
            if theirs == ours:
                continue  # our own announcement, looped back
            lost = ours < theirs
            log.warning(
                "mDNS: %s (port %d) also claims %r; %s",
                record.server,
                record.port,
                _instance_of(info.name, type_),
                "choosing a new name" if lost else "keeping it (it must yield)",
            )
            (self._lost if lost else self._won).add(type_)
            self._dirty.set()

    def _settle_conflicts(self, zc: AsyncZeroconf) -> None:
        for type_ in list(self._lost):
            info = self._infos.pop(type_, None)
            self._published.pop(type_, None)
            if info is not None:
                # No goodbye: the PTR record is the same as the winner's and would remove the
                # winner from every cache. The winner's re-announcement flushes our records.
                zc.zeroconf.registry.async_remove(info)
        for type_ in self._won:
            self._published.pop(type_, None)  # forces a re-announcement
        self._lost.clear()
        self._won.clear()

    async def _publish(self, zc: AsyncZeroconf) -> None:
        self._settle_conflicts(zc)
        txt = build_txt(self.announcement())
        addresses = sorted(self._service_addresses())
        results = await asyncio.gather(
            *(
                self._publish_one(zc, type_, txt, addresses)
                for type_ in (SERVICE_TYPE, HTTP_SERVICE_TYPE)
            ),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _publish_one(
        self, zc: AsyncZeroconf, type_: str, txt: dict[str, str], addresses: list[str]
    ) -> None:
        if self._published.get(type_) == (txt, addresses):
            return
        old = self._infos.get(type_)
        requested = old.name if old is not None else f"{self._instance}.{type_}"
        info = AsyncServiceInfo(
            type_,
            requested,
            port=self._port,
            properties=txt,
            server=self._server,
            parsed_addresses=addresses,
        )
        if old is None:
            # Probing takes about a second; with allow_name_change a name another device
            # holds becomes "<name>-2" (and so on) instead of an error.
            announcing = await zc.async_register_service(info, allow_name_change=True)
            # Registered (and answering) from here on: a stop now must send goodbyes.
            self._infos[type_] = info
            if info.name != requested:
                log.warning(
                    "mDNS: the name %r is taken on the network; announcing as %r",
                    _instance_of(requested, type_),
                    _instance_of(info.name, type_),
                )
            log.info(
                "mDNS: announcing %s on port %d (ready=%s, models=%s)",
                info.name,
                self._port,
                txt["ready"],
                txt["models"] or "none",
            )
        else:
            announcing = await zc.async_update_service(info)
            self._infos[type_] = info
            log.info(
                "mDNS: updated %s (ready=%s, models=%s)",
                info.name,
                txt["ready"],
                txt["models"] or "none",
            )
        await announcing
        self._published[type_] = (txt, addresses)


class _ConflictWatch(RecordUpdateListener):
    """Passes every SRV record received to the announcer (on the loop)."""

    def __init__(self, announcer: Announcer) -> None:
        self._announcer = announcer

    def async_update_records(self, zc: Zeroconf, now: float, records: list[RecordUpdate]) -> None:
        for update in records:
            if isinstance(update.new, DNSService):
                self._announcer._on_service_record(update.new)


def _srv_rdata(priority: int, weight: int, port: int, target: str) -> bytes:
    """SRV rdata, uncompressed, as RFC 6762 §8.2 compares it (names in lower case)."""
    labels = [label.encode() for label in target.lower().rstrip(".").split(".")]
    name = b"".join(bytes([len(label)]) + label for label in labels) + b"\0"
    return priority.to_bytes(2, "big") + weight.to_bytes(2, "big") + port.to_bytes(2, "big") + name


def _instance_of(name: str, type_: str) -> str:
    return name[: -len(type_) - 1] if name.endswith("." + type_) else name


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


__all__ = ["Announcer"]
