"""Backend load gauges: SGLang's /v1/loads and /get_load, vLLM's /metrics, and polling them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Hashable

import httpx
import pytest

from scheduler.router.gauges import (
    GAUGE_PATHS,
    GaugeError,
    GaugePoller,
    Gauges,
    parse_sglang_loads,
    parse_vllm_metrics,
    poll_gauges,
)
from sim.emulator import EmulatorConfig, running_in_thread
from tests.loopback import free_port

# The shape of SGLang's GET /v1/loads (entrypoints/v1_loads.py; GetLoadsReqOutput in
# managers/io_struct.py) from a server with two data-parallel ranks, every section included.
SGLANG_LOADS = {
    "timestamp": "2026-12-02T02:00:00.123456+00:00",
    "version": "0.5.6",
    "accelerator": "NVIDIA H200",
    "num_accelerators": 4,
    "loads": [
        {
            "dp_rank": 0,
            "timestamp": 1796176800.1,
            "num_running_reqs": 12,
            "num_waiting_reqs": 3,
            "num_waiting_uncached_tokens": 900,
            "num_used_tokens": 40_000,
            "num_total_tokens": 41_500,
            "max_total_num_tokens": 500_000,
            "token_usage": 0.08,
            "gen_throughput": 812.5,
            "cache_hit_rate": 0.4,
            "utilization": 0.9,
            "max_running_requests": 256,
            "memory": {
                "weight_gb": 16.1,
                "kv_cache_gb": 60.0,
                "graph_gb": 1.2,
                "token_capacity": 500_000,
            },
            "speculative": None,
            "lora": None,
            "disaggregation": None,
            "queues": {"waiting": 3, "grammar": 0, "paused": 0, "retracted": 0},
        },
        {
            "dp_rank": 1,
            "timestamp": 1796176800.1,
            "num_running_reqs": 8,
            "num_waiting_reqs": 0,
            "num_used_tokens": 25_000,
            "num_total_tokens": 25_000,
            "max_total_num_tokens": 500_000,
            "token_usage": 0.05,
            "gen_throughput": 640.0,
            "cache_hit_rate": 0.5,
            "utilization": 0.7,
            "max_running_requests": 256,
        },
    ],
}

# vLLM's GET /metrics (vllm/v1/metrics/loggers.py) with two data-parallel engines: the
# gauges, the deprecated twin of the KV gauge (set to the same value), the cache-config info
# gauge, and counters and a histogram that must not be read as load.
VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="llama-3.1-8b"} 7.0
vllm:num_requests_running{engine="1",model_name="llama-3.1-8b"} 5.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="llama-3.1-8b"} 2.0
vllm:num_requests_waiting{engine="1",model_name="llama-3.1-8b"} 1.0
# HELP vllm:num_requests_waiting_by_reason Number of requests waiting, by reason.
# TYPE vllm:num_requests_waiting_by_reason gauge
vllm:num_requests_waiting_by_reason{engine="0",model_name="llama-3.1-8b",reason="capacity"} 2.0
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{engine="0",model_name="llama-3.1-8b"} 0.25
vllm:gpu_cache_usage_perc{engine="1",model_name="llama-3.1-8b"} 0.5
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="llama-3.1-8b"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="llama-3.1-8b"} 0.5
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="llama-3.1-8b"} 123456.0
vllm:prompt_tokens_total{engine="1",model_name="llama-3.1-8b"} 65432.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="llama-3.1-8b"} 4.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="llama-3.1-8b"} 9.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="llama-3.1-8b"} 9.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="llama-3.1-8b"} 1.5
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",cache_dtype="auto",calculate_kv_scales="False",enable_prefix_caching="True",engine="0",gpu_memory_utilization="0.9",is_attention_free="False",num_cpu_blocks="None",num_gpu_blocks="2000",prefix_caching_hash_algo="sha256",sliding_window="None",swap_space="4"} 1.0
vllm:cache_config_info{block_size="16",cache_dtype="auto",calculate_kv_scales="False",enable_prefix_caching="True",engine="1",gpu_memory_utilization="0.9",is_attention_free="False",num_cpu_blocks="None",num_gpu_blocks="2000",prefix_caching_hash_algo="sha256",sliding_window="None",swap_space="4"} 1.0
"""


# SGLang


def test_sglang_loads_are_summed_over_data_parallel_ranks() -> None:
    g = parse_sglang_loads(SGLANG_LOADS)
    assert g == Gauges(
        n_waiting=3,
        n_running=20,
        waiting_tokens=1_500,  # num_total_tokens - num_used_tokens, rank 0 only
        kv_used_tokens=65_000,
        kv_capacity_tokens=1_000_000,
    )


def test_sglang_rank_without_token_figures_leaves_them_unknown() -> None:
    # Releases whose GetLoadsReqOutput has every field Optional send nulls; older ones lack
    # num_total_tokens. A sum over ranks that do not all say is not a number to trust.
    data = {
        "loads": [
            {"dp_rank": 0, "num_running_reqs": 2, "num_waiting_reqs": 1, "num_used_tokens": 10},
            {"dp_rank": 1, "num_running_reqs": 1, "num_waiting_reqs": 0, "num_used_tokens": None},
        ]
    }
    g = parse_sglang_loads(data)
    assert (g.n_running, g.n_waiting) == (3, 1)
    assert g.waiting_tokens is None and g.kv_used_tokens is None and g.kv_capacity_tokens is None


def test_sglang_legacy_get_load_counts_running_as_requests_minus_waiting() -> None:
    # GET /get_load: GetLoadReqOutput per rank; num_reqs counts running and waiting.
    g = parse_sglang_loads(
        [
            {"dp_rank": 0, "num_reqs": 10, "num_waiting_reqs": 4, "num_tokens": 9000},
            {"dp_rank": 1, "num_reqs": 3, "num_waiting_reqs": 0, "num_tokens": 1200},
        ]
    )
    assert g == Gauges(
        n_waiting=4, n_running=9, waiting_tokens=None, kv_used_tokens=None, kv_capacity_tokens=None
    )
    # Releases that split used from pending tokens say both.
    split = parse_sglang_loads(
        [
            {
                "dp_rank": 0,
                "num_reqs": 2,
                "num_waiting_reqs": 1,
                "num_tokens": 500,
                "num_pending_tokens": 80,
            }
        ]
    )
    assert (split.kv_used_tokens, split.waiting_tokens) == (500, 80)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("<html>busy</html>", "expected a JSON object with 'loads', got str"),
        (None, "got null"),
        ({"status": "ok"}, "expected a 'loads' list, got keys ['status']"),
        ({"loads": []}, "no data-parallel ranks"),
        ({"loads": [7]}, "loads[0]: expected an object, got int"),
        ({"loads": [{"num_waiting_reqs": 0}]}, "loads[0]: missing 'num_running_reqs'"),
        (
            {"loads": [{"num_running_reqs": 1, "num_waiting_reqs": 0}, {"num_running_reqs": 1}]},
            "loads[1]: missing 'num_waiting_reqs'",
        ),
        (
            {"loads": [{"num_running_reqs": 1, "num_waiting_reqs": "3"}]},
            "'num_waiting_reqs' must be a non-negative integer, got '3'",
        ),
        (
            {"loads": [{"num_running_reqs": True, "num_waiting_reqs": 0}]},
            "'num_running_reqs' must be a non-negative integer, got True",
        ),
        (
            {"loads": [{"num_running_reqs": 1, "num_waiting_reqs": 0, "num_used_tokens": -5}]},
            "'num_used_tokens' must be a non-negative integer, got -5",
        ),
    ],
)
def test_sglang_malformed_loads_name_the_source_and_the_fault(data: object, expected: str) -> None:
    with pytest.raises(GaugeError) as err:
        parse_sglang_loads(data, source="http://10.0.0.5:30000/v1/loads")
    assert str(err.value).startswith("http://10.0.0.5:30000/v1/loads")
    assert expected in str(err.value)


# vLLM


def test_vllm_metrics_are_summed_over_engines_and_kv_comes_from_cache_config() -> None:
    g = parse_vllm_metrics(VLLM_METRICS)
    # KV: 0.25 and 0.5 of 2000 blocks x 16 tokens each; the deprecated twin gauge is not added.
    assert g == Gauges(
        n_waiting=3,
        n_running=12,
        waiting_tokens=None,
        kv_used_tokens=8_000 + 16_000,
        kv_capacity_tokens=64_000,
    )


def test_vllm_older_release_with_only_gpu_cache_usage_is_read() -> None:
    text = "\n".join(
        line
        for line in VLLM_METRICS.splitlines()
        if not line.startswith(("vllm:kv_cache_usage_perc", "# HELP vllm:kv_", "# TYPE vllm:kv_"))
    )
    assert parse_vllm_metrics(text).kv_used_tokens == 24_000


def test_vllm_without_cache_config_or_block_count_leaves_kv_unknown() -> None:
    no_info = "\n".join(x for x in VLLM_METRICS.splitlines() if "cache_config_info" not in x)
    g = parse_vllm_metrics(no_info)
    assert (g.n_running, g.n_waiting) == (12, 3)
    assert g.kv_used_tokens is None and g.kv_capacity_tokens is None
    unprofiled = VLLM_METRICS.replace('num_gpu_blocks="2000"', 'num_gpu_blocks="None"')
    assert parse_vllm_metrics(unprofiled).kv_capacity_tokens is None


def test_vllm_one_cache_config_applies_to_every_engine() -> None:
    # One CacheConfig is shared by a server's engines; an info line for one engine is enough.
    lines = VLLM_METRICS.splitlines()
    text = "\n".join(x for x in lines if not ("cache_config_info{" in x and 'engine="1"' in x))
    g = parse_vllm_metrics(text)
    assert (g.kv_used_tokens, g.kv_capacity_tokens) == (24_000, 64_000)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<html><body>502 Bad Gateway</body></html>", "not Prometheus text exposition"),
        ("", "no vllm:num_requests_running gauge"),
        (
            'vllm:num_requests_running{engine="0"} 1\n',
            "no vllm:num_requests_waiting gauge",
        ),
        (
            'vllm:num_requests_running{engine="0"} NaN\nvllm:num_requests_waiting 0\n',
            "vllm:num_requests_running is nan",
        ),
        (
            "vllm:num_requests_running 1\nvllm:num_requests_waiting -2\n",
            "vllm:num_requests_waiting is -2, expected a non-negative number",
        ),
        ('vllm:num_requests_running{engine="0} 1\n', "not Prometheus text exposition"),
    ],
)
def test_vllm_malformed_metrics_name_the_source_and_the_fault(text: str, expected: str) -> None:
    with pytest.raises(GaugeError) as err:
        parse_vllm_metrics(text, source="http://10.0.0.6:8000/metrics")
    assert str(err.value).startswith("http://10.0.0.6:8000/metrics")
    assert expected in str(err.value)


def test_gauge_error_is_a_value_error() -> None:
    assert issubclass(GaugeError, ValueError)


# poll_gauges over a mock transport


def _client(handler: Callable[[httpx.Request], object]) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(handler))  # type: ignore[arg-type]


async def test_poll_reads_each_protocol_at_its_path_with_the_headers() -> None:
    seen: list[tuple[str, str | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, request.headers.get("authorization")))
        if request.url.path == "/v1/loads":
            return httpx.Response(200, json=SGLANG_LOADS)
        return httpx.Response(200, text=VLLM_METRICS)

    async with _client(handler) as c:
        sg = await poll_gauges(c, "http://a:30000/", "sglang", {"authorization": "Bearer k"})
        vl = await poll_gauges(c, "http://b:8000", "vllm")
        assert await poll_gauges(c, "http://c:8000", "openai") is None
    assert sg is not None and sg.n_running == 20
    assert vl is not None and vl.n_running == 12
    assert seen == [("/v1/loads", "Bearer k"), ("/metrics", None)]
    assert GAUGE_PATHS == {"sglang": "/v1/loads", "vllm": "/metrics", "openai": None}


async def test_poll_falls_back_to_get_load_on_an_sglang_without_v1_loads() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/get_load":
            return httpx.Response(
                200, json=[{"dp_rank": 0, "num_reqs": 5, "num_waiting_reqs": 2, "num_tokens": 7}]
            )
        return httpx.Response(404, json={"detail": "Not Found"})

    async with _client(handler) as c:
        g = await poll_gauges(c, "http://old:30000", "sglang")
    assert g == Gauges(2, 3, None, None, None)


async def test_poll_errors_name_the_url_and_status() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "slow":
            await asyncio.sleep(5)
        if request.url.host == "down":
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.host == "html":
            return httpx.Response(200, text="<html>maintenance</html>")
        return httpx.Response(503, text="overloaded")

    async with _client(handler) as c:
        cases = {
            "http://busy:30000": "http://busy:30000/v1/loads: HTTP 503",
            "http://down:30000": "http://down:30000/v1/loads: ConnectError: connection refused",
            "http://slow:30000": "http://slow:30000/v1/loads: no answer within 0.05 s",
            "http://html:30000": "http://html:30000/v1/loads: not JSON",
        }
        for url, expected in cases.items():
            with pytest.raises(GaugeError) as err:
                await poll_gauges(c, url, "sglang", timeout_s=0.05)
            assert expected in str(err.value), url
        with pytest.raises(GaugeError, match=r"http://busy:8000/metrics: HTTP 503"):
            await poll_gauges(c, "http://busy:8000", "vllm")
        with pytest.raises(ValueError, match="unknown protocol 'tgi'"):
            await poll_gauges(c, "http://x", "tgi")


# GaugePoller


async def _until(cond: Callable[[], bool], timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not cond():
            await asyncio.sleep(0.01)


async def test_poller_keeps_polling_the_others_while_one_fails_and_logs_once_per_change(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broken = {"yes": True}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "bad" and broken["yes"]:
            return httpx.Response(500)
        return httpx.Response(200, json=SGLANG_LOADS)

    got: dict[Hashable, list[Gauges | None]] = {"good": [], "bad": []}
    caplog.set_level(logging.INFO, logger="llmsched.router")
    async with _client(handler) as c:
        poller = GaugePoller(lambda k, g: got[k].append(g), interval_s=0.02, client=c)
        poller.add("good", "http://good:30000", "sglang")
        poller.add("bad", "http://bad:30000", "sglang")
        poller.add("plain", "http://plain:8000", "openai")  # nothing to poll
        await poller.start()
        try:
            await _until(lambda: len(got["bad"]) >= 5 and len(got["good"]) >= 5)
            assert all(g is None for g in got["bad"])
            assert all(g is not None and g.n_running == 20 for g in got["good"])
            broken["yes"] = False
            n = len(got["bad"])
            await _until(lambda: len(got["bad"]) >= n + 3)
            assert got["bad"][-1] is not None
            poller.remove("good")
            await asyncio.sleep(0.01)
            frozen = len(got["good"])
            await asyncio.sleep(0.1)
            assert len(got["good"]) == frozen  # no callbacks after remove
        finally:
            await poller.stop()
        assert not c.is_closed  # a client passed in is the caller's to close
    assert "plain" not in got
    messages = [r.getMessage() for r in caplog.records if r.name == "llmsched.router"]
    assert [m for m in messages if "'bad'" in m] == [
        "gauges of backend 'bad' unavailable: http://bad:30000/v1/loads: HTTP 500",
        "gauges of backend 'bad' readable again",
    ]


async def test_poller_rejects_unknown_protocols_and_duplicate_keys() -> None:
    poller = GaugePoller(lambda k, g: None)
    poller.add("a", "http://a", "vllm")
    with pytest.raises(ValueError, match="already polled"):
        poller.add("a", "http://a", "vllm")
    with pytest.raises(ValueError, match="unknown protocol 'triton'"):
        poller.add("b", "http://b", "triton")


# Loopback: the emulated servers' real endpoints


async def test_poller_reads_the_emulated_servers_and_reports_a_dead_one() -> None:
    got: dict[Hashable, Gauges | None] = {}
    with (
        running_in_thread(EmulatorConfig(protocol="sglang", port=free_port())) as sg,
        running_in_thread(EmulatorConfig(protocol="vllm", port=free_port())) as vl,
    ):
        poller = GaugePoller(got.__setitem__, interval_s=0.05, timeout_s=1.0)
        poller.add("sglang", f"http://127.0.0.1:{sg.ports[0]}", "sglang")
        poller.add("vllm", f"http://127.0.0.1:{vl.ports[0]}", "vllm")
        poller.add("dead", f"http://127.0.0.1:{free_port()}", "vllm")
        await poller.start()
        try:
            await _until(lambda: {"sglang", "vllm", "dead"} <= got.keys())
        finally:
            await poller.stop()
    idle_sglang, idle_vllm = got["sglang"], got["vllm"]
    assert idle_sglang is not None and (idle_sglang.n_running, idle_sglang.n_waiting) == (0, 0)
    assert idle_sglang.kv_used_tokens == 0 and idle_sglang.waiting_tokens == 0
    assert idle_sglang.kv_capacity_tokens is not None and idle_sglang.kv_capacity_tokens > 0
    # The emulated vLLM exports no vllm:cache_config_info: counts, but no KV tokens.
    assert idle_vllm == Gauges(0, 0, None, None, None)
    assert got["dead"] is None
