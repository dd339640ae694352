"""Trace transforms and the TraceTransforms options model, checked with numbers."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from traces.errors import ConfigError, TraceError
from traces.request import Request
from traces.trace import Trace
from traces.transforms import (
    TraceTransforms,
    cap_prompt,
    drop_failed,
    filter_log_type,
    filter_model,
    head,
    parse_window,
    sample,
    scale_to_rate,
    time_scale,
    window,
)

API, CONV = "API log", "Conversation log"


def make_trace() -> Trace:
    """Five requests: two one-shot, a two-turn session s1, a one-turn session s2."""
    rows = [
        (0.0, 10, 5, None, "ChatGPT", API, False, (1, 2)),
        (1.0, 20, 0, "s1", "GPT-4", CONV, True, (3, 4, 5, 6, 7)),
        (2.5, 8, 3, "s1", "GPT-4", CONV, False, (3, 4)),
        (4.0, 40, 7, None, "ChatGPT", API, False, None),
        (10.0, 12, 2, "s2", "ChatGPT", CONV, False, (8, 9, 10)),
    ]
    return Trace.from_requests(
        (
            Request(
                request_id=i,
                arrival_s=a,
                prompt_tokens=p,
                output_tokens=o,
                session_id=s,
                model=m,
                log_type=lt,
                failed=f,
                prefix_hashes=h,
                block_tokens=None if h is None else 4,
            )
            for i, (a, p, o, s, m, lt, f, h) in enumerate(rows)
        ),
        name="hand",
    )


def ids(trace: Trace) -> list[int]:
    return trace.frame["request_id"].tolist()


def arrivals(trace: Trace) -> list[float]:
    return trace.arrival_s.tolist()


def test_window_keeps_the_half_open_range_and_shifts_it_to_zero() -> None:
    trace = make_trace()
    out = window(trace, 1.0, 4.0)
    assert ids(out) == [1, 2]
    assert arrivals(out) == [0.0, 1.5]
    assert out.origin_s == 1.0
    assert out.name == "hand"
    assert arrivals(trace) == [0.0, 1.0, 2.5, 4.0, 10.0]  # input untouched


def test_window_rejects_an_empty_range() -> None:
    with pytest.raises(ConfigError, match="window_s"):
        window(make_trace(), 3.0, 3.0)


def test_time_scale_multiplies_arrivals_and_span() -> None:
    out = time_scale(make_trace(), 0.5)
    assert arrivals(out) == [0.0, 0.5, 1.25, 2.0, 5.0]
    assert out.span_s == 5.0
    with pytest.raises(ConfigError, match="time_scale"):
        time_scale(make_trace(), -2.0)


def test_scale_to_rate_sets_rows_per_span() -> None:
    out = scale_to_rate(make_trace(), 2.0)
    assert len(out) / out.span_s == pytest.approx(2.0)
    assert arrivals(out) == pytest.approx([0.0, 0.25, 0.625, 1.0, 2.5])
    with pytest.raises(ConfigError, match="rate_rps"):
        scale_to_rate(make_trace(), 0.0)


def test_scale_to_rate_needs_a_span() -> None:
    single = head(make_trace(), 1)
    assert arrivals(scale_to_rate(single, 3.0)) == [0.0]
    same = make_trace().replace(head(make_trace(), 2).frame.assign(arrival_s=[1.0, 1.0]))
    with pytest.raises(TraceError, match="one instant"):
        scale_to_rate(same, 1.0)


def test_sample_keeps_an_exact_fraction_in_order_and_is_seeded() -> None:
    trace = make_trace()
    out = sample(trace, 0.4, seed=3)
    assert len(out) == 2
    assert set(ids(out)) <= set(range(5))
    assert arrivals(out) == sorted(arrivals(out))
    assert ids(sample(trace, 0.4, seed=3)) == ids(out)
    assert len({tuple(ids(sample(trace, 0.4, seed=s))) for s in range(20)}) > 1
    assert ids(sample(trace, 1.0)) == [0, 1, 2, 3, 4]
    with pytest.raises(ConfigError, match="sample"):
        sample(trace, 0.0)


def test_sample_by_session_keeps_conversations_whole() -> None:
    trace = make_trace()  # units: {0}, {1, 2} (s1), {3}, {4} (s2)
    with_s1 = 0
    for seed in range(30):
        kept = ids(sample(trace, 0.5, seed=seed, by_session=True))
        assert (1 in kept) == (2 in kept)
        assert len(kept) - (1 in kept) == 2  # round(0.5 * 4 units)
        with_s1 += 1 in kept
    assert 0 < with_s1 < 30


def test_filters_by_model_log_type_and_failure() -> None:
    trace = make_trace()
    assert ids(filter_model(trace, ["gpt-4"])) == [1, 2]
    assert ids(filter_model(trace, "ChatGPT")) == [0, 3, 4]
    assert ids(filter_log_type(trace, ["api"])) == [0, 3]
    assert ids(filter_log_type(trace, [CONV])) == [1, 2, 4]
    assert ids(drop_failed(trace)) == [0, 2, 3, 4]
    with pytest.raises(ConfigError, match="models"):
        filter_model(trace, [])


def test_cap_prompt_clips_tokens_and_hashes_to_whole_blocks() -> None:
    out = cap_prompt(make_trace(), 14)
    assert out.prompt_tokens.tolist() == [10, 14, 8, 14, 12]
    hashes = [r.prefix_hashes for r in out]
    assert hashes == [(1, 2), (3, 4, 5), (3, 4), None, (8, 9, 10)]
    assert make_trace()[1].prefix_hashes == (3, 4, 5, 6, 7)
    with pytest.raises(ConfigError, match="max_prompt_tokens"):
        cap_prompt(make_trace(), 0)


def test_head_takes_the_first_requests() -> None:
    assert ids(head(make_trace(), 2)) == [0, 1]
    assert len(head(make_trace(), 0)) == 0
    assert len(head(make_trace(), 99)) == 5
    with pytest.raises(ConfigError, match="max_requests"):
        head(make_trace(), -1)


def test_every_transform_accepts_an_empty_trace() -> None:
    empty = head(make_trace(), 0)
    outs = [
        window(empty, 0.0, 1.0),
        time_scale(empty, 2.0),
        scale_to_rate(empty, 5.0),
        sample(empty, 0.5),
        sample(empty, 0.5, by_session=True),
        filter_model(empty, ["GPT-4"]),
        filter_log_type(empty, ["api"]),
        drop_failed(empty),
        cap_prompt(empty, 4),
        head(empty, 3),
        TraceTransforms(window_s=(0, 5), rate_rps=2.0, sample=0.5, models=["x"]).apply(empty),
    ]
    assert [len(t) for t in outs] == [0] * len(outs)


# -- TraceTransforms ----------------------------------------------------------


def test_apply_runs_filters_then_window_then_rate_then_cap_then_head() -> None:
    opts = TraceTransforms(
        log_types=["conversation"],
        drop_failed=True,
        window_s=(2.0, 20.0),
        rate_rps=0.25,
        max_prompt_tokens=10,
        max_requests=1,
    )
    out = opts.apply(make_trace())
    # conversation, not failed: ids 2, 4; window from 2.0: arrivals 0.5, 8.0;
    # 2 rows over 7.5 s at 0.25 req/s: span 8 s; cap 10; first one.
    assert ids(out) == [2]
    assert arrivals(out) == pytest.approx([0.5 * 8 / 7.5])
    assert out.prompt_tokens.tolist() == [8]
    full = opts.model_copy(update={"max_requests": None}).apply(make_trace())
    assert arrivals(full) == pytest.approx([0.5 * 8 / 7.5, 8.0 * 8 / 7.5])
    assert full.prompt_tokens.tolist() == [8, 10]


def test_apply_samples_after_the_window_and_time_scales() -> None:
    opts = TraceTransforms(window_s=(1.0, 5.0), sample=0.5, sample_seed=1, time_scale=2.0)
    out = opts.apply(make_trace())
    assert len(out) == 2  # half of the 3 rows in the window, rounded
    assert set(ids(out)) <= {1, 2, 3}
    assert all(a in (0.0, 3.0, 6.0) for a in arrivals(out))


def test_empty_options_change_nothing_but_return_a_new_trace() -> None:
    trace = make_trace()
    out = TraceTransforms().apply(trace)
    assert out is not trace
    assert out.equals(trace)


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"time_scale": -1.0}, "time_scale"),
        ({"rate_rps": 0.0}, "rate_rps"),
        ({"sample": 1.5}, "sample"),
        ({"sample": 0.0}, "sample"),
        ({"window_s": (5.0, 1.0)}, "window_s"),
        ({"max_prompt_tokens": 0}, "max_prompt_tokens"),
        ({"max_requests": -3}, "max_requests"),
        ({"max_requests": 0}, "max_requests"),
        ({"window_s": "0:600:5"}, "window_s"),
        ({"models": []}, "models"),
        ({"time_scale": 0.5, "rate_rps": 3.0}, "time_scale and rate_rps"),
        ({"speedup": 2.0}, "speedup"),
    ],
)
def test_bad_options_name_the_field(values: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        TraceTransforms(**values)
    with pytest.raises(ConfigError, match=f"trace transforms: .*{field}"):
        TraceTransforms.parse(**values)


@pytest.mark.parametrize("given", ["0:600", " 0 : 600 ", [0, 600], (0.0, 600.0), ["0", "600"]])
def test_a_window_is_start_colon_end_or_a_pair(given: object) -> None:
    assert parse_window(given) == (0.0, 600.0)
    assert TraceTransforms.parse(window_s=given).window_s == (0.0, 600.0)


@pytest.mark.parametrize("given", ["0:600:5", "600", "a:b", [0], [0, 600, 5], 600, [0, "inf"]])
def test_a_malformed_window_error_shows_the_syntax(given: object) -> None:
    with pytest.raises(
        ConfigError, match=r'window_s: expected START:END in seconds, such as "0:600"'
    ):
        TraceTransforms.parse(window_s=given)


def test_a_window_from_a_scenario_takes_either_spelling(tmp_path) -> None:
    from sim.scenario import ScenarioError, parse_scenario

    def scenario(window: object):
        trace = {"bundled": "azure-code", "transforms": {"window_s": window}}
        return parse_scenario({"trace": trace, "policies": [{"name": "fcfs"}]})

    assert scenario("0:600").trace.transforms.window_s == (0.0, 600.0)
    assert scenario([0, 600]).trace.transforms.window_s == (0.0, 600.0)
    with pytest.raises(ScenarioError, match=r"trace.transforms.window_s: expected START:END"):
        scenario("0:600:5")


def test_a_filter_that_keeps_nothing_lists_what_the_trace_has() -> None:
    trace = make_trace()
    with pytest.raises(TraceError, match=r"hand: models 'GPT-5' match no request; .*ChatGPT \(3\)"):
        filter_model(trace, ["GPT-5"])
    with pytest.raises(TraceError, match=r"log_types 'batch' .*Conversation log \(3\)"):
        filter_log_type(trace, ["batch"])
    with pytest.raises(TraceError, match="all 1 failed"):
        drop_failed(filter_model(trace, ["GPT-4"]).replace(trace.frame.iloc[[1]]))
    with pytest.raises(TraceError, match=r"models 'GPT-5'"):
        TraceTransforms(models=["GPT-5"]).apply(trace)


def test_a_window_that_keeps_nothing_says_where_the_arrivals_are() -> None:
    with pytest.raises(TraceError, match=r"\[100, 200\) s holds no arrival; .* \[0, 10\] s"):
        window(make_trace(), 100.0, 200.0)


def test_a_time_change_that_stretches_past_the_longest_span_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"time_scale: stretches hand from 10 s to 1e\+300 s"):
        time_scale(make_trace(), 1e299)
    with pytest.raises(ConfigError, match=r"rate_rps: stretches hand"):
        TraceTransforms(rate_rps=1e-300).apply(make_trace())


def test_a_sample_too_small_to_keep_a_row_is_refused() -> None:
    with pytest.raises(TraceError, match=r"hand: sample 0.01 of 5 rows keeps none; .* above 0.1"):
        sample(make_trace(), 0.01)
    with pytest.raises(TraceError, match="of 4 sessions and lone requests keeps none"):
        sample(make_trace(), 0.1, by_session=True)
    assert len(sample(make_trace(), 0.11)) == 1
