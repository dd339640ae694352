"""The batch window and the policy's prefill queue: when a short batch is due."""

from __future__ import annotations

import math

import pytest

from scheduler.batch_window import BatchWindow, Held, PrefillQueue, slack_deadline_s
from tests.unit.scheduler.policy_fakes import req
from traces.errors import ConfigError
from traces.request import Request


def held(i: int, at_s: float, tokens: int = 50, deadline_s: float = math.inf) -> Held:
    return Held(req(i, tokens, arrival_s=at_s), at_s, tokens, 0, deadline_s)


def test_queue_is_first_in_first_out_and_counts_tokens():
    q = PrefillQueue()
    for i in range(4):
        q.push(held(i, 0.1 * i, tokens=10 * (i + 1)))
    assert len(q) == 4 and q.tokens == 100
    assert q.oldest_wait_s(1.0) == pytest.approx(1.0)
    assert [h.request.request_id for h in q.take(3)] == [0, 1, 2]
    assert q.tokens == 40 and q.peek().request.request_id == 3
    q.clear()
    assert not q and q.tokens == 0 and q.oldest_wait_s(5.0) == 0.0


def test_a_batch_is_due_when_the_oldest_has_waited_the_window():
    w = BatchWindow(0.006, 8)
    q = PrefillQueue()
    assert w.due_at_s(q) is None
    q.push(held(0, 1.000))
    q.push(held(1, 1.004))
    assert w.due_at_s(q) == pytest.approx(1.006)
    assert not w.is_due(q, 1.0059)
    assert w.is_due(q, 1.006)
    assert [h.request.request_id for h in w.take(q)] == [0, 1]


def test_max_batch_waiting_makes_a_batch_due_at_once_and_caps_it():
    w = BatchWindow(0.006, 3)
    q = PrefillQueue()
    for i in range(2):
        q.push(held(i, 1.0))
    assert not w.is_due(q, 1.0)
    for i in range(2, 5):
        q.push(held(i, 1.0))
    assert w.is_due(q, 1.0)
    assert len(w.take(q)) == 3 and len(q) == 2


def test_a_request_whose_slack_runs_out_releases_the_batch_early():
    # SLO 50 ms, estimated prefill 20 ms: the slack is gone 30 ms after arrival,
    # before a 40 ms window would end.
    r = Request(request_id=7, arrival_s=2.0, prompt_tokens=50, output_tokens=5)
    deadline = slack_deadline_s(r, 0.050, 0.020)
    assert deadline == pytest.approx(2.030)
    w = BatchWindow(0.040, 64)
    q = PrefillQueue()
    q.push(held(1, 2.0))
    q.push(Held(r, 2.0, 50, 0, deadline))
    assert w.due_at_s(q) == pytest.approx(2.030)
    assert not w.is_due(q, 2.029) and w.is_due(q, 2.030)


def test_the_request_own_slo_wins_and_no_slo_means_no_deadline():
    own = Request(request_id=1, arrival_s=1.0, prompt_tokens=5, output_tokens=1, slo_ttft_s=0.1)
    assert slack_deadline_s(own, 0.4, 0.02) == pytest.approx(1.08)
    plain = Request(request_id=2, arrival_s=1.0, prompt_tokens=5, output_tokens=1)
    assert slack_deadline_s(plain, None, 0.02) == math.inf


def test_window_zero_is_a_plain_dual_queue():
    w = BatchWindow(0.0, 64)
    q = PrefillQueue()
    q.push(held(0, 3.0))
    assert w.is_due(q, 3.0)


@pytest.mark.parametrize(
    ("window_s", "max_batch", "message"),
    [(-0.001, 8, "window_s: expected a number >= 0"), (0.005, 0, "max_batch: expected an integer")],
)
def test_bad_window_parameters_are_refused(window_s, max_batch, message):
    with pytest.raises(ConfigError, match=message):
        BatchWindow(window_s, max_batch)
