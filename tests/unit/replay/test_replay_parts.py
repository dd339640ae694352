"""Prompt building and stream parsing without a server: lengths, sharing, determinism, chunk shapes."""

from __future__ import annotations

import json

import pytest

from traces.replay.prompts import PromptBuilder
from traces.replay.protocol import StreamState, error_message, request_body
from traces.tokenizer import WordTokenizer


def _builder(seed: int = 0) -> PromptBuilder:
    return PromptBuilder(WordTokenizer(), seed)


def test_prompts_are_deterministic_for_a_seed_and_differ_across_seeds():
    a = _builder(1).build(5, 50, 3)
    assert a == _builder(1).build(5, 50, 3)
    assert a != _builder(2).build(5, 50, 3)
    assert len(a) == 50


def test_requests_sharing_prefix_hashes_share_exactly_those_blocks():
    b = _builder()
    x = b.build(0, 40, 1, prefix_hashes=[11, 22, 33], block_tokens=16)
    y = b.build(1, 40, 1, prefix_hashes=[11, 22, 44], block_tokens=16)
    z = b.build(2, 20, 1, prefix_hashes=[99, 22], block_tokens=16)
    assert len(x) == len(y) == 40 and len(z) == 20
    assert x[:32] == y[:32] and x[32:] != y[32:]
    assert z[:16] != x[:16]
    # More tokens than the hashes cover: the rest is the request's own.
    w = b.build(3, 50, 1, prefix_hashes=[11], block_tokens=16)
    assert w[:16] == x[:16] and len(w) == 50


def test_a_history_longer_than_the_next_turn_is_cut_to_its_length():
    b = _builder()
    first = b.build(0, 30, 10, session_id="s")
    b.add_response("s", first, list(range(10)))
    second = b.build(1, 20, 5, session_id="s")
    assert second == first[:20]


def test_a_late_response_does_not_overwrite_a_newer_turns_history():
    b = _builder()
    first = b.build(0, 5, 2, session_id="s")
    second = b.build(1, 12, 2, session_id="s")  # sent before the first answered
    b.add_response("s", first, [1, 2])
    third = b.build(2, 30, 2, session_id="s")
    assert third[:12] == second


def test_bodies_ask_for_the_output_length_as_each_protocol_names_it():
    gen = json.loads(request_body("generate", [1, 2], 7, None))
    assert gen == {
        "input_ids": [1, 2],
        "sampling_params": {"max_new_tokens": 7, "min_new_tokens": 7, "ignore_eos": True},
        "stream": True,
    }
    chat = json.loads(request_body("chat", "hi there", 7, "m"))
    assert chat["messages"] == [{"role": "user", "content": "hi there"}]
    assert (chat["model"], chat["max_tokens"], chat["min_tokens"], chat["ignore_eos"]) == (
        "m",
        7,
        7,
        True,
    )
    assert chat["stream_options"]["include_usage"] is True


def test_an_openai_stream_without_running_usage_counts_text_then_takes_the_final_usage():
    s = StreamState("completions", WordTokenizer())
    assert s.feed(b'{"choices":[{"index":0,"text":" bako tesu"}]}') == 2
    assert s.feed(b'{"choices":[{"index":0,"text":""}]}') == 0
    usage = {"prompt_tokens": 9, "completion_tokens": 3}
    usage["prompt_tokens_details"] = {"cached_tokens": 4}
    assert s.feed(json.dumps({"choices": [], "usage": usage}).encode()) == 0
    assert (s.prompt_tokens, s.cached_tokens, s.completion_tokens) == (9, 4, 3)


def test_a_chat_role_chunk_carries_no_token():
    s = StreamState("chat", WordTokenizer())
    assert s.feed(b'{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}') == 0
    assert s.feed(b'{"choices":[{"index":0,"delta":{"content":"bako"}}]}') == 1


@pytest.mark.parametrize("incremental", [False, True])
def test_sglang_chunks_count_tokens_from_meta_info_cumulative_or_incremental(incremental):
    s = StreamState("generate", WordTokenizer())
    ids = [[5, 6], [7], [8, 9, 10]]
    every = [5, 6, 7, 8, 9, 10]
    done = 0
    for part in ids:
        done += len(part)
        sent = part if incremental else every[:done]
        meta = {"completion_tokens": done, "prompt_tokens": 4, "cached_tokens": 2}
        msg = {"text": "x", "output_ids": sent, "meta_info": meta}
        assert s.feed(json.dumps(msg).encode()) == len(part)
    assert s.response_ids() == [5, 6, 7, 8, 9, 10]
    assert (s.prompt_tokens, s.cached_tokens, s.completion_tokens) == (4, 2, 6)


def test_an_error_in_the_stream_ends_the_request_with_its_message():
    s = StreamState("completions", WordTokenizer())
    s.feed(b'{"error":{"message":"KV cache full","type":"InternalServerError","code":500}}')
    assert (s.error, s.error_status) == ("KV cache full", 500)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"error":{"message":"bad max_tokens","code":400}}', "bad max_tokens"),
        (b'{"object":"error","message":"too long","code":400}', "too long"),
        (b'{"detail":"Not Found"}', "Not Found"),
        (b"upstream timed out", "upstream timed out"),
    ],
)
def test_error_bodies_of_every_server_shape_give_their_message(body, message):
    assert error_message(body) == message
