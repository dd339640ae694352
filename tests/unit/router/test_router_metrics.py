"""The router's Prometheus metrics: names, labels and values as a scrape shows them."""

from __future__ import annotations

import re

import pytest
from prometheus_client.parser import text_string_to_metric_families

import scheduler.router.metrics as metrics_module
from scheduler.router.metrics import PREFIX, RouterMetrics, backend_label

A = "http://10.0.0.5:30000"
B = "http://10.0.0.6:30000"


def scrape(m: RouterMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Sample name and sorted labels -> value, from the rendered text."""
    body, _ = m.render()
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m: RouterMetrics, name: str, **labels: str) -> float | None:
    return scrape(m).get((name, tuple(sorted(labels.items()))))


def test_request_done_counts_by_endpoint_status_and_backend_and_fills_the_histograms():
    m = RouterMetrics("laps")
    for _ in range(3):
        m.request_done("/v1/chat/completions", 200, A, ttft_s=0.12, tpot_s=0.02, e2e_s=1.5)
    m.request_done("/v1/chat/completions", 502, A, ttft_s=None, tpot_s=None, e2e_s=0.3)
    m.request_done("/v1/completions", 429, "", ttft_s=None, tpot_s=None, e2e_s=0.001)
    p = PREFIX
    ep = "/v1/chat/completions"
    assert value(m, f"{p}requests_total", endpoint=ep, status="200", backend=A) == 3
    assert value(m, f"{p}requests_total", endpoint=ep, status="502", backend=A) == 1
    # Never dispatched: backend "none".
    assert (
        value(m, f"{p}requests_total", endpoint="/v1/completions", status="429", backend="none")
        == 1
    )
    # Only the 2xx answers enter the latency histograms.
    assert value(m, f"{p}ttft_seconds_count", backend=A) == 3
    assert value(m, f"{p}ttft_seconds_sum", backend=A) == pytest.approx(0.36)
    assert value(m, f"{p}ttft_seconds_bucket", backend=A, le="0.1") == 0
    assert value(m, f"{p}ttft_seconds_bucket", backend=A, le="0.15") == 3
    assert value(m, f"{p}tpot_seconds_bucket", backend=A, le="0.02") == 3
    assert value(m, f"{p}e2e_seconds_count", backend=A) == 3
    assert value(m, f"{p}e2e_seconds_bucket", backend=A, le="600.0") == 3
    assert value(m, f"{p}ttft_seconds_count", backend="none") is None
    assert value(m, f"{p}info", policy="laps", version=_version()) == 1


def test_tokens_of_answered_requests_are_counted_by_kind_and_backend():
    m = RouterMetrics("fcfs")
    for prompt, output in ((100, 7), (250, 3)):
        m.request_done(
            "/v1/completions",
            200,
            A,
            ttft_s=0.1,
            tpot_s=0.01,
            e2e_s=0.2,
            prompt_tokens=prompt,
            output_tokens=output,
        )
    # An error's tokens are not generation a backend did for a client.
    m.request_done("/v1/completions", 502, A, ttft_s=None, tpot_s=None, e2e_s=0.1, prompt_tokens=9)
    p = PREFIX
    assert value(m, f"{p}tokens_total", kind="prompt", backend=A) == 350
    assert value(m, f"{p}tokens_total", kind="generation", backend=A) == 10
    m.remove_backend(A)
    assert value(m, f"{p}tokens_total", kind="prompt", backend=A) is None


def test_gauges_and_counters_show_the_last_values_given():
    m = RouterMetrics("laps")
    m.queue_depth("short", 4)
    m.queue_depth("long", 1)
    m.queue_depth("short", 2)
    m.inflight(A, 7)
    for size in (1, 8, 8, 32):
        m.batch_released(size)
    for kind in ("dispatch", "dispatch", "hold", "timer"):
        m.decision(kind)
    m.retry(A)
    m.retry(A)
    m.rejected("queue_full")
    m.rejected("timeout")
    m.rejected("queue_full")
    p = PREFIX
    assert value(m, f"{p}queued_requests", queue="short") == 2
    assert value(m, f"{p}queued_requests", queue="long") == 1
    assert value(m, f"{p}inflight_requests", backend=A) == 7
    assert value(m, f"{p}batch_size_requests_count") == 4
    assert value(m, f"{p}batch_size_requests_sum") == 49
    assert value(m, f"{p}batch_size_requests_bucket", le="8.0") == 3
    assert value(m, f"{p}decisions_total", kind="dispatch") == 2
    assert value(m, f"{p}decisions_total", kind="hold") == 1
    assert value(m, f"{p}retries_total", backend=A) == 2
    assert value(m, f"{p}rejected_total", reason="queue_full") == 2
    assert value(m, f"{p}rejected_total", reason="timeout") == 1


def test_health_sets_backend_up_and_a_one_hot_breaker_state():
    m = RouterMetrics("fcfs")
    m.health(A, True, "closed")
    p = PREFIX
    assert value(m, f"{p}backend_up", backend=A) == 1
    states = {
        s: value(m, f"{p}breaker_state", backend=A, state=s)
        for s in ("closed", "open", "half_open")
    }
    assert states == {"closed": 1, "open": 0, "half_open": 0}
    m.health(A, False, "open")
    assert value(m, f"{p}backend_up", backend=A) == 0
    assert value(m, f"{p}breaker_state", backend=A, state="open") == 1
    assert value(m, f"{p}breaker_state", backend=A, state="closed") == 0
    m.health(A, False, "probing")  # a state name beyond the known three joins the set
    assert value(m, f"{p}breaker_state", backend=A, state="probing") == 1
    assert value(m, f"{p}breaker_state", backend=A, state="open") == 0


def test_remove_backend_drops_its_series_and_keeps_the_others():
    m = RouterMetrics("fcfs")
    for backend in (A, B):
        m.request_done("/v1/completions", 200, backend, ttft_s=0.1, tpot_s=0.01, e2e_s=1.0)
        m.inflight(backend, 1)
        m.health(backend, True, "closed")
        m.retry(backend)
    m.remove_backend(A)
    body = m.render()[0].decode()
    assert A not in body
    assert (
        value(m, f"{PREFIX}requests_total", endpoint="/v1/completions", status="200", backend=B)
        == 1
    )
    assert value(m, f"{PREFIX}breaker_state", backend=B, state="closed") == 1
    # It can come back, counted from zero.
    m.request_done("/v1/completions", 200, A, ttft_s=0.1, tpot_s=0.01, e2e_s=1.0)
    assert (
        value(m, f"{PREFIX}requests_total", endpoint="/v1/completions", status="200", backend=A)
        == 1
    )


def test_two_routers_in_one_process_keep_their_own_series():
    one, two = RouterMetrics("fcfs"), RouterMetrics("laps")
    one.decision("dispatch")
    assert value(one, f"{PREFIX}decisions_total", kind="dispatch") == 1
    assert value(two, f"{PREFIX}decisions_total", kind="dispatch") is None
    assert value(two, f"{PREFIX}info", policy="fcfs", version=_version()) is None


def test_no_credential_of_a_backend_url_reaches_the_output():
    secret = "sk-TOPSECRET-123"
    url = f"https://router:{secret}@gpu-1.internal:8443/v1"
    m = RouterMetrics("laps")
    m.request_done("/v1/chat/completions", 200, url, ttft_s=0.1, tpot_s=0.01, e2e_s=1.0)
    m.inflight(url, 1)
    m.health(url, True, "closed")
    m.retry(url)
    body, content_type = m.render()
    assert secret.encode() not in body and b"router:" not in body
    assert b'backend="https://gpu-1.internal:8443/v1"' in body
    assert content_type.startswith("text/plain")
    assert backend_label(f"http://u:{secret}@[::1]:9000/?key={secret}#x") == "http://[::1]:9000/"
    assert backend_label("gpu-1") == "gpu-1"
    assert backend_label("") == "none"
    m.remove_backend(url)
    assert b"gpu-1.internal" not in m.render()[0]


def test_every_metric_is_named_with_the_prefix_and_listed_in_the_module_docstring():
    m = RouterMetrics("laps")
    body = m.render()[0].decode()
    names = set(re.findall(r"^# TYPE (\S+) ", body, flags=re.MULTILINE))
    names = {n for n in names if not n.endswith("_created")}  # prometheus_client's own
    assert len(names) == 14
    for name in names:
        assert name.startswith(PREFIX)
        listed = name if name in metrics_module.__doc__ else name.removesuffix("_total") + "_total"
        assert listed in metrics_module.__doc__, name


def _version() -> str:
    from traces.records import llmsched_version

    return llmsched_version()
