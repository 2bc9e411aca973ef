"""The committed gRPC stubs are exactly what grpcio-tools generates from the .proto.

They are generated once and committed (the daemon needs no compiler); this test regenerates
them into a temporary directory with the pinned grpcio-tools and compares, so an edit to
``grpc_service.proto`` without regenerating fails here. It runs protoc in a subprocess: the
stubs are never imported into this process (see ``test_grpc.py``).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from appliance import config
from appliance.errors import ConfigError
from tests.conftest import ROOT

PACKAGE = Path("appliance/transports/grpc")
PROTO = PACKAGE / "grpc_service.proto"
GENERATED = ["grpc_service_pb2.py", "grpc_service_pb2.pyi", "grpc_service_pb2_grpc.py"]
REGENERATE = (
    f"python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. {PROTO}"
)


def test_generated_stubs_match_the_proto(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools is not installed")
    (tmp_path / PACKAGE).mkdir(parents=True)
    shutil.copy(ROOT / PROTO, tmp_path / PROTO)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            ".",
            "--python_out=.",
            "--pyi_out=.",
            "--grpc_python_out=.",
            str(PROTO),
        ],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        timeout=60,
    )
    for name in GENERATED:
        fresh = (tmp_path / PACKAGE / name).read_text(encoding="utf-8")
        committed = (ROOT / PACKAGE / name).read_text(encoding="utf-8")
        assert committed == fresh, f"{PACKAGE / name} is stale: run `{REGENERATE}`"


def test_the_proto_keeps_the_protocol_names() -> None:
    # Clients call /inference.GRPCInferenceService/<Method>: the package and service names
    # are the wire protocol, not a style choice.
    text = (ROOT / PROTO).read_text(encoding="utf-8")
    assert "package inference;" in text
    assert "service GRPCInferenceService {" in text


def test_enabling_grpc_without_grpcio_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec

    def find_spec(name: str, *args: object) -> object:
        return None if name == "grpc" else real(name, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ConfigError) as caught:
        config.load(env={"APPLIANCE_GRPC__ENABLED": "true"})
    assert "grpc.enabled" in str(caught.value)
    assert "pip install 'appliance[grpc]'" in str(caught.value)
    assert config.load(env={}).grpc.enabled is False
