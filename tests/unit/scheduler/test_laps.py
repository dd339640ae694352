"""``laps`` decisions on hand-made scenarios: which request goes where, and when."""

from __future__ import annotations

import pytest

from scheduler import registry
from scheduler.policies.laps import LapsPolicy
from scheduler.policies.laps_temporal import READY_POLL_S
from scheduler.policies.pd import PDPolicy
from scheduler.policy import NO_DECISIONS, BatchHint
from scheduler.routing import HOLD_RETRY_S
from tests.unit.scheduler.policy_fakes import FakeCluster, FakeInstance, targets
from traces.errors import ConfigError
from traces.request import Request


class Inst(FakeInstance):
    """A fake instance with queued tokens and a prefix cache of ``blocks[session]`` blocks."""

    def __init__(self, instance_id: int, role: str = "mixed", **kw):
        self.wtokens = kw.pop("wtokens", 0)
        self.blocks: dict[int, int] = kw.pop("blocks", {})
        super().__init__(instance_id, role, **kw)

    waiting_tokens = property(lambda self: self.wtokens)

    def cached_prefix_blocks(self, request) -> int:
        return self.blocks.get(request.prefix_hashes[0], 0) if request.prefix_hashes else 0


def r(i: int, new: int, at: float = 0.0, *, session: int | None = None, history: int = 0, slo=None):
    """A request of ``history`` cached-able tokens (16-token blocks of ``session``) + ``new``."""
    prompt = history + new
    hashes = None
    if session is not None:
        hashes = tuple([session] * (-(-prompt // 16)))
    return Request(
        request_id=i,
        arrival_s=at,
        prompt_tokens=prompt,
        output_tokens=10,
        prefix_hashes=hashes,
        block_tokens=16 if hashes else None,
        slo_ttft_s=slo,
    )


def ids(decisions) -> list[int]:
    return [req.request_id for req, _ in decisions.dispatches]


def prefill_view(**kw) -> FakeCluster:
    """One prefill instance (id 0) and one decode instance: the PD layout."""
    return FakeCluster([Inst(0, "prefill", **kw), Inst(1, "decode")])


def temporal(**params) -> LapsPolicy:
    params.setdefault("graph_buckets", False)
    return LapsPolicy(**params)


# -- temporal -------------------------------------------------------------------------


def test_short_requests_go_before_an_earlier_long_one_when_the_instance_frees_up():
    view = prefill_view(running=1)  # a prefill is in progress
    p = temporal()
    assert p.on_arrival(r(1, 2000), 0.00, view).dispatches == ()
    assert p.on_arrival(r(2, 100, 0.01), 0.01, view).dispatches == ()
    assert p.on_arrival(r(3, 200, 0.02), 0.02, view).dispatches == ()
    view[0].running = 0  # the step ended and its requests were handed off
    d = p.on_progress(0, 0.10, view)
    assert ids(d) == [2, 3] and set(targets(d)) == {0}
    view[0].running = 2
    assert p.on_progress(0, 0.12, view).dispatches == ()  # busy: nothing more
    view[0].running = 0
    assert ids(p.on_progress(0, 0.15, view)) == [1]


def test_long_requests_go_together_up_to_long_batch_tokens_when_no_short_one_is_held():
    view = prefill_view()
    p = temporal()  # long_batch_tokens 8192: two 3,000-token prompts fit, a third does not
    assert ids(p.on_arrival(r(1, 3000), 0.0, view)) == [1]
    view[0].running = 1
    for i in (2, 3, 4):
        p.on_arrival(r(i, 3000, 0.1 * i), 0.1 * i, view)
    view[0].running = 0
    assert ids(p.on_progress(0, 0.5, view)) == [2, 3]
    assert ids(p.on_progress(0, 0.6, view)) == [4]


def test_long_requests_go_one_at_a_time_with_long_batch_tokens_zero():
    view = prefill_view()
    p = temporal(long_batch_tokens=0)
    assert ids(p.on_arrival(r(1, 3000), 0.0, view)) == [1]
    view[0].running = 1
    p.on_arrival(r(2, 3000, 0.1), 0.1, view)
    p.on_arrival(r(3, 3000, 0.2), 0.2, view)
    view[0].running = 0
    assert ids(p.on_progress(0, 0.5, view)) == [2]


def test_a_long_request_released_by_aging_takes_no_later_long_one_past_the_short_queue():
    view = prefill_view(running=1)
    p = temporal(max_wait_ms=100.0, window_ms=0.0)
    p.on_arrival(r(1, 3000, 0.0), 0.0, view)  # ranks as if at 0.1
    p.on_arrival(r(2, 3000, 0.5), 0.5, view)  # ranks as if at 0.6
    p.on_arrival(r(3, 100, 0.3), 0.3, view)  # short, at 0.3: between the two
    view[0].running = 0
    assert ids(p.on_progress(0, 0.7, view)) == [1]  # 2 would overtake the short request
    assert ids(p.on_progress(0, 0.8, view)) == [3]
    assert ids(p.on_progress(0, 0.9, view)) == [2]


def test_the_window_holds_a_short_request_on_an_idle_instance_then_a_timer_releases_it():
    view = prefill_view()
    p = temporal(window_ms=6.0, release_alone=False)
    d = p.on_arrival(r(1, 50, 1.0), 1.0, view)
    assert d.dispatches == () and d.wake_at_s == pytest.approx(1.006)
    # A second short request joins; the timer asked for stays the one pending.
    assert p.on_arrival(r(2, 60, 1.003), 1.003, view) is NO_DECISIONS
    assert ids(p.on_timer(1.006, view)) == [1, 2]


def test_max_batch_waiting_releases_at_once_and_window_zero_never_holds():
    view = prefill_view()
    p = temporal(window_ms=6.0, max_batch=2, release_alone=False)
    assert p.on_arrival(r(1, 50), 0.0, view).dispatches == ()
    assert ids(p.on_arrival(r(2, 50), 0.001, view)) == [1, 2]
    plain = temporal(window_ms=0.0)
    assert ids(plain.on_arrival(r(3, 50), 0.0, prefill_view())) == [3]


def test_a_request_short_of_slack_ends_the_window_early():
    view = prefill_view()
    p = temporal(window_ms=50.0, release_alone=False)
    d = p.on_arrival(r(1, 50, 2.0), 2.0, view)
    assert d.wake_at_s == pytest.approx(2.05)
    # 20 ms TTFT SLO: its slack (no cost model: estimated prefill 0) runs out at 2.02.
    d = p.on_arrival(r(2, 50, 2.001, slo=0.02), 2.001, view)
    assert d.wake_at_s == pytest.approx(2.021)
    assert ids(p.on_timer(2.021, view)) == [1, 2]


def test_slack_counts_the_estimated_prefill_time_from_the_cost_model():
    from scheduler.cost_model import CostModel

    cm = CostModel.from_names("qwen2.5-32b", "h200")
    p = temporal(window_ms=50.0, slo_ttft_ms=30.0, release_alone=False)
    p.use_cost_model(cm)
    d = p.on_arrival(r(1, 100, 0.0), 0.0, prefill_view())
    assert d.wake_at_s == pytest.approx(0.030 - cm.prefill_time_s([100], [0]))


def test_starvation_bound_a_long_request_ranks_as_if_it_arrived_max_wait_later():
    view = prefill_view(running=1)
    p = temporal(max_wait_ms=400.0, window_ms=0.0)
    p.on_arrival(r(1, 3000, 0.0), 0.0, view)
    p.on_arrival(r(2, 50, 0.35), 0.35, view)
    view[0].running = 0
    assert ids(p.on_progress(0, 0.5, view)) == [2]  # arrived within 400 ms of the long one
    view[0].running = 1
    p.on_arrival(r(3, 50, 0.45), 0.45, view)
    view[0].running = 0
    assert ids(p.on_progress(0, 0.9, view)) == [1]  # the short one arrived 450 ms after it
    assert ids(p.on_progress(0, 1.2, view)) == [3]


def test_a_busy_instance_is_polled_whatever_its_role():
    p = temporal()
    mixed = FakeCluster([Inst(0, "mixed", waiting=2, wtokens=100)])
    d = p.on_arrival(r(1, 50, 0.0), 0.0, mixed)
    assert d.dispatches == () and d.wake_at_s == pytest.approx(READY_POLL_S)
    # A prefill instance reports its steps' ends, but a polled gauge can turn
    # idle with no report: it is polled too, and the poll releases the work.
    q = temporal(window_ms=0.0)
    view = prefill_view(running=3)
    d = q.on_arrival(r(1, 50, 0.0), 0.0, view)
    assert d.dispatches == () and d.wake_at_s == pytest.approx(READY_POLL_S)
    view[0].running = 0
    assert ids(q.on_timer(READY_POLL_S, view)) == [1]


def test_released_short_batches_carry_graph_hints():
    view = prefill_view(running=1)
    p = LapsPolicy(window_ms=0.0)
    for i, n in enumerate((60, 62, 58, 64)):
        p.on_arrival(r(i, n), 0.0, view)
    view[0].running = 0
    d = p.on_progress(0, 0.05, view)
    assert sorted(ids(d)) == [0, 1, 2, 3]
    assert d.batches == (BatchHint(0, 4, 64, 4),)


def test_short_and_long_are_told_apart_by_uncached_tokens():
    # A 2,000-token conversation whose history the instance holds is a short prefill.
    view = prefill_view(running=1, blocks={7: 120})
    p = temporal()
    p.on_arrival(r(1, 80, session=7, history=1920), 0.0, view)
    p.on_arrival(r(2, 2000), 0.0, view)
    view[0].running = 0
    assert ids(p.on_progress(0, 0.1, view)) == [1]


# -- spatial --------------------------------------------------------------------------


def four() -> FakeCluster:
    return FakeCluster([Inst(i) for i in range(4)])


def spatial(**params) -> LapsPolicy:
    params.setdefault("mode", "spatial")
    params.setdefault("graph_buckets", False)
    params.setdefault("window_ms", 0.0)
    return LapsPolicy(**params)


def test_spatial_sends_long_requests_to_the_long_pool_at_once_and_short_ones_to_the_short():
    view = four()
    view[2].wtokens = 5000
    p = spatial()
    d = p.on_arrival(r(1, 3000), 0.0, view)
    assert ids(d) == [1] and targets(d) == [3]  # long pool {2, 3}; 2 has a backlog
    d = p.on_arrival(r(2, 100), 0.0, view)
    assert targets(d) == [0]  # short pool {0, 1}: tie, lower id
    assert p.split is not None and p.split.members(True) == [0, 1]


def test_spatial_follows_the_cache_a_short_pool_instance_holds():
    view = four()
    view[1].blocks = {9: 100}
    view[3].blocks = {9: 100}
    p = spatial()
    d = p.on_arrival(r(1, 40, session=9, history=1600), 0.0, view)
    assert targets(d) == [1]  # short on instance 1 (its cache), long on 0
    view[1].blocks = {}
    d = p.on_arrival(r(2, 40, session=9, history=1600), 0.0, view)
    assert targets(d) == [3]  # long on the short pool: to the long pool, where 3 holds it


def test_rebalancing_moves_one_instance_per_period_after_it_drains_and_keeps_one_per_pool():
    view = four()
    for i in (2, 3):
        view[i].running = 100  # the long pool is busy
    p = spatial(rebalance_period_s=10.0, rebalance_ratio=2.0, rebalance_min_requests=16)
    p.on_arrival(r(1, 50), 0.0, view)
    split = p.split
    assert split is not None and not split.draining  # the first period only observes
    view[0].running, view[1].running = 12, 10
    view[1].waiting = 1
    p.on_arrival(r(2, 50), 10.0, view)
    assert split.draining == {1: False}  # the short pool's least loaded instance
    # While draining it takes no new short request.
    d = p.on_arrival(r(3, 50), 10.5, view)
    assert 1 not in targets(d)
    view[1].waiting = 0
    p.on_progress(1, 11.0, view)
    assert split.is_short[1] is False and split.moves == [(11.0, 1, False)]
    # Cool-down: no second move before 20 s, and the short pool keeps its last instance.
    p.on_arrival(r(4, 50), 15.0, view)
    assert not split.draining
    p.on_arrival(r(5, 50), 30.0, view)
    assert not split.draining and split.members(True) == [0]


def test_hysteresis_needs_both_the_ratio_and_the_absolute_margin():
    view = four()
    p = spatial(rebalance_period_s=1.0, rebalance_ratio=2.0, rebalance_min_requests=16)
    p.on_arrival(r(1, 3000), 0.0, view)
    for i in (2, 3):
        view[i].running = 12  # 3x the short pool's 4, but only 8 more
    view[0].running = view[1].running = 4
    p.on_arrival(r(2, 3000), 2.0, view)
    assert p.split is not None and not p.split.draining
    for i in (2, 3):
        view[i].running = 30  # 7x and 26 more
    p.on_arrival(r(3, 3000), 3.0, view)
    assert p.split.draining == {0: False}


# -- registry, PD, parameters ----------------------------------------------------------


def test_laps_is_registered_with_documented_parameters_and_composes_with_pd():
    params = {row.param: row for row in registry.describe("laps")}
    for name in ("threshold_tokens", "window_ms", "max_wait_ms", "max_padding_ratio"):
        assert params[name].help and params[name].source
    assert params["window_ms"].default == 6.0 and params["window_ms"].unit == "ms"
    pd = registry.create_pd("laps", "round_robin", prefill_params={"window_ms": "0"})
    assert isinstance(pd, PDPolicy) and pd.name == "laps+round_robin"
    view = prefill_view()
    assert targets(pd.on_arrival(r(1, 50), 0.0, view)) == [0]


def test_adaptive_threshold_takes_the_cost_model_from_model_and_gpu():
    p = registry.create("laps", threshold_mode="adaptive", model="qwen2.5-32b", gpu="h200")
    assert p.classifier.threshold_for(0) == p.cost.prefill_crossover_tokens(0)
    with pytest.raises(ConfigError, match="adaptive threshold needs a cost model"):
        registry.create("laps", threshold_mode="adaptive")
    with pytest.raises(ConfigError, match="model and gpu: set both or neither"):
        registry.create("laps", model="qwen2.5-32b")
    with pytest.raises(ConfigError, match="graph_lengths: expected positive, strictly increasing"):
        registry.create("laps", graph_lengths="64,32")
    with pytest.raises(ConfigError, match="spatial mode needs at least 2 entry instances"):
        registry.create("laps", mode="spatial").on_arrival(r(1, 50), 0.0, prefill_view())


def test_reset_forgets_held_requests():
    view = prefill_view(running=1)
    p = temporal()
    p.on_arrival(r(1, 50), 0.0, view)
    p.reset()
    view[0].running = 0
    assert p.on_progress(0, 0.1, view) is NO_DECISIONS


# -- failure and change -----------------------------------------------------------------


class Members(FakeCluster):
    """A cluster whose instances may leave: a departed id is unknown to the view."""

    def __init__(self, instances) -> None:
        super().__init__(instances)
        self.gone: set[int] = set()

    instances = property(
        lambda self: [i for i in self._instances if i.instance_id not in self.gone]
    )

    def pool(self, name):
        return [i for i in super().pool(name) if i.instance_id not in self.gone]

    def instance(self, instance_id):
        if instance_id in self.gone:
            raise KeyError(instance_id)
        return self._instances[instance_id]


def two_prefill(**kw) -> FakeCluster:
    return FakeCluster([Inst(0, "prefill", **kw), Inst(1, "prefill", **kw), Inst(2, "decode")])


@pytest.mark.parametrize("report", [True, False], ids=["on_health", "next_arrival"])
def test_work_held_for_an_instance_that_fails_moves_to_another_and_keeps_its_age(report):
    view = two_prefill(running=1)
    p = temporal(mode="temporal")
    assert p.on_arrival(r(1, 100), 0.0, view).dispatches == ()
    assert p.queues.count(0) == 1
    view[0].is_healthy = False
    if report:
        assert p.on_health(0, False, 0.05, view).dispatches == ()
    else:
        p.on_arrival(r(2, 120, 0.05), 0.05, view)
    assert p.queues.count(0) == 0
    assert p.queues.short[1].peek().request.request_id == 1
    assert p.queues.short[1].peek().enqueued_s == 0.0  # its window and age run on
    view[1].running = 0
    assert ids(p.on_progress(1, 0.1, view))[0] == 1


def test_with_no_healthy_entry_instance_laps_parks_in_order_and_retries_on_a_timer():
    view = prefill_view()
    view[0].is_healthy = False
    p = temporal()
    d = p.on_arrival(r(1, 100), 0.0, view)
    assert d.dispatches == () and d.wake_at_s == pytest.approx(HOLD_RETRY_S)
    assert p.on_arrival(r(2, 3000, 0.01), 0.01, view).dispatches == ()
    assert p.n_parked == 2
    d = p.on_timer(HOLD_RETRY_S, view)  # still down: ask again
    assert d.dispatches == () and d.wake_at_s == pytest.approx(2 * HOLD_RETRY_S)
    view[0].is_healthy = True
    assert ids(p.on_timer(2 * HOLD_RETRY_S, view)) == [1]  # the short one, then the long one
    assert p.n_parked == 0
    assert ids(p.on_progress(0, 0.2, view)) == [2]


def test_spatial_parks_too_when_every_entry_instance_is_down():
    view = four()
    for i in range(4):
        view[i].is_healthy = False
    p = spatial()
    assert p.on_arrival(r(1, 3000), 0.0, view).dispatches == ()
    view[3].is_healthy = True
    assert targets(p.on_health(3, True, 0.01, view)) == [3]


def test_spatial_long_requests_go_to_the_short_pool_when_the_long_pool_is_down():
    view = four()
    view[2].is_healthy = view[3].is_healthy = False
    p = spatial()
    d = p.on_arrival(r(1, 3000), 0.0, view)
    assert ids(d) == [1] and targets(d) == [0]


def test_spatial_takes_in_a_joining_instance_and_refills_a_pool_its_members_left():
    view = Members([Inst(i) for i in range(4)])
    p = spatial()
    p.on_arrival(r(1, 50), 0.0, view)
    split = p.split
    assert split is not None and split.members(True) == [0, 1]
    view._instances.append(Inst(4))
    for i in (2, 3):
        view[i].wtokens = 9000
    d = p.on_arrival(r(2, 3000), 0.1, view)
    assert split.is_short[4] is False and targets(d) == [4]  # the long pool's idle newcomer
    view.gone |= {0, 1}
    view[2].running = view[3].running = 5
    d = p.on_arrival(r(3, 50), 0.2, view)
    assert 0 not in split.is_short and 1 not in split.is_short
    assert split.draining == {4: True}  # the long pool's least loaded refills the short one
    assert targets(d) == [2]  # meanwhile a short request goes to the long pool, at once
    p.on_progress(4, 0.3, view)
    assert split.members(True) == [4]
    assert targets(p.on_arrival(r(4, 50), 0.4, view)) == [4]


def test_work_held_for_an_instance_that_leaves_is_placed_again():
    view = Members([Inst(0, "prefill", running=1), Inst(1, "prefill", running=1)])
    view._instances.append(Inst(2, "decode"))
    p = temporal(mode="temporal")
    p.on_arrival(r(1, 100), 0.0, view)
    assert p.queues.count(0) == 1
    view.gone.add(0)
    view[1].running = 0
    assert ids(p.on_timer(0.05, view)) == [1]
    assert 0 not in p.queues.short
