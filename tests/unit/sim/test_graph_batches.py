"""Graph batches: a policy's BatchHint runs as one padded CUDA-graph prefill step, exactly."""

from __future__ import annotations

import numpy as np
import pytest

from scheduler.policy import NO_DECISIONS, BatchHint, ClusterView, Decisions, Policy, RequestLike
from sim.loop import simulate
from tests.unit.sim.fakes import AffineCost, make_limits, make_trace, random_trace

GRAPH_SAVING_S = 0.004


class GraphCost(AffineCost):
    """AffineCost whose CUDA-graph prefill skips ``GRAPH_SAVING_S`` of launch overhead."""

    def prefill_time_s(self, new_tokens, cached_tokens, *, cuda_graph=False):
        base = super().prefill_time_s(new_tokens, cached_tokens)
        return base - (GRAPH_SAVING_S if cuda_graph else 0.0)


COST = GraphCost(prefill_attn_s=1e-9)


class Scripted(Policy):
    """At each arrival time, dispatches the requests arriving then as the script says.

    ``script[i]`` is ``(hints, targets)`` for the i-th distinct arrival time: the
    arrivals at that time are dispatched together, in order, to ``targets``.
    """

    name = "scripted"

    def __init__(self, script):
        self.script = script
        self.reset()

    def reset(self):
        self.held: list[RequestLike] = []
        self.t: float | None = None
        self.k = 0

    def on_arrival(self, request, now_s, view):
        self.held.append(request)
        if self.t != now_s:
            self.t = now_s
            return Decisions(wake_at_s=now_s)
        return NO_DECISIONS

    def on_timer(self, now_s, view):
        hints, targets = self.script[self.k]
        self.k += 1
        out = tuple(zip(self.held, targets, strict=True))
        self.held = []
        return Decisions(out, None, tuple(hints))


def run(trace, script, **options):
    limits = options.pop("limits", make_limits())
    return simulate(trace, COST, Scripted(script), limits, debug=True, **options)


def test_a_hinted_group_runs_as_one_graph_step_priced_on_its_padded_shape():
    trace = make_trace([0.0] * 3, [20, 30, 50], [2, 2, 2])
    res = run(trace, [([BatchHint(0, 3, 64, 4)], [0, 0, 0])])
    first = res.columns.first_token_s
    expected = COST.prefill_time_s([64] * 4, [0] * 4, cuda_graph=True)
    np.testing.assert_allclose(first, expected)  # one step, padding paid, launch saved
    assert expected < COST.prefill_time_s([20, 30, 50], [0, 0, 0]) + COST.prefill_per_token_s * 156
    row = res.batches_frame().iloc[0]
    assert (row.n_prefill, row.prefill_tokens, row.shape_tokens, row.padding_tokens) == (
        3,
        100,
        256,
        156,
    )
    assert bool(row.cuda_graph) and (row.graph_batch, row.graph_tokens) == (4, 64)


def test_plain_requests_stop_before_a_group_and_the_group_runs_alone():
    # A (plain), B and C (a graph group), D (plain), all dispatched at t=0.
    trace = make_trace([0.0] * 4, [100, 40, 60, 80], [2, 2, 2, 2])
    res = run(trace, [([BatchHint(1, 2, 64, 2)], [0, 0, 0, 0])])
    b = res.batches_frame()
    assert list(b.n_prefill) == [1, 2, 1]
    assert list(b.cuda_graph) == [False, True, False]
    first = res.columns.first_token_s
    t_a = COST.prefill_time_s([100], [0])
    t_bc = COST.prefill_time_s([64, 64], [0, 0], cuda_graph=True)
    assert first[0] == pytest.approx(t_a)
    assert first[1] == first[2] == pytest.approx(t_a + t_bc)
    assert first[3] > first[2]


def test_a_member_longer_than_the_shape_makes_the_group_run_eagerly():
    trace = make_trace([0.0] * 2, [20, 50], [2, 2])
    res = run(trace, [([BatchHint(0, 2, 32, 2)], [0, 0])])
    row = res.batches_frame().iloc[0]
    assert (row.n_prefill, bool(row.cuda_graph), row.shape_tokens) == (2, False, 70)
    np.testing.assert_allclose(res.columns.first_token_s, COST.prefill_time_s([20, 50], [0, 0]))


@pytest.mark.parametrize(
    "limits", [make_limits(max_total_tokens=300), make_limits(max_running_requests=2)]
)
def test_a_group_that_cannot_be_admitted_whole_runs_eagerly_and_its_rest_becomes_plain(limits):
    trace = make_trace([0.0] * 3, [120, 120, 120], [1, 1, 1])
    res = run(trace, [([BatchHint(0, 3, 128, 4)], [0, 0, 0])], limits=limits)
    b = res.batches_frame()
    assert list(b.n_prefill) == [2, 1]
    assert not b.cuda_graph.any()
    assert res.summary()["n_completed"] == 3


def test_hints_are_ignored_under_mixed_chunk():
    trace = make_trace([0.0] * 3, [20, 30, 50], [2, 2, 2])
    res = run(trace, [([BatchHint(0, 3, 64, 4)], [0, 0, 0])], limits=make_limits(mixed_chunk=True))
    assert not res.batches_frame().cuda_graph.any()


@pytest.mark.parametrize(
    ("hints", "targets", "message"),
    [
        ([BatchHint(0, 2, 64, 2), BatchHint(1, 1, 64, 1)], [0, 0], "does not fit"),
        ([BatchHint(0, 3, 64, 2)], [0, 0], "does not fit"),
        ([BatchHint(0, 2, 64, 1)], [0, 0], "does not fit"),
        ([BatchHint(0, 2, 64, 2)], [0, 1], "different targets"),
    ],
)
def test_malformed_hints_are_reported(hints, targets, message):
    trace = make_trace([0.0] * 2, [20, 30], [2, 2])
    with pytest.raises(RuntimeError, match=message):
        run(trace, [(hints, targets)], instances=2)


class WindowGraphPolicy(Policy):
    """Holds arrivals for ``window_s``, then sends them to the least-loaded entry instance:
    prompts up to 512 tokens as one graph batch (padded to a power of two), the rest plain.
    """

    name = "window_graph"

    def __init__(self, window_s: float = 0.03) -> None:
        self.window_s = window_s
        self.reset()

    def reset(self) -> None:
        self.held: list[RequestLike] = []

    def on_arrival(self, request, now_s, view: ClusterView):
        self.held.append(request)
        return Decisions(wake_at_s=now_s + self.window_s) if len(self.held) == 1 else NO_DECISIONS

    def on_timer(self, now_s, view):
        target = min(view.pool("entry"), key=lambda v: v.load_key()).instance_id
        short = [r for r in self.held if r.prompt_tokens <= 512]
        rest = [r for r in self.held if r.prompt_tokens > 512]
        self.held = []
        hints = ()
        if short:
            pad = 1 << (max(r.prompt_tokens for r in short) - 1).bit_length()
            hints = (BatchHint(0, len(short), pad, 1 << (len(short) - 1).bit_length()),)
        return Decisions(tuple((r, target) for r in short + rest), None, hints)


CASES = {
    "chunked-preempt-prefix": dict(limits=dict(max_total_tokens=12000, chunked_prefill_size=512)),
    "no-chunking-preempt": dict(limits=dict(max_total_tokens=12000, chunked_prefill_size=0)),
    "mixed-chunk": dict(limits=dict(max_total_tokens=12000, mixed_chunk=True)),
    "pd": dict(limits=dict(max_total_tokens=12000), pd="2:2"),
    "three-instances": dict(limits=dict(max_total_tokens=30000), instances=3),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_fast_forward_stays_exact_with_graph_batches(case, seed):
    spec = CASES[case]
    limits = make_limits(max_running_requests=24, **spec["limits"])
    options = {k: v for k, v in spec.items() if k != "limits"}
    trace = random_trace(seed, max_prompt=1500)
    fast, slow = (
        simulate(trace, COST, WindowGraphPolicy(), limits, fast_forward=ff, debug=True, **options)
        for ff in (True, False)
    )
    for name in ("dispatch_s", "prefill_start_s", "first_token_s", "finish_s", "first_decode_s"):
        a, b = getattr(fast.columns, name), getattr(slow.columns, name)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-9, err_msg=name)
    for name in ("cached_tokens", "n_preemptions", "instance", "outcome"):
        np.testing.assert_array_equal(getattr(fast.columns, name), getattr(slow.columns, name))
    fb, sb = fast.batches_frame(), slow.batches_frame()
    for col in fb.columns:
        if col in ("start_s", "end_s"):
            np.testing.assert_allclose(fb[col], sb[col], rtol=0, atol=1e-9)
        else:
            np.testing.assert_array_equal(fb[col], sb[col], err_msg=col)
    assert fast.summary()["n_completed"] == 200
    if case != "mixed-chunk":
        assert fb.cuda_graph.sum() > 10  # the hints were used
    else:
        assert not fb.cuda_graph.any()


def test_batches_frame_lists_every_prefill_step_with_its_tokens():
    trace = random_trace(4, n=60)
    res = simulate(trace, COST, WindowGraphPolicy(), make_limits(), debug=True)
    b = res.batches_frame()
    assert len(b) > 0 and (b.end_s > b.start_s).all()
    computed = res.prompt_tokens.sum() - res.columns.cached_tokens.sum()
    assert b.prefill_tokens.sum() == computed  # no preemption: every prompt token once
    assert (b.padding_tokens[~b.cuda_graph] == 0).all()
    assert (b.padding_tokens[b.cuda_graph] >= 0).all()
    graph = b[b.cuda_graph]
    assert len(graph) > 0
    assert (graph.shape_tokens == graph.graph_batch * graph.graph_tokens).all()
