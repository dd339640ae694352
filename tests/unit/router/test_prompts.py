"""The router's prompt measurement: counts the backends agree with, block hashes, caching, threads."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from scheduler.router.prompts import BodyError, PromptCounter, PromptInfo
from traces.errors import ConfigError
from traces.hashing import block_hashes
from traces.tokenizer import WordTokenizer, render_chat

WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "on",
    "mat",
    "and",
    "ran",
    "far",
    "away",
    "system",
    "user",
    "assistant",
    "be",
    "brief",
    "hello",
]
SPECIAL = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m.role not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m.role) }}"
    "{% endif %}"
    "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "be brief " * 20},
    {"role": "user", "content": "the cat sat on the mat " * 5},
    {"role": "assistant", "content": "the dog ran far away " * 4},
]


def _make_tokenizer(folder: Path, template: str | None = CHATML, **config: Any) -> Path:
    """A word-level HF tokenizer with a BOS post-processor, and its config, saved in ``folder``."""
    vocab = {w: i for i, w in enumerate(["[UNK]", *SPECIAL, *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIAL)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    cfg: dict[str, Any] = {"bos_token": {"content": "<s>"}, "eos_token": "</s>", **config}
    if template is not None:
        cfg["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture
def hf_dir(tmp_path: Path) -> Path:
    return _make_tokenizer(tmp_path / "model")


def _hf(folder: Path) -> Tokenizer:
    return Tokenizer.from_file(str(folder / "tokenizer.json"))


def _chat(*messages: dict[str, Any]) -> dict[str, Any]:
    return {"model": "m", "messages": list(messages)}


def _count_calls(counter: PromptCounter, name: str) -> list[int]:
    """Patch the counter's encoder ``name``; the returned list gets the calling thread per call."""
    inner: Callable[[str, bool], list[int]] = getattr(counter, name)
    threads: list[int] = []

    def spy(text: str, special: bool) -> list[int]:
        threads.append(threading.get_ident())
        return inner(text, special)

    setattr(counter, name, spy)
    return threads


# -- the built-in tokenizer counts what the emulated backend counts ------------------------


@pytest.fixture
async def emulator() -> Any:
    from sim.emulator import EmulatorConfig, build_instances
    from sim.emulator.app import build_app

    async def client(protocol: str) -> httpx.AsyncClient:
        inst = build_instances(EmulatorConfig(protocol=protocol, time_scale=1000.0))[0]
        inst.start()
        app = build_app(inst, protocol, "m", context_length=1 << 20)  # type: ignore[arg-type]
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://emu")

    return client


OPENAI_BODIES = [
    ("completions", {"prompt": "the cat sat on the mat " * 30}),
    ("completions", {"prompt": ["a dog ran  far\n away"]}),
    ("completions", {"prompt": list(range(40, 77))}),
    ("completions", {"prompt": [[5, 6, 7]]}),
    ("chat", _chat(*CONVERSATION, {"role": "user", "content": "and then?"})),
    (
        "chat",
        _chat(
            {"role": "user", "content": [{"type": "text", "text": "the cat"}]},
            {"role": "assistant", "content": None},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b c"}],
            },
        ),
    ),
]


@pytest.mark.parametrize(("endpoint", "body"), OPENAI_BODIES)
async def test_counts_equal_the_emulated_vllm_usage(
    emulator: Any, endpoint: str, body: dict
) -> None:
    info = PromptCounter().measure_now(endpoint, body)
    async with await emulator("vllm") as http:
        path = "/v1/completions" if endpoint == "completions" else "/v1/chat/completions"
        r = await http.post(path, json={"model": "m", **body, "max_tokens": 1})
        assert r.status_code == 200, r.text
        assert info.tokens == r.json()["usage"]["prompt_tokens"]
        assert info.exact
        if endpoint == "chat":  # the emulator's ids, as its /tokenize gives them
            r = await http.post("/tokenize", json={"messages": body["messages"]})
            assert info.prefix_hashes == tuple(block_hashes(r.json()["tokens"], 16))


@pytest.mark.parametrize(
    "body",
    [
        {"text": "the cat sat " * 50},
        {"text": ["hello  world"]},
        {"input_ids": list(range(100, 150))},
        {"input_ids": [[1, 2, 3]]},
    ],
)
async def test_counts_equal_the_emulated_sglang_meta_info(emulator: Any, body: dict) -> None:
    info = PromptCounter().measure_now("generate", body)
    async with await emulator("sglang") as http:
        r = await http.post("/generate", json={**body, "sampling_params": {"max_new_tokens": 1}})
        assert r.status_code == 200, r.text
        assert info.tokens == r.json()["meta_info"]["prompt_tokens"]


def test_text_and_ids_are_hashed_from_the_tokens_the_backend_sees() -> None:
    counter = PromptCounter(block_tokens=8)
    text = "the cat sat on the mat " * 10
    ids = WordTokenizer().encode(text)
    assert counter.measure_now("completions", {"prompt": text}) == PromptInfo(
        60, True, tuple(block_hashes(ids, 8)), 8
    )
    assert counter.measure_now("generate", {"input_ids": ids}).prefix_hashes == tuple(
        block_hashes(ids, 8)
    )
    assert (
        PromptCounter(hashes=False).measure_now("completions", {"prompt": text}).prefix_hashes
        is None
    )
    # The backend refuses an empty prompt; measuring it is no error.
    assert counter.measure_now("completions", {"prompt": ""}) == PromptInfo(0, True, (), 8)
    assert counter.measure_now("completions", {"prompt": []}) == PromptInfo(0, True, (), 8)


# -- an HF tokenizer and its chat template -------------------------------------------------


def test_a_text_prompt_gets_the_tokenizers_special_tokens_as_vllm_adds_them(hf_dir: Path) -> None:
    counter = PromptCounter(hf_dir)
    text = "the cat sat on the mat"
    info = counter.measure_now("completions", {"prompt": text})
    assert info.tokens == 7 and info.exact  # <s> and six words
    assert info.prefix_hashes == tuple(block_hashes(_hf(hf_dir).encode(text).ids, 16))
    plain = counter.measure_now("completions", {"prompt": text, "add_special_tokens": False})
    assert plain.tokens == 6
    assert counter.measure_now("generate", {"text": text}).tokens == 7
    assert (
        PromptCounter(hf_dir / "tokenizer.json").measure_now("generate", {"text": text}).tokens == 7
    )


def test_a_chat_counts_its_rendered_template_with_one_bos(hf_dir: Path) -> None:
    counter = PromptCounter(hf_dir)
    assert counter.has_chat_template
    body = _chat(
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "the cat"}],
        },
    )
    rendered = (
        "<s><|im_start|>system\nbe brief<|im_end|>\n"
        "<|im_start|>user\nhello\nthe cat<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = _hf(hf_dir).encode(rendered, add_special_tokens=False).ids
    info = counter.measure_now("chat", body)
    assert info == PromptInfo(len(ids), True, tuple(block_hashes(ids, 16)), 16)
    bos = _hf(hf_dir).token_to_id("<s>")
    assert ids.count(bos) == 1 and ids[0] == bos
    without_prompt = counter.measure_now("chat", {**body, "add_generation_prompt": False})
    assert without_prompt.tokens == info.tokens - 2  # <|im_start|> assistant


def test_a_template_that_refuses_the_conversation_is_a_body_error(hf_dir: Path) -> None:
    with pytest.raises(BodyError) as err:
        PromptCounter(hf_dir).measure_now("chat", _chat({"role": "wizard", "content": "hello"}))
    assert err.value.param == "messages" and "unknown role wizard" in err.value.message


def test_chat_template_jinja_and_named_templates_and_kwargs(tmp_path: Path) -> None:
    named = [
        {"name": "default", "template": "{{ messages[0].content }}"},
        {"name": "tool_use", "template": "{{ tools | tojson }} {{ messages[0].content }}"},
    ]
    folder = _make_tokenizer(tmp_path / "named", template=named)  # type: ignore[arg-type]
    counter = PromptCounter(folder)
    msg = {"role": "user", "content": "the cat"}
    assert counter.measure_now("chat", _chat(msg)).tokens == 2
    tools = [{"name": "<dog>"}]  # tojson leaves < and > alone (jinja's own would escape them)
    with_tools = counter.measure_now("chat", {**_chat(msg), "tools": tools})
    expected = _hf(folder).encode('[{"name": "<dog>"}] the cat', add_special_tokens=False).ids
    assert with_tools.tokens == len(expected)
    (folder / "chat_template.jinja").write_text("{{ greeting }} {{ messages[0].content }}")
    counter = PromptCounter(folder)
    body = {**_chat(msg), "chat_template_kwargs": {"greeting": "hello hello"}}
    assert counter.measure_now("chat", body).tokens == 4


def test_without_a_template_a_chat_is_an_estimate_of_its_rendered_lines(tmp_path: Path) -> None:
    folder = _make_tokenizer(tmp_path / "bare", template=None)
    counter = PromptCounter(folder)
    assert not counter.has_chat_template
    info = counter.measure_now("chat", _chat(*CONVERSATION))
    ids = _hf(folder).encode(render_chat(CONVERSATION), add_special_tokens=False).ids
    assert info == PromptInfo(len(ids), False, tuple(block_hashes(ids, 16)), 16)


def test_a_template_failing_at_render_time_falls_back_to_the_estimate(tmp_path: Path) -> None:
    folder = _make_tokenizer(tmp_path / "bad", template="{{ messages[0].content.nope() }}")
    info = PromptCounter(folder).measure_now("chat", _chat({"role": "user", "content": "the"}))
    assert not info.exact and info.tokens == 3  # "user", ":" -> [UNK], "the"


@pytest.mark.parametrize("tokenizer", [None, "hf"])
def test_non_text_parts_count_nothing_and_make_an_estimate(
    hf_dir: Path, tokenizer: str | None
) -> None:
    counter = PromptCounter(hf_dir if tokenizer else None)
    parts = [{"type": "text", "text": "the cat"}, {"type": "image_url", "image_url": {"url": "x"}}]
    with_image = counter.measure_now("chat", _chat({"role": "user", "content": parts}))
    text_only = counter.measure_now("chat", _chat({"role": "user", "content": parts[:1]}))
    assert not with_image.exact and text_only.exact
    assert with_image.tokens == text_only.tokens


def test_bad_tokenizer_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        PromptCounter(tmp_path / "missing")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "tokenizer.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"not a tokenizer\.json"):
        PromptCounter(tmp_path / "junk")
    folder = _make_tokenizer(tmp_path / "syntax", template="{% for m in messages %}")
    with pytest.raises(ConfigError, match="chat_template does not parse"):
        PromptCounter(folder)


# -- shared prefixes share leading hashes --------------------------------------------------


def _shared_leading(a: PromptInfo, b: PromptInfo) -> int:
    assert a.prefix_hashes is not None and b.prefix_hashes is not None
    n = 0
    for x, y in zip(a.prefix_hashes, b.prefix_hashes, strict=False):
        if x != y:
            break
        n += 1
    return n


@pytest.mark.parametrize("tokenizer", [None, "hf"])
def test_a_conversation_shares_its_leading_hashes_with_its_earlier_turn(
    hf_dir: Path, tokenizer: str | None
) -> None:
    counter = PromptCounter(hf_dir if tokenizer else None)
    first = counter.measure_now("chat", _chat(*CONVERSATION[:2]))
    second = counter.measure_now(
        "chat", _chat(*CONVERSATION, {"role": "user", "content": "the end"})
    )
    other = counter.measure_now(
        "chat", _chat({"role": "system", "content": "be brief"}, *CONVERSATION[1:])
    )
    # Every full block of the earlier turn (here its generation prompt starts the next
    # assistant turn; a template whose doesn't loses the block around it); the partial last
    # block is never shared with a longer prompt.
    assert _shared_leading(first, second) == first.tokens // 16 >= 4
    assert _shared_leading(first, other) == 0
    # The same system prompt and first question: shared up to where the questions part.
    third = counter.measure_now(
        "chat", _chat(CONVERSATION[0], {"role": "user", "content": "the cat sat " + "dog " * 40})
    )
    assert _shared_leading(first, third) >= 2  # 45 or more tokens in common


def test_prompts_sharing_a_prefix_of_ids_share_their_full_blocks() -> None:
    counter = PromptCounter()
    a = counter.measure_now("completions", {"prompt": list(range(100))})
    b = counter.measure_now("completions", {"prompt": [*range(70), 5, 5, 5]})
    assert _shared_leading(a, b) == 70 // 16


# -- caching and threads -------------------------------------------------------------------


@pytest.mark.parametrize("tokenizer", [None, "hf"])
def test_a_repeated_text_is_encoded_once(hf_dir: Path, tokenizer: str | None) -> None:
    counter = PromptCounter(hf_dir if tokenizer else None, cache_size=2)
    calls = _count_calls(counter, "_encode_short")
    body = _chat(*CONVERSATION)
    first = counter.measure_now("chat", body)
    assert counter.measure_now("chat", _chat(*CONVERSATION)) == first
    assert len(calls) == 1 and (counter.hits, counter.misses) == (1, 1)
    counter.measure_now("completions", {"prompt": "the cat"})
    counter.measure_now("completions", {"prompt": "the dog"})  # evicts the chat
    counter.measure_now("chat", body)
    assert len(calls) == 4
    counter.measure_now("completions", {"prompt": list(range(50))})  # ids: never encoded
    assert len(calls) == 4


def test_the_same_text_with_and_without_special_tokens_is_two_entries(hf_dir: Path) -> None:
    counter = PromptCounter(hf_dir)
    a = counter.measure_now("completions", {"prompt": "the cat"})
    b = counter.measure_now("completions", {"prompt": "the cat", "add_special_tokens": False})
    assert (a.tokens, b.tokens) == (3, 2)


@pytest.mark.parametrize("tokenizer", [None, "hf"])
async def test_a_long_text_is_encoded_off_the_event_loop(
    hf_dir: Path, tokenizer: str | None
) -> None:
    counter = PromptCounter(hf_dir if tokenizer else None, offload_chars=100)
    short, long = _count_calls(counter, "_encode_short"), _count_calls(counter, "_encode_long")
    here = threading.get_ident()
    text = "the cat sat on the mat " * 50
    info = await counter.measure("completions", {"prompt": text})
    assert info == counter.measure_now("completions", {"prompt": text})
    assert len(long) == 1 and long[0] != here
    await counter.measure("completions", {"prompt": "the cat"})
    assert short == [here]
    await counter.measure("completions", {"prompt": text})  # cached: no thread
    assert len(long) == 1


async def test_long_id_lists_are_hashed_in_the_given_executor() -> None:
    from concurrent.futures import ThreadPoolExecutor

    seen: list[str] = []
    with ThreadPoolExecutor(1, thread_name_prefix="mine") as pool:
        counter = PromptCounter(offload_chars=40, executor=pool)
        original = counter._of_ids

        def spy(prompt: Any) -> PromptInfo:
            seen.append(threading.current_thread().name)
            return original(prompt)

        counter._of_ids = spy  # type: ignore[method-assign]
        await counter.measure("generate", {"input_ids": list(range(11))})
        assert seen[-1].startswith("mine")
        await counter.measure("generate", {"input_ids": list(range(10))})
        assert seen[-1] == threading.current_thread().name
        infos = await asyncio.gather(
            *(counter.measure("completions", {"prompt": list(range(n, n + 64))}) for n in range(8))
        )
    assert [i.tokens for i in infos] == [64] * 8


# -- bodies that cannot be measured --------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "body", "param", "says"),
    [
        ("completions", {}, "prompt", "got null"),
        ("completions", {"prompt": 5}, "prompt", "a string or a list of token ids"),
        ("completions", {"prompt": ["a", "b", "c"]}, "prompt", "a batch of 3"),
        ("completions", {"prompt": [[1], [2]]}, "prompt", "a batch of 2"),
        ("completions", {"prompt": [1, "x", 3]}, "prompt[1]", "token id"),
        ("completions", {"prompt": [1, -3]}, "prompt[1]", "token id"),
        ("completions", {"prompt": [1, 2**63]}, "prompt[1]", "token id"),
        ("completions", {"prompt": [[1, 2.5]]}, "prompt[0][1]", "token id"),
        ("completions", {"prompt": [{"a": 1}]}, "prompt[0]", "token id"),
        ("completions", {"prompt": "x", "add_special_tokens": "yes"}, "add_special_tokens", "true"),
        ("completions", {"prompt": "a \ud800 b"}, "prompt", "lone surrogate"),
        ("chat", {}, "messages", "non-empty list"),
        ("chat", {"messages": []}, "messages", "non-empty list"),
        ("chat", {"messages": "hi"}, "messages", "non-empty list"),
        ("chat", {"messages": [{"role": "user"}, "hi"]}, "messages[1]", "an object"),
        ("chat", {"messages": [{"content": "hi"}]}, "messages[0].role", "a string"),
        ("chat", _chat({"role": "user", "content": 3}), "messages[0].content", "list of parts"),
        ("chat", _chat({"role": "user", "content": ["hi"]}), "messages[0].content[0]", "'type'"),
        (
            "chat",
            _chat({"role": "user"}, {"role": "user", "content": [{"type": "text", "text": 1}]}),
            "messages[1].content[0].text",
            "a string",
        ),
        ("chat", {**_chat({"role": "user", "content": "x"}), "tools": {}}, "tools", "a list"),
        (
            "chat",
            {**_chat({"role": "user", "content": "x"}), "chat_template_kwargs": []},
            "chat_template_kwargs",
            "an object",
        ),
        ("generate", {}, "text", "text or input_ids"),
        ("generate", {"text": "a", "input_ids": [1]}, "input_ids", "not both"),
        ("generate", {"text": ["a", "b"]}, "text", "a batch of 2"),
        ("generate", {"text": [[1, 2]]}, "text", "a string"),
        ("generate", {"text": 7}, "text", "a string"),
        ("generate", {"input_ids": "the cat"}, "input_ids", "a list of token ids"),
        ("generate", {"input_ids": [[1], [2], [3]]}, "input_ids", "a batch of 3"),
        ("generate", {"input_ids": [[1, None]]}, "input_ids[0][1]", "token id"),
    ],
)
@pytest.mark.parametrize("tokenizer", [None, "hf"])
async def test_a_body_of_the_wrong_shape_names_its_field(
    hf_dir: Path, tokenizer: str | None, endpoint: str, body: dict, param: str, says: str
) -> None:
    counter = PromptCounter(hf_dir if tokenizer else None, offload_chars=0)
    for measure in (counter.measure_now, counter.measure):
        with pytest.raises(BodyError) as err:
            out = measure(endpoint, body)
            if asyncio.iscoroutine(out):
                await out
        assert err.value.param == param
        assert says in err.value.message, err.value.message
        assert str(err.value).startswith(f"{param}: ")


def test_an_unknown_endpoint_or_bad_settings_are_value_errors() -> None:
    with pytest.raises(ValueError, match="endpoint: expected one of completions, chat, generate"):
        PromptCounter().measure_now("embeddings", {"input": "x"})
    with pytest.raises(ValueError, match="block_tokens"):
        PromptCounter(block_tokens=0)
    with pytest.raises(BodyError, match="body: expected a JSON object"):
        PromptCounter().measure_now("chat", [])  # type: ignore[arg-type]
