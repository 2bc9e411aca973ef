"""API keys over every route: the auth matrix, public routes, WebSocket and gRPC.

The route list comes from the application's own router, so a route added later is in the
matrix without anyone remembering to add it.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from appliance import config as config_mod
from appliance.core.metrics import Metrics
from appliance.core.models import ModelManager
from appliance.core.service import Core
from appliance.errors import ConfigError
from appliance.security import keys
from appliance.security.access import build
from appliance.transports.http import build_app, openapi
from appliance.transports.http.scopes import ROUTE_SCOPES, scope_of
from tests.conftest import base_url, make_config, serving
from tests.security.conftest import KEYS, bearer, secured_config

PARAMS = {"name": "sensor-anomaly", "model": "sensor-anomaly", "version": "1"}


def _routes() -> list[tuple[str, str]]:
    config = make_config()
    metrics = Metrics()
    app = build_app(Core(ModelManager([], config.models, metrics), metrics), config)
    return openapi.routes_of(app.router)


ROUTES = _routes()
PUBLIC = set(config_mod.SecurityConfig().public)
PROTECTED = [r for r in ROUTES if r[1] not in PUBLIC]


def _path(template: str) -> str:
    return template.format(**PARAMS)


def _wrong_scope(required: str) -> str:
    return "infer" if required in ("read", "admin") else "read"


async def _status(
    http: aiohttp.ClientSession,
    url: str,
    method: str,
    path: str,
    headers: dict[str, str],
    query: dict[str, str] | None = None,
) -> int:
    body = b"{}" if method == "POST" else None
    async with http.request(
        method,
        url + path,
        headers={"Content-Type": "application/json", **headers},
        params=query,
        data=body,
    ) as response:
        await response.read()
        if response.status == 401:
            assert response.headers["WWW-Authenticate"].startswith('Bearer realm="appliance"')
        return response.status


def test_every_route_has_a_scope() -> None:
    assert PROTECTED, "no protected routes found"
    for method, template in ROUTES:
        assert (method, template) in ROUTE_SCOPES, f"{method} {template} has no scope entry"
    # Unlisted routes fail closed.
    assert scope_of("POST", "/v2/repository/models/{name}/load") == "admin"
    assert scope_of("HEAD", "/v1/models") == "read"


async def test_auth_matrix_over_every_protected_route(default_models: Path) -> None:
    async with aiohttp.ClientSession() as http:
        # What each request gets without keys (loopback, auth off): the right key must get
        # exactly the same.
        baseline: dict[tuple[str, str], int] = {}
        async with serving(make_config(models={"dir": str(default_models)})) as open_server:
            url = base_url(open_server)
            for method, template in PROTECTED:
                baseline[(method, template)] = await _status(http, url, method, _path(template), {})
        async with serving(secured_config(default_models)) as server:
            url = base_url(server)
            basic = base64.b64encode(f"user:{KEYS['admin']}".encode()).decode()
            for method, template in PROTECTED:
                path, required = _path(template), scope_of(method, template)
                cases: dict[str, tuple[dict[str, str], dict[str, str] | None, int]] = {
                    "no key": ({}, None, 401),
                    "wrong key": ({"Authorization": "Bearer apk_wrong-" + "x" * 40}, None, 401),
                    "wrong X-API-Key": ({"X-API-Key": "apk_wrong-" + "x" * 40}, None, 401),
                    "wrong scheme": ({"Authorization": f"Basic {basic}"}, None, 401),
                    "raw key in Authorization": ({"Authorization": KEYS["admin"]}, None, 401),
                    "key in query": ({}, {"api_key": KEYS["admin"], "key": KEYS["admin"]}, 401),
                    "wrong scope": (bearer(_wrong_scope(required)), None, 403),
                    "right key": (bearer(required), None, baseline[(method, template)]),
                    "right key as X-API-Key": (
                        {"X-API-Key": KEYS[required]},
                        None,
                        baseline[(method, template)],
                    ),
                    "admin key": (bearer("admin"), None, baseline[(method, template)]),
                }
                for case, (headers, query, expected) in cases.items():
                    got = await _status(http, url, method, path, headers, query)
                    assert got == expected, f"{method} {template} [{case}]: {got} != {expected}"


async def test_public_routes_need_no_key_and_unknown_paths_need_one(
    secured: Any, http: aiohttp.ClientSession
) -> None:
    url = base_url(secured)
    for path in sorted(PUBLIC):
        async with http.get(url + path) as response:
            assert response.status == 200, path
    async with http.get(url + "/no/such/route") as response:
        assert response.status == 401  # route existence is not revealed without a key
    async with http.get(url + "/no/such/route", headers=bearer("read")) as response:
        assert response.status == 404
    # OpenAI routes answer in OpenAI's error shape, the rest in {"error": "..."}.
    async with http.get(url + "/v1/models") as response:
        body = await response.json()
        assert body["error"]["type"] == "authentication_error"
    async with http.get(url + "/v1/models", headers=bearer("infer")) as response:
        assert response.status == 403
        assert (await response.json())["error"]["type"] == "permission_error"
    async with http.get(url + "/v2") as response:
        assert isinstance((await response.json())["error"], str)


async def test_public_list_is_configurable(
    default_models: Path, http: aiohttp.ClientSession
) -> None:
    config = secured_config(default_models, security={"public": ["/v2/models/*"]})
    async with serving(config) as server:
        url = base_url(server)
        async with http.get(url + "/v2/models/sensor-anomaly") as response:
            assert response.status == 200
        async with http.get(url + "/health") as response:
            assert response.status == 401  # no longer in the list


async def test_websocket_needs_a_key_with_infer(secured: Any, http: aiohttp.ClientSession) -> None:
    url = base_url(secured)
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await http.ws_connect(url + "/ws")
    assert refused.value.status == 401
    with pytest.raises(aiohttp.WSServerHandshakeError) as forbidden:
        await http.ws_connect(url + "/ws", headers=bearer("read"))
    assert forbidden.value.status == 403
    async with http.ws_connect(url + "/ws", headers=bearer("infer")) as ws:
        await ws.send_json({"type": "ping", "id": 1})
        assert (await ws.receive_json())["type"] == "pong"


def test_grpc_applies_the_same_keys(default_models: Path, tmp_path: Path) -> None:
    """gRPC in a daemon subprocess (its stubs and tritonclient's register the same protocol
    names, so they cannot share this process), called with tritonclient's stubs."""
    grpc = pytest.importorskip("grpc")
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as rpc

    from tests.conftest import daemon
    from tests.hub.conftest import free_port
    from tests.security.conftest import keys_toml

    port = free_port()
    (tmp_path / "appliance.toml").write_text(keys_toml())
    env = {
        "APPLIANCE_SECURITY__AUTH": "on",
        "APPLIANCE_GRPC__ENABLED": "true",
        "APPLIANCE_GRPC__HOST": "127.0.0.1",
        "APPLIANCE_GRPC__PORT": str(port),
    }
    with (
        daemon(
            "--config",
            str(tmp_path / "appliance.toml"),
            "--models-dir",
            str(default_models),
            env=env,
            ready=False,
        ),
        grpc.insecure_channel(f"127.0.0.1:{port}") as channel,
    ):
        grpc.channel_ready_future(channel).result(timeout=30)
        stub = rpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(pb.ServerLiveRequest()).live  # public like /v2/health/live
        with pytest.raises(grpc.RpcError) as missing:
            stub.ServerMetadata(pb.ServerMetadataRequest())
        assert missing.value.code() is grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as wrong:
            stub.ServerMetadata(
                pb.ServerMetadataRequest(), metadata=(("authorization", "Bearer apk_nope"),)
            )
        assert wrong.value.code() is grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as scope:
            stub.ModelInfer(
                pb.ModelInferRequest(model_name="sensor-anomaly"),
                metadata=(("x-api-key", KEYS["read"]),),
            )
        assert scope.value.code() is grpc.StatusCode.PERMISSION_DENIED
        answer = stub.ServerMetadata(
            pb.ServerMetadataRequest(), metadata=(("authorization", f"Bearer {KEYS['read']}"),)
        )
        assert answer.name == "appliance"


# --------------------------------------------------------------- defaults and key store


def test_keys_are_off_on_loopback_and_on_for_the_lan(tmp_path: Path) -> None:
    loopback = build(config_mod.SecurityConfig(), binds=["127.0.0.1"], env={})
    assert not loopback.required
    lan = build(config_mod.SecurityConfig(), binds=["0.0.0.0"], env={}, state_dir=tmp_path)
    assert lan.required
    generated = tmp_path / "api-key"
    assert generated.stat().st_mode & 0o777 == 0o600
    key = generated.read_text().strip()
    assert lan.store.verify(key) is not None
    # A restart keeps the same key.
    again = build(config_mod.SecurityConfig(), binds=["0.0.0.0"], env={}, state_dir=tmp_path)
    assert again.store.verify(key) is not None
    # Configured keys on loopback turn them on there too; auth = off turns them off.
    with_keys = config_mod.SecurityConfig.model_validate(
        {"keys": [{"name": "a", "scopes": ["read"], "hash": keys.hash_key("k" * 30)}]}
    )
    assert build(with_keys, binds=["127.0.0.1"], env={}).required
    off = config_mod.SecurityConfig(auth="off")
    assert not build(off, binds=["0.0.0.0"], env={}).required


def test_key_file_and_credentials_directory(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    one, two = keys.new_key(), keys.new_key()
    (tmp_path / "keys").write_text(f"# comment\nha infer,read {keys.hash_key(one)}\n")
    (creds / "api-keys").write_text(f"ops admin {keys.hash_key(two)}\n")
    config = config_mod.SecurityConfig(keys_file=tmp_path / "keys")
    policy = build(config, binds=["127.0.0.1"], env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert policy.required
    found = policy.store.verify(one)
    assert found is not None and found.name == "ha" and found.allows("infer")
    assert not found.allows("admin")
    admin = policy.store.verify(two)
    assert admin is not None and admin.allows("read") and admin.allows("infer")
    (tmp_path / "keys").write_text(f"ha infer {one}\n")  # the key itself, not its hash
    with pytest.raises(ConfigError, match="not the key itself"):
        build(config, binds=["127.0.0.1"], env={})
    (tmp_path / "keys").write_text(f"ha root {keys.hash_key(one)}\n")
    with pytest.raises(ConfigError, match="allowed scopes"):
        build(config, binds=["127.0.0.1"], env={})


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"security\.allow.*CIDR"):
        config_mod.load(env={}, overrides={"security": {"allow": ["10.0.0.0/33"]}})
    with pytest.raises(ConfigError, match=r"security\.keys"):
        config_mod.load(
            env={},
            overrides={
                "security": {
                    "keys": [{"name": "x", "scopes": ["root"], "hash": "sha256:" + "0" * 64}]
                }
            },
        )
    with pytest.raises(ConfigError, match=r"http\.tls_min_version"):
        config_mod.load(env={}, overrides={"http": {"tls_min_version": "1.0"}})
    loaded = config_mod.load(env={"APPLIANCE_SECURITY__ALLOW": "10.0.0.0/8,fd00::/8"})
    assert loaded.security.allow == ["10.0.0.0/8", "fd00::/8"]
