"""The simulated cluster's views: prefix estimate or oracle, polled gauges, health.

The engines are stepped here by hand (no loop), so each test sees the views
exactly between dispatches and steps.
"""

from __future__ import annotations

import pytest

from sim.cluster import Cluster
from sim.inflight import SimRequest
from tests.unit.sim.fakes import AffineCost, make_limits
from traces.errors import ConfigError
from traces.generator import generate, preset


class Hand:
    """Steps every engine of a cluster by hand, up to a time, one step at a time."""

    def __init__(self, **options) -> None:
        self.now = 0.0
        self.cluster = Cluster(
            AffineCost(),
            make_limits(**options.pop("limits", {})),
            options.pop("roles", ("mixed",) * 2),
            lambda: self.now,
            fast_forward=False,
            **options,
        )
        self.ends: list[float | None] = [None] * len(self.cluster.engines)

    def advance(self, t: float) -> None:
        """Run every step that ends by ``t``; start the next ones."""
        while True:
            due = [(end, i) for i, end in enumerate(self.ends) if end is not None and end <= t]
            if not due:
                break
            end, i = min(due)
            self.now = end
            self.cluster.engines[i].end()
            self._begin(i)
        self.now = t

    def dispatch(self, req: SimRequest, instance_id: int) -> None:
        self.cluster.engines[instance_id].enqueue(req, self.now)
        self.cluster.note_dispatch(instance_id, req, self.now)
        if self.ends[instance_id] is None:
            self._begin(instance_id)

    def _begin(self, i: int) -> None:
        d = self.cluster.engines[i].begin(self.now)
        self.ends[i] = None if d is None else self.now + d


def sim_request(row: int, r) -> SimRequest:
    hashes = None if r.prefix_hashes is None else list(r.prefix_hashes)
    return SimRequest(
        row,
        r.request_id,
        r.arrival_s,
        r.prompt_tokens,
        r.output_tokens,
        r.session_id,
        hashes,
        r.block_tokens,
    )


def api_answers(knowledge: str, *, total_tokens: int) -> list[tuple[int, int]]:
    """On requests sharing four system prompts, sent round-robin: per arrival,
    (the view's answer, the engine's exact cache)."""
    trace = generate(preset("api", n_requests=150, seed=3, rate_rps=40.0))
    hand = Hand(prefix_knowledge=knowledge, limits={"max_total_tokens": total_tokens})
    out = []
    for row, r in enumerate(trace):
        hand.advance(r.arrival_s)
        req = sim_request(row, r)
        target = row % 2
        view = hand.cluster.view.instance(target)
        engine = hand.cluster.engines[target]
        out.append((view.cached_prefix_blocks(req), engine.cached_prefix_blocks(req, hand.now)))
        hand.dispatch(req, target)
    return out


def test_estimate_and_oracle_both_answer_on_shared_prompts_and_the_estimate_is_the_routers():
    oracle = api_answers("oracle", total_tokens=200_000)
    assert all(view == exact for view, exact in oracle)  # the oracle is the engine
    assert any(exact > 0 for _, exact in oracle)  # system prompts hit
    estimate = api_answers("estimate", total_tokens=200_000)
    assert [exact for _, exact in estimate] == [exact for _, exact in oracle]
    # With room to spare, the record agrees with the cache on most arrivals...
    agree = sum(view == exact for view, exact in estimate)
    assert 0.75 * len(estimate) <= agree < len(estimate)
    # ... and where it differs it is ahead: it counts a prompt from its dispatch
    # on, while the engine caches it once prefilled (a queue builds here).
    assert all(view >= exact for view, exact in estimate)


def test_a_small_cache_evicts_what_the_record_still_counts():
    roomy = api_answers("estimate", total_tokens=200_000)
    tight = api_answers("estimate", total_tokens=12_000)
    over = sum(view > exact for view, exact in tight)
    assert over > sum(view > exact for view, exact in roomy)


def test_the_record_counts_a_prompt_from_its_dispatch_the_engine_once_prefilled():
    hand = Hand()
    first = SimRequest(0, 0, 0.0, 64, 4, None, [1, 2, 3, 4], 16)
    again = SimRequest(1, 1, 0.001, 64, 4, None, [1, 2, 3, 4], 16)
    hand.dispatch(first, 0)
    hand.advance(0.001)
    assert hand.cluster.view.instance(0).cached_prefix_blocks(again) == 4
    assert hand.cluster.engines[0].cached_prefix_blocks(again, hand.now) == 0
    assert hand.cluster.view.instance(1).cached_prefix_blocks(again) == 0


def test_polled_gauges_are_the_last_poll_brought_up_to_date_with_what_was_sent_since():
    hand = Hand(poll_interval_s=0.5)
    view = hand.cluster.view.instance(0)
    assert hand.cluster.poll(0.0) == pytest.approx(0.5)
    for i in range(3):
        hand.dispatch(SimRequest(i, i, 0.0, 3000, 20), 0)
    hand.advance(0.001)
    # The poll saw an empty engine; the three sent since have no first token: waiting.
    assert (view.n_waiting, view.waiting_tokens, view.n_running, view.kv_used_tokens) == (
        3,
        9000,
        0,
        0,
    )
    assert view.outstanding == 3
    assert view.inflight_tokens == 3 * 3020
    hand.cluster.poll(hand.now)
    # Now as the engine is: one prefilling (running), two queued.
    assert (view.n_waiting, view.n_running) == (2, 1) and view.kv_used_tokens > 0
    for req in list(hand.cluster.engines[0].running.values()):
        view.note_first(req.prompt_tokens)
    assert view.n_waiting == 2  # the first token took one off what was sent, not the queue
    live = Hand()
    assert live.cluster.poll(0.0) is None  # interval 0: gauges read live, nothing to schedule


def test_an_unhealthy_instance_says_so_and_its_prefix_record_is_forgotten():
    hand = Hand()
    req = SimRequest(0, 0, 0.0, 64, 4, None, [1, 2, 3, 4], 16)
    hand.dispatch(req, 1)
    view = hand.cluster.view.instance(1)
    hand.cluster.set_healthy(1, False)
    assert not view.healthy and view.cached_prefix_blocks(req) == 0
    assert [v.healthy for v in hand.cluster.view.pool("entry")] == [True, False]
    hand.cluster.set_healthy(1, True)
    assert view.healthy


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("prefix_knowledge", "exact", "prefix_knowledge: expected one of estimate, oracle"),
        ("poll_interval_s", -1.0, "poll_interval_s: expected a number >= 0"),
    ],
)
def test_bad_view_options_are_refused(option, value, message):
    with pytest.raises(ConfigError, match=message):
        Hand(**{option: value})
