"""The command line stays light: ``appliance --help`` loads no heavy library.

Start-up time itself is measured by the benchmarks; this checks the cause that matters,
that the modules behind the expensive imports are left alone until a command needs them.
"""

from __future__ import annotations

import json
import subprocess
import sys

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
