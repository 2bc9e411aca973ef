"""Hostile models and model paths: a GGUF whose chat template tries to break out of the
Jinja sandbox runs no code, and no request can make the daemon load a file of its choosing.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import base_url, make_config, serving
from tests.gguf_templates import with_chat_template
from tests.security.conftest import bearer, secured_config

pytest.importorskip("gguf", reason="the gguf package builds the hostile model")

# Classic sandbox escapes: reach os/subprocess through object internals or globals and
# write a marker file. A template that got out would create it.
ESCAPES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('touch MARKER').read() }}",
    "{{ self._TemplateReference__context.joiner.__init__.__globals__.os.system('touch MARKER') }}",
    "{{ lipsum.__globals__['os'].popen('touch MARKER').read() }}",
    "{% for c in [].__class__.__base__.__subclasses__() %}{% if c.__name__ == 'Popen' %}"
    "{{ c(['touch', 'MARKER']) }}{% endif %}{% endfor %}",
    "{{ namespace.__init__.__globals__['__builtins__']['open']('MARKER', 'w') }}",
    "{{ messages.__class__.__init__.__globals__ }}",
    "{% set x = messages.pop() %}{{ range(10**9) | list }}",
]


async def test_hostile_chat_templates_run_no_code(
    stories_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, http: aiohttp.ClientSession
) -> None:
    monkeypatch.chdir(tmp_path)  # where a relative 'touch MARKER' would land
    files = []
    for i, template in enumerate(ESCAPES):
        text = template.replace("MARKER", str(tmp_path / "MARKER"))
        files.append(with_chat_template(stories_gguf, tmp_path / f"hostile{i}.gguf", text))
    config = make_config(models={"files": [str(f) for f in files]})
    async with serving(config) as server:
        url = base_url(server)
        for i in range(len(ESCAPES)):
            body = {
                "model": f"hostile{i}",
                "max_tokens": 4,
                "messages": [{"role": "user", "content": "hi"}],
            }
            async with http.post(url + "/v1/chat/completions", json=body) as response:
                answer = await response.json()
            # Served safely: the sandbox refused (400 naming the template) or rendered
            # harmless text; never a 5xx, never code run.
            assert response.status in (200, 400), (i, answer)
            if response.status == 400:
                assert "chat template" in answer["error"]["message"]
            # The model itself is either serving or reported failed; the daemon lives on.
            async with http.get(url + "/health") as health:
                state = (await health.json())["models"][f"hostile{i}"]["state"]
                assert state in ("ready", "failed")
    left = await asyncio.to_thread(lambda: sorted(p.name for p in tmp_path.iterdir()))
    assert left == sorted(f.name for f in files)  # no MARKER, nothing else written


async def test_no_request_loads_a_model_from_a_path(
    default_models: Path, stories_gguf: Path, http: aiohttp.ClientSession
) -> None:
    """Model names from clients are looked up among configured models only: a path, a
    relative escape or a URL gets 404 and nothing is opened."""
    async with serving(secured_config(default_models)) as server:
        url = base_url(server)
        before = {m["id"] for m in await _models(http, url)}
        for name in (
            str(stories_gguf),
            "../../../../etc/passwd",
            "file:///etc/passwd",
            str(stories_gguf.with_suffix("")),
            "stories260K",
        ):
            for path, body in (
                (
                    "/v1/chat/completions",
                    {"model": name, "messages": [{"role": "user", "content": "x"}]},
                ),
                ("/v1/completions", {"model": name, "prompt": "x"}),
                ("/api/generate", {"model": name, "prompt": "x", "stream": False}),
                ("/api/show", {"model": name}),
            ):
                async with http.post(
                    url + path, data=json.dumps(body), headers=bearer("admin")
                ) as response:
                    assert response.status in (400, 404), (path, name, response.status)
            quoted = name.replace("/", "%2F")
            async with http.get(f"{url}/v2/models/{quoted}", headers=bearer("admin")) as r:
                assert r.status == 404
        assert {m["id"] for m in await _models(http, url)} == before


async def _models(http: aiohttp.ClientSession, url: str) -> list[dict[str, str]]:
    async with http.get(url + "/v1/models", headers=bearer("read")) as response:
        data: list[dict[str, str]] = (await response.json())["data"]
        return data
