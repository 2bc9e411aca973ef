"""The command line stays light: ``appliance --help`` loads no heavy library, and neither
the server module nor the idle daemon loads what only some configurations or requests need.

Start-up time and idle memory themselves are measured by the benchmarks
(``benchmarks/start.py``, ``benchmarks/idle_rss.py``); this checks the cause that matters,
that the modules behind the expensive imports are left alone until something needs them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

HEAVY = (
    "numpy",
    "pydantic",
    "onnxruntime",
    "llama_cpp",
    "aiohttp",
    "prometheus_client",
    "grpc",
    "cryptography",
    "zeroconf",
    "aiomqtt",
    "psutil",
)


def _loaded_after(argv: list[str]) -> set[str]:
    script = (
        "import json, sys\n"
        "from appliance import cli\n"
        "try:\n"
        f"    cli.main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(json.dumps(sorted(m.split('.')[0] for m in sys.modules)), file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    return set(json.loads(done.stderr.strip().splitlines()[-1]))


def test_help_loads_no_heavy_library() -> None:
    loaded = _loaded_after(["--help"])
    assert loaded.isdisjoint(HEAVY), sorted(loaded & set(HEAVY))


def test_the_check_is_able_to_see_a_heavy_import() -> None:
    # `config` needs the pydantic models: the same probe must notice them.
    assert "pydantic" in _loaded_after(["config", "--reference"])


# What the daemon on its defaults (with MQTT and mDNS off, as tests run it) never needs
# until a configuration or a request asks: other transports and ops units, the hub, the
# backup and model tools, the Redis cache, TLS and field encryption.
NOT_WHEN_IDLE = (
    "grpc",
    "redis",
    "cryptography",
    "zeroconf",
    "aiomqtt",
    "paho",
    "appliance.transports.grpc",
    "appliance.transports.mqtt",
    "appliance.ops.discovery",
    "appliance.ops.hubsync",
    "appliance.ops.updater",
    "appliance.hub.app",
    "appliance.hub.server",
    "appliance.hub.storage",
    "appliance.hub.rollout.service",
    "appliance.backup.archive",
    "appliance.backup.device",
    "appliance.tools.quantize",
)

_IDLE_PROBE = """
import json, os, signal, sys, threading, time, urllib.request
from appliance import cli
port, out = sys.argv[1], sys.argv[2]

def probe():
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.1)
    time.sleep(0.5)  # idle: the units are running
    with open(out, "w") as f:
        json.dump(sorted(sys.modules), f)
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=probe, daemon=True).start()
sys.exit(cli.main(["run", "--host", "127.0.0.1", "--port", port]))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _loaded_by(module: str) -> set[str]:
    script = f"import json, sys\nimport {module}\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def _loaded_when_idle(tmp: Path) -> set[str]:
    """Every module in an idle ``appliance run`` on the default models (MQTT, mDNS off)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env.update(
        {
            "APPLIANCE_MDNS__ENABLED": "false",
            "APPLIANCE_MQTT__ENABLED": "false",
            "STATE_DIRECTORY": str(tmp / "state"),
        }
    )
    out = tmp / "modules.json"
    subprocess.run(
        [sys.executable, "-c", _IDLE_PROBE, str(_free_port()), str(out)],
        capture_output=True,
        timeout=180,
        check=True,
        env=env,
        cwd=ROOT,
    )
    return set(json.loads(out.read_text()))


def _found(loaded: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(n for n in names if any(m == n or m.startswith(n + ".") for m in loaded))


def test_server_module_loads_no_runtime_or_optional_library() -> None:
    loaded = _loaded_by("appliance.server")
    heavy = ("onnxruntime", "llama_cpp", "jinja2", "psutil", *NOT_WHEN_IDLE)
    assert not _found(loaded, heavy), _found(loaded, heavy)
    assert "aiohttp" in loaded  # the probe sees what the module does import


def test_idle_daemon_loads_only_what_its_configuration_uses(tmp_path: Path) -> None:
    loaded = _loaded_when_idle(tmp_path)
    assert not _found(loaded, NOT_WHEN_IDLE), _found(loaded, NOT_WHEN_IDLE)
    # The default models did load, with their libraries: the probe looked at a daemon
    # that serves, not one that stopped early.
    assert {"onnxruntime", "llama_cpp", "appliance.ops.health"} <= loaded
