"""What the simulated router knows and does: prefix estimates, polled gauges, PD pairs, batch hints.

Each test runs a whole :class:`sim.loop.Simulation` and looks at what a
policy saw or what the engines did, as a user reading the records would.
"""

from __future__ import annotations

import pytest

from scheduler.policies.pd import PDPolicy
from scheduler.policy import BatchHint, ClusterView, Decisions, PDTarget, Policy, RequestLike
from scheduler.registry import create
from sim.loop import Simulation
from tests.unit.sim.fakes import AffineCost, make_limits, make_trace
from traces.errors import ConfigError


class Probe(Policy):
    """Sends every arrival to instance 0 and notes what the view said at each arrival."""

    name = "probe"

    def __init__(self, target=0) -> None:
        self.target = target
        self.seen: list[tuple[float, int, int, int]] = []

    def on_arrival(self, request: RequestLike, now_s: float, view: ClusterView) -> Decisions:
        inst = view.instance(0)
        self.seen.append(
            (now_s, inst.n_waiting, inst.outstanding, inst.cached_prefix_blocks(request))
        )
        return Decisions.dispatch(request, self.target)

    def reset(self) -> None:
        self.seen = []


def _shared_prefix_trace():
    # Three prompts with the same four 16-token blocks, arriving before the
    # first one's prefill can have finished (it takes >= 10 ms).
    hashes = [[11, 12, 13, 14]] * 3
    return make_trace(
        [0.0, 0.001, 0.002], [64, 64, 64], [4, 4, 4], prefix_hashes=hashes, block_tokens=16
    )


@pytest.mark.parametrize(
    ("knowledge", "expected"), [("estimate", [0, 4, 4]), ("oracle", [0, 0, 0])]
)
def test_prefix_knowledge_is_the_routers_record_unless_the_oracle_is_asked_for(knowledge, expected):
    """A router knows what it sent at once; the engine caches a prompt only once it is prefilled."""
    probe = Probe()
    Simulation(
        _shared_prefix_trace(), AffineCost(), probe, make_limits(), prefix_knowledge=knowledge
    ).run()
    assert [cached for *_, cached in probe.seen] == expected


def test_polled_gauges_are_brought_up_to_date_with_what_the_router_sent_since():
    trace = make_trace([0.0, 0.05, 0.1, 0.15, 0.2], [2000] * 5, [50] * 5)
    live, polled = Probe(), Probe()
    Simulation(trace, AffineCost(), live, make_limits()).run()
    result = Simulation(trace, AffineCost(), polled, make_limits(), poll_interval_s=1.0).run()
    # Polled once at t=0 (nothing waited then), the router counts what it sent since
    # and has seen no first token of, as the live router does: the one being
    # prefilled too, which the engine's own queue does not count.
    first = result.frame()["first_token_s"].to_numpy()
    arrivals = [t for t, *_ in polled.seen]
    unfirst = [sum(1 for j in range(i) if first[j] > t) for i, t in enumerate(arrivals)]
    assert [w for _, w, _, _ in polled.seen] == unfirst
    assert unfirst[1:] != [0, 0, 0, 0]
    assert all(p >= w for (_, p, _, _), (_, w, _, _) in zip(polled.seen, live.seen, strict=True))
    assert [o for _, _, o, _ in polled.seen] == [o for _, _, o, _ in live.seen]


def test_a_pd_pair_named_at_dispatch_counts_on_the_decode_instance_from_then():
    trace = make_trace([0.0, 0.001, 0.002, 0.003], [3000] * 4, [8] * 4)

    class Pairs(Policy):
        name = "pairs"

        def __init__(self) -> None:
            self.decode_outstanding: list[int] = []

        def on_arrival(self, request, now_s, view):
            self.decode_outstanding.append(view.instance(2).outstanding)
            return Decisions.dispatch(request, PDTarget(0, 2))

    policy = Pairs()
    frame = Simulation(trace, AffineCost(), policy, make_limits(), pd="1:2").run().frame()
    # The first prefill takes > 150 ms: every later arrival sees the earlier
    # ones counted on decode instance 2 already.
    assert policy.decode_outstanding == [0, 1, 2, 3]
    assert list(frame["decode_instance"]) == [2, 2, 2, 2]
    assert (frame["outcome"] == "ok").all()


@pytest.mark.parametrize("choice", ["handoff", "dispatch"])
def test_both_pd_flows_serve_everything_with_the_decode_rules_choice(choice):
    trace = make_trace([0.01 * i for i in range(12)], [500] * 12, [20] * 12)
    policy = PDPolicy(create("fcfs"), create("round_robin"), decode_choice=choice)
    frame = Simulation(trace, AffineCost(), policy, make_limits(), pd="1:3").run().frame()
    assert (frame["outcome"] == "ok").all()
    assert sorted(set(frame["decode_instance"])) == [1, 2, 3]
    if choice == "dispatch":
        # Round robin in arrival order, fixed when each request was sent.
        assert list(frame["decode_instance"]) == [1, 2, 3] * 4


class GroupOfFour(Policy):
    """Holds arrivals and releases every four as one batch hint to instance 0."""

    name = "group_of_four"

    def __init__(self) -> None:
        self.held: list = []

    def on_arrival(self, request, now_s, view):
        self.held.append(request)
        if len(self.held) < 4:
            return Decisions()
        run, self.held = tuple((r, 0) for r in self.held), []
        return Decisions(run, batches=(BatchHint(0, 4, padded_tokens=128, padded_batch=8),))

    def reset(self) -> None:
        self.held = []


@pytest.mark.parametrize("mode", ["graph", "group"])
def test_a_batch_hint_is_a_graph_prefill_or_a_group_released_together(mode):
    trace = make_trace([0.0, 0.001, 0.002, 0.003], [100, 90, 120, 64], [2] * 4)
    result = Simulation(trace, AffineCost(), GroupOfFour(), make_limits(), batch_hints=mode).run()
    steps = result.batches_frame()
    assert list(steps["n_prefill"]) == [4], "the group lands in one prefill step either way"
    if mode == "graph":
        assert steps["cuda_graph"].tolist() == [True]
        assert int(steps["shape_tokens"].iloc[0]) == 128 * 8
    else:
        # A stock engine: no captured graph, no padding, priced on the real tokens.
        assert steps["cuda_graph"].tolist() == [False]
        assert int(steps["shape_tokens"].iloc[0]) == 100 + 90 + 120 + 64


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("prefix_knowledge", "exact", "prefix_knowledge: expected one of estimate, oracle"),
        ("batch_hints", "cuda", "batch_hints: expected one of graph, group"),
        ("poll_interval_s", -1.0, "poll_interval_s: expected a number >= 0"),
    ],
)
def test_options_outside_their_choices_are_refused(option, value, message):
    trace = make_trace([0.0], [10], [1])
    with pytest.raises(ConfigError, match=message):
        Simulation(trace, AffineCost(), create("fcfs"), make_limits(), **{option: value})


@pytest.mark.parametrize(
    ("policy", "params"),
    [("round_robin", {}), ("least_load", {}), ("laps", {"mode": "temporal"})],
)
def test_an_instance_that_fails_gets_nothing_until_it_recovers(policy, params):
    trace = make_trace([0.01 * i for i in range(300)], [200] * 300, [10] * 300)
    sim = Simulation(trace, AffineCost(), create(policy, **params), make_limits(), instances=3)
    sim.schedule_health(1.0, 1, False)
    sim.schedule_health(2.0, 1, True)
    frame = sim.run().frame()
    assert (frame["outcome"] == "ok").all()
    down = frame[(frame["dispatch_s"] >= 1.0) & (frame["dispatch_s"] < 2.0)]
    assert len(down) > 50 and 1 not in set(down["instance"])
    assert 1 in set(frame.loc[frame["dispatch_s"] >= 2.0, "instance"])
    with pytest.raises(ConfigError, match="no instance 7"):
        sim.schedule_health(1.0, 7, False)


def test_laps_releases_the_same_however_late_the_gauges_are():
    """laps decides when an instance is ready from the router's own count, not a polled queue.

    A burst on two instances: with gauges read live or polled every 1 s, every
    request is sent at the same moment and gets the same first token. The
    rule that read the polled queue held the second batch on each instance
    until a poll or a first token, where the live queue let it go at once.
    """
    arrivals = [0.0005 * k for k in range(40)]
    prompts = [3000 if k % 5 == 0 else 200 for k in range(40)]
    trace = make_trace(arrivals, prompts, [20] * 40)
    frames = []
    for poll in (0.0, 1.0):
        policy = create("laps", window_ms=5.0, graph_buckets=False, threshold_tokens=1024)
        sim = Simulation(
            trace, AffineCost(), policy, make_limits(), instances=2, poll_interval_s=poll
        )
        frames.append(sim.run().frame().sort_values("request_id"))
    live, polled = frames
    assert live["dispatch_s"].tolist() == polled["dispatch_s"].tolist()
    assert live["first_token_s"].tolist() == polled["first_token_s"].tolist()
    # Not a run that never held anything: requests waited in the router.
    assert live["router_queue_s"].max() > 0.1
