"""The official ``openai`` client against the emulated vLLM and SGLang: chat and completions, streamed and not."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

openai = pytest.importorskip("openai")

from sim.emulator import EmulatorConfig, running_in_thread  # noqa: E402
from tests.loopback import free_port  # noqa: E402

MODEL = "llama-3.1-8b"


@pytest.fixture(scope="module", params=["vllm", "sglang"])
def client(request: pytest.FixtureRequest) -> Iterator[openai.OpenAI]:
    config = EmulatorConfig(protocol=request.param, model=MODEL, port=free_port(), time_scale=10.0)
    with running_in_thread(config) as srv:
        c = openai.OpenAI(
            base_url=f"http://127.0.0.1:{srv.ports[0]}/v1",
            api_key="none",
            timeout=10.0,
            max_retries=0,
        )
        yield c
        c.close()


def test_completion(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt="one two three four", max_tokens=5)
    assert r.choices[0].finish_reason == "length"
    assert len(r.choices[0].text.split()) == 5
    assert r.usage.prompt_tokens == 4 and r.usage.completion_tokens == 5


def test_completion_streamed(client: openai.OpenAI) -> None:
    stream = client.completions.create(
        model=MODEL,
        prompt="one two three",
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert len(text.split()) == 6
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


def test_chat(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello there"}], max_tokens=4
    )
    assert r.choices[0].message.role == "assistant"
    assert len(r.choices[0].message.content.split()) == 4
    assert r.usage.completion_tokens == 4
    assert r.usage.prompt_tokens_details.cached_tokens == 0


def test_chat_streamed(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "stream to me"}],
        max_tokens=7,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert len(text.split()) == 7
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finishes[-1] == "length"
    assert chunks[-1].usage.prompt_tokens == 4 and chunks[-1].usage.completion_tokens == 7


def test_bad_parameter_raises_the_clients_bad_request_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=0)
