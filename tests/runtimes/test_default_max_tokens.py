"""A request without ``max_tokens`` generates the model's default (the ``max_tokens`` model
option), not the whole context: through the real OpenAI and Ollama clients against a real
daemon serving the TinyStories GGUF model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import daemon

pytestmark = pytest.mark.timeout(180)


def _repo(tmp_path: Path, stories_gguf: Path, options: str) -> Path:
    model = tmp_path / "models" / "stories"
    model.mkdir(parents=True)
    shutil.copyfile(stories_gguf, model / "stories.gguf")
    (model / "manifest.toml").write_text(
        'name = "stories"\nruntime = "gguf"\nfile = "stories.gguf"\nversion = "1"\n'
        f"[options]\nn_ctx = 256\n{options}",
        encoding="utf-8",
    )
    return model.parent


def test_no_max_tokens_means_the_models_default(tmp_path: Path, stories_gguf: Path) -> None:
    import ollama
    from openai import OpenAI

    repo = _repo(tmp_path, stories_gguf, "max_tokens = 7\n")
    with (
        daemon("--models-dir", str(repo)) as box,
        OpenAI(base_url=box.url + "/v1", api_key="-") as client,
    ):
        # Chat completions have no max_tokens default of their own: the model's applies.
        chat = client.chat.completions.create(
            model="stories", temperature=0, messages=[{"role": "user", "content": "hi"}]
        )
        assert chat.usage is not None and chat.usage.completion_tokens == 7
        assert chat.choices[0].finish_reason == "length"
        asked = client.chat.completions.create(
            model="stories",
            temperature=0,
            max_tokens=20,
            messages=[{"role": "user", "content": "hi"}],
        )
        assert asked.usage is not None and asked.usage.completion_tokens > 7  # its own wins
        with ollama.Client(host=box.url) as olla:
            answer = olla.generate(model="stories", prompt="Once upon")
        assert answer.eval_count == 7 and answer.done_reason == "length"


def test_zero_means_the_whole_context(tmp_path: Path, stories_gguf: Path) -> None:
    from openai import OpenAI

    repo = _repo(tmp_path, stories_gguf, "max_tokens = 0\n")
    with (
        daemon("--models-dir", str(repo)) as box,
        OpenAI(base_url=box.url + "/v1", api_key="-") as client,
    ):
        chat = client.chat.completions.create(
            model="stories", temperature=0, messages=[{"role": "user", "content": "hi"}]
        )
    assert chat.usage is not None
    # Ends at the context (256 tokens a slot) or at the model's end of text, never at 512.
    assert chat.usage.prompt_tokens + chat.usage.completion_tokens <= 256
    assert chat.usage.completion_tokens > 7
