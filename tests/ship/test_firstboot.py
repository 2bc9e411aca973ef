"""The image's first-boot script with a bad boot-partition appliance.toml, and the daemon
that starts after it: on its defaults, with the rejected key in its log and in /health.

The script (firmware_images/overlay/usr/local/lib/appliance/firstboot.py) runs here as a
real process against a boot directory in tmp_path, validating with this checkout's
``appliance`` command; the daemon is a real ``appliance run --config-error``. The image
boot test checks the same inside the image.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.conftest import ROOT, daemon

FIRSTBOOT = ROOT / "firmware_images/overlay/usr/local/lib/appliance/firstboot.py"
BAD = '[device]\nid = "bad-config"\nnmae = "typo"\n\n[http]\nport = "eighty"\n'


def run_apply_config(
    tmp_path: Path, text: str
) -> tuple[subprocess.CompletedProcess[str], Path, Path]:
    boot = tmp_path / "boot"
    boot.mkdir()
    (boot / "appliance.toml").write_text(text)
    error, hdmi = tmp_path / "run" / "config-error", tmp_path / "tty1"
    hdmi.touch()
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env.update(
        APPLIANCE_BOOT_DIR=str(boot),
        APPLIANCE_CONFIG_ERROR=str(error),
        APPLIANCE_FIRSTBOOT_HDMI=str(hdmi),
        APPLIANCE_BIN=str(Path(sys.executable).with_name("appliance")),
    )
    # Only the configuration step: the others grow partitions and write /etc.
    code = "import runpy, sys; m = runpy.run_path(sys.argv[1]); m['apply_config']()"
    result = subprocess.run(
        [sys.executable, "-c", code, str(FIRSTBOOT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return result, error, hdmi


def test_a_rejected_boot_config_names_the_key_and_the_daemon_runs_on_defaults(
    tmp_path: Path,
) -> None:
    result, error, hdmi = run_apply_config(tmp_path, BAD)
    assert result.returncode == 0, result.stderr
    console = result.stdout
    assert "appliance.toml rejected, the appliance starts on the defaults" in console
    assert "device.nmae = 'typo'" in console and "unknown key" in console
    assert "http.port = 'eighty'" in console
    assert "device.nmae" in hdmi.read_text()  # the HDMI screen says it too
    problem = error.read_text()
    assert "device.nmae" in problem and "http.port" in problem

    with (
        daemon("--config-error", str(error)) as proc,
        urllib.request.urlopen(proc.url + "/health", timeout=10) as resp,
    ):
        health = json.loads(resp.read())
    assert health["device"]["id"] != "bad-config"  # the defaults, not the rejected file
    assert health["models"]["sensor-anomaly"]["state"] == "ready"
    assert "device.nmae" in health["units"]["config"]["error"]
    logged = [line for line in proc.log if "configuration problem" in line]
    assert logged and "ERROR" in logged[0] and "device.nmae" in logged[0], proc.log[-20:]


def test_without_the_error_file_health_has_no_config_unit(tmp_path: Path) -> None:
    with (
        daemon("--config-error", str(tmp_path / "absent")) as proc,
        urllib.request.urlopen(proc.url + "/health", timeout=10) as resp,
    ):
        health = json.loads(resp.read())
    assert "config" not in health["units"]
    assert not [line for line in proc.log if "configuration problem" in line]
