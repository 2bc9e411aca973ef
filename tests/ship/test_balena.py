"""The balena fleet app (balena/): YAML structure, the compose schema, balena's own limits,
and that every path and variable the files name exists.

Docker and the balena builders are not available here, so nothing is built or run in a
container; docs/deploy.md says so. ``compose_spec.json`` is the Compose Specification JSON
schema (Apache-2.0) as shipped in docker-compose 1.29.2 (``compose/config/compose_spec.json``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from appliance import config as config_mod
from appliance.errors import ConfigError
from tests.conftest import ROOT

BALENA = ROOT / "balena"
SCHEMA = Path(__file__).with_name("compose_spec.json")
# Labels the balena supervisor understands; anything else would be a typo doing nothing.
BALENA_LABELS = re.compile(
    r"^io\.balena\.(features\.(balena-socket|dbus|sysfs|procfs|kernel-modules|firmware|"
    r"journal-logs|supervisor-api|balena-api|optee|gpu)|update\.(strategy|handover-timeout)|"
    r"update\.requires-reboot)$"
)
UPDATE_STRATEGIES = {
    "download-then-kill",
    "kill-then-download",
    "delete-then-download",
    "hand-over",
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((BALENA / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def test_compose_file_matches_the_compose_schema(compose: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft201909Validator(schema)
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert errors == []
    # The schema does catch mistakes: a misspelt key fails.
    broken = json.loads(json.dumps(compose))
    broken["services"]["appliance"]["helthcheck"] = {}
    assert list(validator.iter_errors(broken))


def test_compose_stays_inside_what_balena_supports(compose: dict[str, Any]) -> None:
    assert compose["version"].startswith("2.")  # balena: compose file format 2.x, no 3.x
    assert set(compose["services"]) == {"appliance", "mosquitto"}
    declared = set(compose.get("volumes", {}))
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            # Only named volumes: balena refuses bind mounts of host paths.
            assert source in declared, f"{name}: {volume} is not a named volume"
        assert service.get("network_mode", "bridge") in {"bridge", "host", "none"}
        assert isinstance(service.get("depends_on", []), list)  # array form only
        for label, value in service.get("labels", {}).items():
            assert BALENA_LABELS.match(label), f"{name}: unknown label {label}"
            if label == "io.balena.update.strategy":
                assert value in UPDATE_STRATEGIES
        check = service["healthcheck"]["test"]
        assert check[0] == "CMD" and len(check) > 1
        build = service.get("build")
        if build is not None:
            context = BALENA / build["context"]
            assert context.resolve().is_relative_to(BALENA)  # balena: project subfolders only
            assert (context / build["dockerfile"]).is_file()
        else:
            assert ":" in service["image"]  # a pinned tag, never "latest" by omission
    # Every declared volume is used by some service.
    used = {v.split(":", 1)[0] for s in compose["services"].values() for v in s.get("volumes", [])}
    assert used == declared


def test_appliance_health_check_is_valid_python(compose: dict[str, Any]) -> None:
    check = compose["services"]["appliance"]["healthcheck"]["test"]
    assert check[1:3] == ["/opt/appliance/bin/python", "-c"]
    compile(check[3], "healthcheck", "exec")
    assert "/health" in check[3]


def test_every_appliance_variable_is_a_real_setting(compose: dict[str, Any]) -> None:
    names: dict[str, str] = dict(compose["services"]["appliance"]["environment"])
    meta = yaml.safe_load((BALENA / "balena.yml").read_text())
    for item in meta["data"]["applicationEnvironmentVariables"]:
        names.update({k: str(v) for k, v in item.items()})
    names.update(
        {v: "x" for v in re.findall(r"APPLIANCE_[A-Z_]+", (BALENA / "entrypoint.sh").read_text())}
    )
    for name, value in names.items():
        if not name.startswith("APPLIANCE_"):
            continue
        section, _, key = name.removeprefix("APPLIANCE_").lower().partition("__")
        field = config_mod.Config.model_fields.get(section)
        assert field is not None, f"{name}: no [{section}] section"
        section_model = field.annotation
        assert section_model is not None and key in section_model.model_fields, (
            f"{name}: no key {key!r} in [{section}]"
        )
        if value != "x":
            try:
                config_mod.load(env={name: value, "APPLIANCE_MDNS__ENABLED": "false"})
            except ConfigError as exc:
                pytest.fail(f"{name}={value!r}: {exc}")


def test_balena_yml(compose: dict[str, Any]) -> None:
    meta = yaml.safe_load((BALENA / "balena.yml").read_text())
    assert meta["type"] == "sw.application"
    assert meta["name"] and meta["description"] and meta["version"]
    assert meta["data"]["defaultDeviceType"] in meta["data"]["supportedDeviceTypes"]


def test_dockerfile_template_builds_from_paths_that_exist(tmp_path: Path) -> None:
    text = (BALENA / "Dockerfile.template").read_text()
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    base = "balenalib/%%BALENA_ARCH%%-debian-python:3.11-"
    assert froms and all(f.startswith(base) for f in froms)
    assert "%%BALENA_ARCH%%" in text
    # The documented way to fill dist/: build the wheel into a copy of the folder.
    context = tmp_path / "balena"
    shutil.copytree(BALENA, context, ignore=shutil.ignore_patterns("dist"))
    command = re.search(r"#\s+(python -m pip wheel .*)", text)
    assert command is not None
    assert command.group(1) == "python -m pip wheel --no-deps --wheel-dir balena/dist ."
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--wheel-dir",
            str(context / "dist"),
            str(ROOT),
        ],
        check=True,
        timeout=300,
    )
    for source in re.findall(r"^COPY (?!--from)(\S+)", text, re.M):
        assert (context / source).exists(), f"COPY {source}: not in the build context"
    assert len(list((context / "dist").glob("appliance-*.whl"))) == 1
    # .dockerignore keeps exactly what the Dockerfile copies.
    ignore = (BALENA / ".dockerignore").read_text().split()
    assert ignore[0] == "*" and {"!dist/*.whl", "!entrypoint.sh"} <= set(ignore)
    assert os.access(BALENA / "entrypoint.sh", os.X_OK)


def test_entrypoint_maps_balena_variables(tmp_path: Path) -> None:
    models = tmp_path / "models"
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "BALENA_DEVICE_UUID": "0123456789ABCDEF0123456789abcdef",
        "BALENA_DEVICE_NAME_AT_INIT": "Greenhouse 3",
        "APPLIANCE_MODELS__DIR": str(models),
        "STATE_DIRECTORY": str(tmp_path / "state"),
    }
    result = subprocess.run(
        ["sh", str(BALENA / "entrypoint.sh"), "env"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    seen = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    assert seen["APPLIANCE_DEVICE__ID"] == "0123456789abcdef0123456789abcdef"
    assert seen["APPLIANCE_DEVICE__NAME"] == "Greenhouse 3"
    assert (models / "sensor-anomaly" / "manifest.toml").is_file()  # seeded on first start
    assert (tmp_path / "state").is_dir()
    config = config_mod.load(env={k: v for k, v in seen.items() if k.startswith("APPLIANCE_")})
    assert config.device.id == "0123456789abcdef0123456789abcdef"
    # A variable the fleet sets itself wins.
    env["APPLIANCE_DEVICE__ID"] = "greenhouse-3"
    result = subprocess.run(
        ["sh", str(BALENA / "entrypoint.sh"), "env"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "APPLIANCE_DEVICE__ID=greenhouse-3" in result.stdout.splitlines()
