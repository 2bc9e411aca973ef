"""The access policy every transport applies, in one order: allow-list → Host → API key →
scope → rate limit. Each check raises the error its transport maps to a status
(403, 403, 401, 403, 429); nothing here reads a body.

Whether keys are needed is decided once, at start-up (:func:`build`): ``security.auth =
"auto"`` needs them unless every listening address is loopback and no key is configured.
A box that serves the LAN with no key configured generates an admin key into its state
directory and logs where, rather than serving the LAN open (docs/security.md).

*Which* keys are accepted can change while serving: :meth:`AccessPolicy.reload_keys` reads
them again (the daemon's SIGHUP) and swaps the whole key store at once, so a request sees
either the old keys or the new ones, and a removed key is refused from the next request on.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.config import (
    AccessConfig,
    ClientCertEntry,
    Config,
    HttpConfig,
)
from appliance.errors import ConfigError, Forbidden, RateLimited, Unauthenticated
from appliance.security.hosts import (
    AllowList,
    HostGuard,
    client_address,
    is_loopback,
    own_names,
)
from appliance.security.keys import BOOTSTRAP_FILE, ApiKey, KeyStore, bootstrap_key, load_store
from appliance.security.proxies import TrustedProxies
from appliance.security.ratelimit import RateLimiter

if TYPE_CHECKING:
    from appliance.hub.config import HubConfig, HubHttpConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KeySources:
    """Where keys come from besides the configuration: the environment (for
    ``$CREDENTIALS_DIRECTORY``) and where a generated key lives. Kept for reloads."""

    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    state_dir: Path | None = None
    key_file: str = BOOTSTRAP_FILE

    def load(self, config: AccessConfig, certs: Iterable[ClientCertEntry] = ()) -> KeyStore:
        return load_store(config, self.env, certs)

    def bootstrap(self, store: KeyStore) -> Path:
        """Add the generated admin key to an empty ``store``; where it is kept."""
        state_dir = self.state_dir
        if state_dir is None:
            from appliance.ops.instance import state_directory

            state_dir = state_directory(self.env)
        key, path = bootstrap_key(state_dir / self.key_file)
        store.add(key)
        return path


class AccessPolicy:
    """What one server accepts. Build it with :func:`build`."""

    def __init__(
        self,
        config: AccessConfig,
        store: KeyStore,
        *,
        required: bool,
        names: Iterable[str] = (),
        sources: KeySources | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.required = required
        self.sources = sources or KeySources()
        self.allow = AllowList(config.allow)
        self.hosts = HostGuard(names, config.allowed_hosts)
        self.proxies = TrustedProxies(config.trusted_proxies, config.forwarded_header)
        self.per_client = RateLimiter(config.rate_per_client, config.burst_per_client)
        self.per_key = RateLimiter(config.rate_per_key, config.burst_per_key)
        self._exact = {p for p in config.public if not p.endswith("*")}
        self._prefixes = tuple(p[:-1] for p in config.public if p.endswith("*"))

    # -- the checks, in order ---------------------------------------------------------

    def check_network(self, peer: str | None, host: str | None, origin: str | None) -> None:
        """Allow-list, then the DNS-rebinding guard. ``peer`` is the client's address (as
        :attr:`proxies` resolved it, where the transport has forwarding headers)."""
        self.allow.check(peer)
        self.hosts.check(host, origin)

    def is_public(self, path: str) -> bool:
        return path in self._exact or path.startswith(self._prefixes)

    def authenticate(
        self, authorization: str | None, api_key: str | None, certificate: str | None = None
    ) -> ApiKey | None:
        """The key the request carries; raises :class:`Unauthenticated` when keys are
        required and none valid came. Without required keys, credentials are ignored.

        ``certificate`` is the common name of a client certificate the TLS handshake
        verified; it stands in for a key when ``security.client_certs`` names it and no
        key was sent (a key sent along is checked, and wins).
        """
        if not self.required:
            return None
        store = self.store  # one snapshot: a reload swaps the whole store
        if authorization is None and api_key is None and certificate is not None:
            identity = store.for_certificate(certificate)
            if identity is not None:
                return identity
        if authorization is not None:
            scheme, _, value = authorization.strip().partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                raise Unauthenticated("the Authorization header must be 'Bearer <API key>'")
            presented = value.strip()
        elif api_key is not None:
            presented = api_key.strip()
        else:
            unmapped = (
                f" (client certificate {certificate!r} is not in security.client_certs)"
                if certificate is not None
                else ""
            )
            raise Unauthenticated(
                "an API key is required: send 'Authorization: Bearer <key>' "
                f"or 'X-API-Key: <key>'{unmapped}"
            )
        key = store.verify(presented)
        if key is None:
            raise Unauthenticated("the API key is not valid")
        return key

    @staticmethod
    def authorize(key: ApiKey | None, scope: str) -> None:
        """Raise :class:`Forbidden` if ``key`` lacks ``scope`` (None: keys are off)."""
        if key is not None and not key.allows(scope):
            raise Forbidden(
                f"API key {key.name!r} lacks the {scope!r} scope this needs "
                f"(it has: {', '.join(sorted(key.scopes))})"
            )

    def limit(self, peer: str | None, key: ApiKey | None) -> None:
        """Take a token from the client's and the key's bucket; :class:`RateLimited` if empty."""
        if self.per_client.enabled:
            address = client_address(peer)
            wait = self.per_client.take(str(address) if address else (peer or "unknown"))
            if wait:
                raise RateLimited(f"too many requests from {peer}; retry later", wait)
        if key is not None:
            wait = self.per_key.take(key.name)
            if wait:
                raise RateLimited(f"too many requests with API key {key.name!r}; retry later", wait)

    # -- reloading --------------------------------------------------------------------

    def reload_keys(self, config: AccessConfig, certs: Iterable[ClientCertEntry] = ()) -> None:
        """Read the keys again (``config``'s, the key file's, the credential's) and swap
        them in at once. Blocking (reads files): call it off the loop.

        Raises :class:`ConfigError` naming the problem and leaves the keys in use as they
        are. Whether keys are required at all stays as decided at start-up; a reload that
        finds none falls back to the generated key, as a start would.
        """
        store = self.sources.load(config, certs)
        if self.required and not store:
            path = self.sources.bootstrap(store)
            log.warning(
                "the reloaded configuration has no API key: requests need the "
                "generated admin key in %s",
                path,
            )
        old, new = self.store.summary(), store.summary()
        self.store = store
        added = sorted(new.keys() - old.keys())
        removed = sorted(old.keys() - new.keys())
        changed = sorted(n for n in new.keys() & old.keys() if new[n] != old[n])
        log.info(
            "API keys reloaded: %d in use; added: %s; removed: %s; changed: %s",
            len(store),
            ", ".join(added) or "none",
            ", ".join(removed) or "none",
            ", ".join(changed) or "none",
        )


def keys_required(config: AccessConfig, binds: Iterable[str], store: KeyStore) -> bool:
    """Whether listeners on ``binds`` need keys under ``config.auth``."""
    if config.auth != "auto":
        return config.auth == "on"
    return bool(store) or not all(is_loopback(h) for h in binds)


def build(
    config: AccessConfig,
    *,
    binds: Iterable[str],
    names: Iterable[str] = (),
    env: Mapping[str, str] | None = None,
    state_dir: Path | None = None,
    what: str = "the appliance",
    key_file: str = BOOTSTRAP_FILE,
    certs: Iterable[ClientCertEntry] = (),
    create_command: str = "appliance keys create NAME",
) -> AccessPolicy:
    """Load the keys, decide whether they are required, generate one if none exists.

    Blocking (reads files): call it off the loop. Raises ConfigError for unreadable or
    malformed key files.
    """
    sources = KeySources(dict(os.environ if env is None else env), state_dir, key_file)
    binds = list(binds)
    store = sources.load(config, certs)
    required = keys_required(config, binds, store)
    lan = [h for h in binds if not is_loopback(h)]
    if required and not store:
        path = sources.bootstrap(store)
        log.warning(
            "no API key is configured and %s serves %s: requests need the generated admin "
            "key in %s (send it as a bearer token or in X-API-Key). Create your own with "
            "'%s' and delete that file (docs/security.md)",
            what,
            ", ".join(lan) or "with security.auth = on",
            path,
            create_command,
        )
    elif not required and lan:
        log.warning(
            "SECURITY: %s serves %s WITHOUT API keys (security.auth = off): anyone on the "
            "network can use every route. Configure keys (docs/security.md)",
            what,
            ", ".join(lan),
        )
    elif required:
        log.info(
            "API keys required (%d keys, %d client certificates configured)",
            len(store.keys),
            len(store.certs),
        )
    return AccessPolicy(config, store, required=required, names=names, sources=sources)


def client_certs(security: AccessConfig, http: HttpConfig | HubHttpConfig) -> list[ClientCertEntry]:
    """``security.client_certs``, checked against the listener: they need a client CA."""
    certs = security.client_certs
    if certs and http.tls_client_ca is None:
        raise ConfigError(
            "security.client_certs names client certificates, but "
            "http.tls_client_ca is not set, so no client sends one; set it "
            "(see docs/security.md) or remove them"
        )
    return list(certs)


def daemon_policy(config: Config, env: Mapping[str, str] | None = None) -> AccessPolicy:
    """The appliance's policy: its HTTP and (when on) gRPC listeners share it, so keys are
    required on both as soon as either serves the LAN."""
    binds = [config.http.host] + ([config.grpc.host] if config.grpc.enabled else [])
    names = own_names(config.device.id, config.security.allowed_hosts)
    return build(
        config.security,
        binds=binds,
        names=names,
        env=env,
        certs=client_certs(config.security, config.http),
    )


def reload_daemon_keys(policy: AccessPolicy, config: Config, running: Config) -> None:
    """The appliance's SIGHUP: keys and client certificates of the re-read ``config``; the
    listener (``running``) decides whether certificates can arrive. Blocking."""
    policy.reload_keys(config.security, client_certs(config.security, running.http))


def hub_policy(config: HubConfig, env: Mapping[str, str] | None = None) -> AccessPolicy:
    """The fleet hub's policy (device uploads authenticate with their own tokens)."""
    names = own_names("", config.security.allowed_hosts)
    return build(
        config.security,
        binds=[config.http.host],
        names=names,
        env=env,
        what="the hub",
        key_file="hub-api-key",
        certs=client_certs(config.security, config.http),
        create_command="appliance hub keys create NAME",
    )


def reload_hub_keys(policy: AccessPolicy, config: HubConfig, running: HubConfig) -> None:
    """The hub's SIGHUP: API keys and client certificates of the re-read ``config``; the
    listener (``running``) decides whether certificates can arrive. Blocking."""
    policy.reload_keys(config.security, client_certs(config.security, running.http))


__all__ = [
    "AccessPolicy",
    "KeySources",
    "build",
    "client_certs",
    "daemon_policy",
    "hub_policy",
    "keys_required",
    "reload_daemon_keys",
    "reload_hub_keys",
]
