"""The shipped systemd units: systemd's own checks, the directives the daemon relies on, and
``appliance service install|uninstall`` on an offline root file system."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.ops import service_cli
from tests.conftest import ROOT

UNITS = ROOT / "systemd"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed (scripts/setup test installs it)"
)
SERVICES = [service_cli.APPLIANCE, service_cli.HUB]


def rendered(service: service_cli.Service, tmp_path: Path) -> Path:
    """The unit as `service install` writes it, naming this checkout's executable."""
    executable = Path(sys.prefix) / "bin" / "appliance"
    assert executable.is_file()
    path = tmp_path / service.unit
    path.write_text(service_cli.unit_text(service, str(executable)))
    return path


def directives(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


@needs_analyze
@pytest.mark.parametrize("service", SERVICES, ids=lambda s: s.unit)
def test_unit_passes_systemd_analyze_verify(service: service_cli.Service, tmp_path: Path) -> None:
    assert ANALYZE is not None
    result = subprocess.run(
        [ANALYZE, "verify", str(rendered(service, tmp_path))],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr  # not even a warning


@needs_analyze
@pytest.mark.parametrize("service", SERVICES, ids=lambda s: s.unit)
def test_unit_hardening_scores_at_most_2_5(service: service_cli.Service, tmp_path: Path) -> None:
    assert ANALYZE is not None
    result = subprocess.run(
        [
            ANALYZE,
            "security",
            "--offline=yes",
            "--threshold=25",
            "--no-pager",
            str(rendered(service, tmp_path)),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Overall exposure level" in result.stdout


@pytest.mark.parametrize("service", SERVICES, ids=lambda s: s.unit)
def test_unit_has_the_directives_the_daemon_relies_on(service: service_cli.Service) -> None:
    found = directives(UNITS / service.unit)
    assert found["Type"] == ["notify"]
    assert found["NotifyAccess"] == ["main"]
    assert found["Restart"] == ["on-failure"]
    assert found["WatchdogSec"] and found["StateDirectory"] and found["ConfigurationDirectory"]
    assert found["LoadCredential"]
    assert found["User"] == [service.user]
    assert found["StateDirectory"] == [Path(service.state_dir).name]
    assert found["ConfigurationDirectory"] == [Path(service.config_dir).name]
    exec_start = found["ExecStart"][0].split()
    assert exec_start[0] == service_cli.IMAGE_EXECUTABLE
    assert f"%E/{Path(service.config_dir).name}/{service.config_file}" in exec_start
    # Credentials are looked up by name in /etc/credstore, so a missing one is no error.
    assert all(":" not in c for c in found["LoadCredential"])
    # The directive left out on purpose is documented where it is left out.
    if service is service_cli.APPLIANCE:
        assert "MemoryDenyWriteExecute" not in found
        assert "MemoryDenyWriteExecute: llama-cpp-python" in (UNITS / service.unit).read_text()
        assert found["ExecReload"] == ["/bin/kill -HUP $MAINPID"]


def test_units_parse_as_ini() -> None:
    for service in SERVICES:
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        parser.read_string((UNITS / service.unit).read_text())
        assert parser.sections() == ["Unit", "Service", "Install"]
        assert parser["Install"]["WantedBy"] == "multi-user.target"


def offline_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (root / "etc/group").write_text("root:x:0:\n")
    (root / "etc/shadow").write_text("root:*:19000:0:99999:7:::\n")
    (root / "etc/gshadow").write_text("root:*::\n")
    return root


@pytest.mark.skipif(
    shutil.which("useradd") is None or shutil.which("systemctl") is None,
    reason="needs useradd and systemctl",
)
@pytest.mark.parametrize("service", SERVICES, ids=lambda s: s.unit)
def test_install_and_uninstall_on_an_offline_root(
    service: service_cli.Service, tmp_path: Path
) -> None:
    root = offline_root(tmp_path)
    argv = ["service", "install", "--root", str(root), "--no-start"]
    if service is service_cli.HUB:
        argv.append("--hub")
    result = subprocess.run(
        [sys.executable, "-m", "appliance", *argv],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    unit = root / "etc/systemd/system" / service.unit
    assert unit.read_text() == (UNITS / service.unit).read_text()  # the image path as shipped
    wants = root / "etc/systemd/system/multi-user.target.wants" / service.unit
    assert wants.is_symlink()
    assert f"\n{service.user}:x:" in (root / "etc/passwd").read_text()
    config = root / service.config_dir.lstrip("/") / service.config_file
    assert config.stat().st_mode & 0o777 == 0o640
    assert (root / "etc/credstore").stat().st_mode & 0o777 == 0o700
    # Installing again changes nothing and keeps an edited configuration.
    config.write_text("# mine\n")
    again = subprocess.run(
        [sys.executable, "-m", "appliance", *argv],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert again.returncode == 0, again.stderr
    assert config.read_text() == "# mine\n"

    argv[1] = "uninstall"
    argv.remove("--no-start")
    argv.append("--purge")
    gone = subprocess.run(
        [sys.executable, "-m", "appliance", *argv],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert gone.returncode == 0, gone.stderr
    assert not unit.exists() and not wants.exists() and not config.exists()
    assert f"\n{service.user}:x:" not in (root / "etc/passwd").read_text()


def test_install_refuses_a_path_the_hardened_unit_cannot_see(tmp_path: Path) -> None:
    executable = "/root/venv/bin/appliance"
    with pytest.raises(service_cli.ServiceError, match="ProtectHome"):
        service_cli.check_visible(executable)
    service_cli.check_visible("/opt/appliance/bin/appliance")


def test_the_wheel_ships_the_units() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    assert '"systemd" = "appliance/ops/units"' in text


@pytest.mark.parametrize("service", SERVICES, ids=lambda s: s.unit)
def test_starter_configuration_is_valid(service: service_cli.Service, tmp_path: Path) -> None:
    config = tmp_path / service.config_file
    config.write_text(service.starter)
    command = ["hub", "config"] if service is service_cli.HUB else ["config"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    result = subprocess.run(
        [sys.executable, "-m", "appliance", *command, "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        env=env,
    )
    assert result.returncode == 0, result.stderr
