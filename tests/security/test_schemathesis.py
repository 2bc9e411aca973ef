"""Schemathesis against the served ``/openapi.json``: every operation, positive and negative
data, a bounded number of examples each. No 5xx, every response conforms to the
document (status documented, body matching its schema, headers present), and valid data is
accepted (positive data: no 400 but the few refusals listed in SEMANTIC_400).

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

# Positive data (valid by the document) must be accepted: a 400 is a failure unless it is
# one of these refusals no schema can express, which depend on the state of the box or on
# the model a case happens to name.
SEMANTIC_400 = {
    "is not ready": "a model this run unloaded (../ready answers 400, as Triton does)",
    "has no canary running": "promote or roll back a model that has no canary",
    "does not support embeddings": "embeddings of a model that only generates",
    "but the vocabulary has": "a logit_bias token id beyond the model's vocabulary",
    # A tool message answers an earlier assistant tool call: a rule between messages.
    "is required for a tool message": "a tool message without the call it answers",
    "matches no tool call of": "a tool message answering a call no assistant message made",
}


@pytest.mark.timeout(900)  # every operation, twice, against a real language model
def test_every_operation_conforms(default_models: Path, stories_gguf: Path, tmp_path: Path) -> None:
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis import GenerationMode, checks

    (tmp_path / "appliance.toml").write_text(keys_toml())
    headers = {"Authorization": f"Bearer {KEYS['admin']}"}
    args = (
        "--config",
        str(tmp_path / "appliance.toml"),
        "--models-dir",
        str(default_models),
        "--model",
        str(stories_gguf),
    )
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
                @settings(
                    max_examples=MAX_EXAMPLES,
                    deadline=None,
                    database=None,
                    derandomize=True,
                    phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=list(HealthCheck),
                )
                def check(case: schemathesis.Case) -> None:
                    case.headers = {**(case.headers or {}), **headers}
                    response = case.call(base_url=proc.url, timeout=30)
                    statuses.append(response.status_code)
                    try:
                        if mode is GenerationMode.POSITIVE and response.status_code == 400:  # noqa: B023
                            known = any(text in response.text for text in SEMANTIC_400)
                            # Binary tensor framing (a JSON header of a stated length, then
                            # raw bytes) is more than a schema of bytes or a header can say.
                            framed = (
                                "Inference-Header-Content-Length" in (case.headers or {})
                                or case.media_type == "application/octet-stream"
                            )
                            # A tensor's data must hold shape's product of elements of its
                            # datatype: JSON Schema cannot relate one field to another.
                            framed = framed or operation.path.endswith("/infer")  # noqa: B023
                            assert known or framed, (
                                f"valid data refused: {response.text[:300]} "
                                f"(body {str(case.body)[:300]})"
                            )
                        case.validate_response(
                            response,
                            checks=[
                                checks.not_a_server_error,
                                checks.status_code_conformance,
                                checks.content_type_conformance,
                                checks.response_schema_conformance,
                                checks.response_headers_conformance,
                            ],
                        )
                    except Exception as exc:  # collect, so one run lists every problem
                        failures.append(f"{label}: {exc}")  # noqa: B023 - run in this turn
                        raise

                with contextlib.suppress(Exception):  # recorded in failures above
                    check()
                tested += 1
        assert len(statuses) > 200 and max(statuses) < 500
        assert tested >= 40
        assert not failures, "\n\n".join(failures[:20])
