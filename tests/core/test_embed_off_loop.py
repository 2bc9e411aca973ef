"""The embedding length check tokenises up to MAX_EMBED_INPUTS texts: on a worker thread.

Token counting is a native call the loop guard cannot see (no blocking call of the
standard library is made), so this test watches the thread it runs on instead: the real
stories260K runtime's ``count_tokens``, wrapped to note its thread.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from appliance.core.execution import MAX_EMBED_INPUTS
from appliance.errors import RequestError
from tests.conftest import make_config, serving


async def test_embedding_inputs_are_counted_off_the_event_loop(
    stories_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serving(make_config(models={"files": [str(stories_gguf)]})) as server:
        assert server.core is not None
        runtime = server.core.models.get("stories260K").runtime
        assert runtime is not None and runtime.context_length is not None
        counted_on: list[threading.Thread] = []
        count_tokens = runtime.count_tokens

        def noting_thread(text: str) -> int:
            counted_on.append(threading.current_thread())
            return count_tokens(text)

        monkeypatch.setattr(runtime, "count_tokens", noting_thread)
        loop_thread = threading.current_thread()

        texts = ["a cat sat on the mat"] * 64  # a batch; up to MAX_EMBED_INPUTS may come
        assert len(texts) <= MAX_EMBED_INPUTS
        result = await server.core.embed("stories260K", texts)
        assert len(result.vectors) == len(texts)
        assert len(counted_on) == len(texts)
        assert loop_thread not in counted_on

        # The check still refuses a text longer than the context, from its thread.
        counted_on.clear()
        too_long = "word " * (runtime.context_length * 2)
        with pytest.raises(RequestError, match=r"input\[1\] is \d+ tokens"):
            await server.core.embed("stories260K", ["short", too_long])
        assert counted_on and loop_thread not in counted_on
