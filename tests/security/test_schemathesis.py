"""Schemathesis against the served ``/openapi.json``: every operation, positive and negative
data, a bounded number of examples each. No 5xx, and every response conforms to the
document (status documented, body matching its schema, headers present).

The daemon requires keys, so every case carries the admin key; the auth matrix itself is
tests/security/test_auth.py.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from tests.conftest import daemon
from tests.security.conftest import KEYS, keys_toml

schemathesis = pytest.importorskip("schemathesis")

MAX_EXAMPLES = 20


def test_every_operation_conforms(default_models: Path, stories_gguf: Path,
                                  tmp_path: Path) -> None:
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis import GenerationMode, checks

    (tmp_path / "appliance.toml").write_text(keys_toml())
    headers = {"Authorization": f"Bearer {KEYS['admin']}"}
    args = ("--config", str(tmp_path / "appliance.toml"), "--models-dir", str(default_models),
            "--model", str(stories_gguf))
    with daemon(*args, env={"APPLIANCE_SECURITY__AUTH": "on"}, timeout=120) as proc:
        schema = schemathesis.openapi.from_url(proc.url + "/openapi.json", headers=headers)
        failures: list[str] = []
        tested = 0
        statuses: list[int] = []
        for result in schema.get_all_operations():
            operation = result.ok()
            if operation.path == "/ws":
                continue  # an upgrade, not a request/response operation: tests/transports/ws
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                strategy = operation.as_strategy(generation_mode=mode)
                label = f"{operation.method.upper()} {operation.path} [{mode.value}]"

                @given(case=strategy)
                @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                          derandomize=True, phases=[Phase.explicit, Phase.generate],
                          suppress_health_check=list(HealthCheck))
                def check(case: schemathesis.Case) -> None:
                    case.headers = {**(case.headers or {}), **headers}
                    response = case.call(base_url=proc.url, timeout=30)
                    statuses.append(response.status_code)
                    try:
                        case.validate_response(response, checks=[
                            checks.not_a_server_error, checks.status_code_conformance,
                            checks.content_type_conformance,
                            checks.response_schema_conformance,
                            checks.response_headers_conformance])
                    except Exception as exc:  # collect, so one run lists every problem
                        failures.append(f"{label}: {exc}")  # noqa: B023 - run in this turn
                        raise

                with contextlib.suppress(Exception):  # recorded in failures above
                    check()
                tested += 1
        assert len(statuses) > 200 and max(statuses) < 500
        assert tested >= 40
        assert not failures, "\n\n".join(failures[:20])
