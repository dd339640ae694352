"""``laps`` on several entry instances (auto mode, placement, the skew bound); lone releases."""

from __future__ import annotations

from scheduler.policies.laps import LapsPolicy
from tests.unit.scheduler.policy_fakes import FakeCluster, targets
from tests.unit.scheduler.test_laps import Inst, ids, prefill_view, r


def laps(**params) -> LapsPolicy:
    params.setdefault("graph_buckets", False)
    params.setdefault("window_ms", 0.0)
    return LapsPolicy(**params)


def busy_four(**kw) -> FakeCluster:
    """Four mixed instances that cannot take work now (one request queued on each)."""
    kw.setdefault("wtokens", 100)
    return FakeCluster([Inst(i, waiting=1, **kw) for i in range(4)])


def test_auto_mode_is_temporal_on_several_entry_instances_and_spatial_stays_on_request():
    view = FakeCluster([Inst(i) for i in range(4)])
    auto = laps()
    auto.on_arrival(r(1, 3000), 0.0, view)
    assert auto.split is None  # one dual queue per instance, no pools
    spatial = laps(mode="spatial")
    spatial.on_arrival(r(1, 3000), 0.0, view)
    assert spatial.split is not None and spatial.split.members(False) == [2, 3]


def test_an_idle_instance_takes_work_from_a_cache_holder_past_the_skew_bound():
    view = FakeCluster([Inst(i, running=30, blocks={9: 100}) for i in range(3)] + [Inst(3)])
    p = laps(max_skew_requests=16)
    # The session's prefix is on 0-2, but each has 30 more requests than 3.
    d = p.on_arrival(r(1, 40, session=9, history=1600), 0.0, view)
    assert targets(d) == [3]
    # Within the bound its cached prefix makes 1 the least backlog, though busier than 3.
    view[3].running = 20
    view[1].running = 25
    view[0].running = view[2].running = 40
    d = p.on_arrival(r(2, 40, session=9, history=1600), 0.1, view)
    assert targets(d) == [1]


class Prefilling(Inst):
    """An instance whose queue is empty while it still owes ``pending`` prefill tokens."""

    def __init__(self, instance_id: int, pending: int = 0, **kw):
        self.pending = pending
        super().__init__(instance_id, **kw)

    pending_prompt_tokens = property(lambda self: self.pending)


def test_an_instance_in_a_long_prefill_is_not_taken_for_an_idle_one():
    # Instance 0 prefills a 4,000-token prompt: its queue is empty, as on 1, but it owes
    # 4,000 tokens of prefill; 1 has two more requests, decoding. The long one goes to 1.
    view = FakeCluster([Prefilling(0, pending=4000, running=1), Prefilling(1, running=3)])
    assert targets(laps().on_arrival(r(1, 3000), 0.0, view)) == [1]
    # Counting queued tokens only (the gauge), 0 looks idle and takes it: it is
    # held for 0 until 0's prefill answers.
    queued = laps(backlog="queued")
    assert targets(queued.on_arrival(r(1, 3000), 0.0, view)) == []
    assert (queued.queues.count(0), queued.queues.count(1)) == (1, 0)
    # Once 0's prefill is done it is the less loaded one again.
    view[0].pending = 0
    assert targets(laps().on_arrival(r(2, 3000), 0.1, view)) == [0]


def test_affinity_placement_prefers_the_prefix_holder_within_the_bound():
    view = FakeCluster([Inst(0, running=10, wtokens=5000, blocks={9: 100}), Inst(1)])
    p = laps(placement="affinity", max_skew_requests=16)
    d = p.on_arrival(r(1, 40, session=9, history=1600), 0.0, view)
    # 10 more requests and 5,000 queued tokens: still within the bound. It is held
    # for 0, whose queue still owes those tokens a first token.
    assert targets(d) == [] and p.queues.count(0) == 1
    bounded = laps(placement="bounded")
    assert targets(bounded.on_arrival(r(1, 40, session=9, history=1600), 0.0, view)) == [1]


def test_affinity_is_the_default_and_follows_a_prefix_only_past_its_share_of_the_prompt():
    # Instance 0 holds 1,600 tokens of session 9 and owes 5,000; 1 is idle.
    view = FakeCluster([Inst(0, running=10, wtokens=5000, blocks={9: 100}), Inst(1)])
    p = laps()
    # 1,600 of a 1,640-token prompt cached there (98%, past 30%): held for the holder.
    assert targets(p.on_arrival(r(1, 40, session=9, history=1600), 0.0, view)) == []
    assert p.queues.count(0) == 1
    # 1,600 of 5,600 (29%): not worth the holder's queue; placed by backlog, on 1.
    assert targets(p.on_arrival(r(2, 4000, session=9, history=1600), 0.0, view)) == [1]
    # With a lower threshold the same request follows its prefix.
    low = laps(affinity_threshold=0.2)
    assert targets(low.on_arrival(r(2, 4000, session=9, history=1600), 0.0, view)) == []
    assert low.queues.count(0) == 1


def test_backlog_placement_is_the_old_rule_and_ignores_the_skew():
    view = FakeCluster([Inst(i, running=30, blocks={9: 100}) for i in range(3)] + [Inst(3)])
    p = laps(placement="backlog")
    # Its cached prefix makes 0 the least backlog; the 30 requests there do not count.
    d = p.on_arrival(r(1, 40, session=9, history=1600), 0.0, view)
    assert targets(d) == [0]


def test_a_burst_on_four_instances_spreads_and_the_skew_stays_bounded():
    # No cache anywhere: a burst held for four busy, equal instances goes round.
    view = busy_four()
    p = laps()
    for k in range(8):
        p.on_arrival(r(k, 100), 0.0, view)
    assert [p.queues.count(i) for i in range(4)] == [2, 2, 2, 2]
    # One session cached on instance 0 only: affinity takes it there, but no
    # more than the bound ahead of the least loaded.
    view = busy_four()
    view[0].blocks = {9: 100}
    p = laps(max_skew_requests=4)
    for k in range(40):
        p.on_arrival(r(k, 40, session=9, history=1600), 0.0, view)
    held = [p.queues.count(i) for i in range(4)]
    assert sum(held) == 40 and max(held) - min(held) <= 4 + 1
    assert held[0] == max(held)


def test_a_lone_short_request_on_a_ready_instance_goes_at_once():
    p = laps(window_ms=6.0, release_alone=True)
    assert ids(p.on_arrival(r(1, 50, 1.0), 1.0, prefill_view())) == [1]
    held = laps(window_ms=6.0)  # the default: the window holds it for later arrivals
    assert held.on_arrival(r(1, 50, 1.0), 1.0, prefill_view()).dispatches == ()


def test_the_window_still_holds_when_holding_can_form_a_batch():
    view = prefill_view(running=1)  # a prefill in progress: arrivals wait together
    p = laps(window_ms=6.0, release_alone=True)
    assert p.on_arrival(r(1, 50, 1.0), 1.0, view).dispatches == ()
    assert p.on_arrival(r(2, 60, 1.001), 1.001, view).dispatches == ()
    view[0].running = 0
    assert p.on_progress(0, 1.002, view).dispatches == ()  # two held: the window runs on
    assert ids(p.on_timer(1.006, view)) == [1, 2]
