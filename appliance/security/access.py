"""The access policy every transport applies, in one order: allow-list → Host → API key →
scope → rate limit. Each check raises the error its transport maps to a status
(403, 403, 401, 403, 429); nothing here reads a body.

Whether keys are needed is decided once, at start-up (:func:`build`): ``security.auth =
"auto"`` needs them unless every listening address is loopback and no key is configured.
A box that serves the LAN with no key configured generates an admin key into its state
directory and logs where, rather than serving the LAN open (docs/security.md).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.config import AccessConfig, Config
from appliance.errors import Forbidden, RateLimited, Unauthenticated
from appliance.security.hosts import (
    AllowList,
    HostGuard,
    client_address,
    is_loopback,
    own_names,
)
from appliance.security.keys import BOOTSTRAP_FILE, ApiKey, KeyStore, bootstrap_key, load_store

if TYPE_CHECKING:
    from appliance.hub.config import HubConfig
from appliance.security.ratelimit import RateLimiter

log = logging.getLogger(__name__)

class AccessPolicy:
    """What one server accepts. Build it with :func:`build`."""

    def __init__(self, config: AccessConfig, store: KeyStore, *, required: bool,
                 names: Iterable[str] = ()) -> None:
        self.config = config
        self.store = store
        self.required = required
        self.allow = AllowList(config.allow)
        self.hosts = HostGuard(names, config.allowed_hosts)
        self.per_client = RateLimiter(config.rate_per_client, config.burst_per_client)
        self.per_key = RateLimiter(config.rate_per_key, config.burst_per_key)
        self._exact = {p for p in config.public if not p.endswith("*")}
        self._prefixes = tuple(p[:-1] for p in config.public if p.endswith("*"))

    # -- the checks, in order ---------------------------------------------------------

    def check_network(self, peer: str | None, host: str | None, origin: str | None) -> None:
        """Allow-list, then the DNS-rebinding guard."""
        self.allow.check(peer)
        self.hosts.check(host, origin)

    def is_public(self, path: str) -> bool:
        return path in self._exact or path.startswith(self._prefixes)

    def authenticate(self, authorization: str | None, api_key: str | None) -> ApiKey | None:
        """The key the request carries; raises :class:`Unauthenticated` when keys are
        required and none valid came. Without required keys, credentials are ignored."""
        if not self.required:
            return None
        if authorization is not None:
            scheme, _, value = authorization.strip().partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                raise Unauthenticated("the Authorization header must be 'Bearer <API key>'")
            presented = value.strip()
        elif api_key is not None:
            presented = api_key.strip()
        else:
            raise Unauthenticated("an API key is required: send 'Authorization: Bearer <key>' "
                                  "or 'X-API-Key: <key>'")
        key = self.store.verify(presented)
        if key is None:
            raise Unauthenticated("the API key is not valid")
        return key

    @staticmethod
    def authorize(key: ApiKey | None, scope: str) -> None:
        """Raise :class:`Forbidden` if ``key`` lacks ``scope`` (None: keys are off)."""
        if key is not None and not key.allows(scope):
            raise Forbidden(f"API key {key.name!r} lacks the {scope!r} scope this needs "
                            f"(it has: {', '.join(sorted(key.scopes))})")

    def limit(self, peer: str | None, key: ApiKey | None) -> None:
        """Take a token from the client's and the key's bucket; :class:`RateLimited` if empty."""
        address = client_address(peer)
        wait = self.per_client.take(str(address) if address else (peer or "unknown"))
        if wait:
            raise RateLimited(f"too many requests from {peer}; retry later", wait)
        if key is not None:
            wait = self.per_key.take(key.name)
            if wait:
                raise RateLimited(f"too many requests with API key {key.name!r}; retry later",
                                  wait)


def keys_required(config: AccessConfig, binds: Iterable[str], store: KeyStore) -> bool:
    """Whether listeners on ``binds`` need keys under ``config.auth``."""
    if config.auth != "auto":
        return config.auth == "on"
    return bool(store) or not all(is_loopback(h) for h in binds)


def build(config: AccessConfig, *, binds: Iterable[str], names: Iterable[str] = (),
          env: Mapping[str, str] | None = None, state_dir: Path | None = None,
          what: str = "the appliance", key_file: str = BOOTSTRAP_FILE) -> AccessPolicy:
    """Load the keys, decide whether they are required, generate one if none exists.

    Blocking (reads files): call it off the loop. Raises ConfigError for unreadable or
    malformed key files.
    """
    env = os.environ if env is None else env
    binds = list(binds)
    store = load_store(config, env)
    required = keys_required(config, binds, store)
    lan = [h for h in binds if not is_loopback(h)]
    if required and not store:
        if state_dir is None:
            from appliance.ops.outbox import default_state_dir

            state_dir = default_state_dir(env, is_root=os.geteuid() == 0, home=Path.home())
        key, path = bootstrap_key(state_dir / key_file)
        store.add(key)
        log.warning(
            "no API key is configured and %s serves %s: requests need the generated admin "
            "key in %s (send it as a bearer token or in X-API-Key). Create your own with "
            "'appliance keys create NAME' and delete that file (docs/security.md)",
            what, ", ".join(lan) or "with security.auth = on", path)
    elif not required and lan:
        log.warning(
            "SECURITY: %s serves %s WITHOUT API keys (security.auth = off): anyone on the "
            "network can use every route. Configure keys (docs/security.md)",
            what, ", ".join(lan))
    elif required:
        log.info("API keys required (%d configured)", len(store))
    return AccessPolicy(config, store, required=required, names=names)


def daemon_policy(config: Config, env: Mapping[str, str] | None = None) -> AccessPolicy:
    """The appliance's policy: its HTTP and (when on) gRPC listeners share it, so keys are
    required on both as soon as either serves the LAN."""
    binds = [config.http.host] + ([config.grpc.host] if config.grpc.enabled else [])
    names = own_names(config.device.id, config.security.allowed_hosts)
    return build(config.security, binds=binds, names=names, env=env)


def hub_policy(config: HubConfig, env: Mapping[str, str] | None = None) -> AccessPolicy:
    """The fleet hub's policy (device uploads authenticate with their own tokens)."""
    names = own_names("", config.security.allowed_hosts)
    return build(config.security, binds=[config.http.host], names=names, env=env,
                 what="the hub", key_file="hub-api-key")


__all__ = ["AccessPolicy", "build", "daemon_policy", "hub_policy", "keys_required"]
