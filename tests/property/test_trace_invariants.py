"""Invariants of the trace transforms and the generator, on small random inputs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from traces.errors import TraceError
from traces.generator import SyntheticConfig, generate
from traces.request import Request
from traces.trace import Trace
from traces.transforms import (
    TraceTransforms,
    cap_prompt,
    drop_failed,
    filter_log_type,
    filter_model,
    head,
    sample,
    scale_to_rate,
    time_scale,
    window,
)

FAST = settings(max_examples=60, deadline=None)


@st.composite
def traces(draw: st.DrawFn) -> Trace:
    n = draw(st.integers(0, 25))
    gaps = draw(st.lists(st.floats(0.0, 50.0), min_size=n, max_size=n))
    start = draw(st.floats(0.0, 100.0))
    arrivals = start + np.cumsum(gaps) if n else []
    requests = []
    for i, a in enumerate(arrivals):
        prompt = draw(st.integers(1, 200))
        failed = draw(st.booleans())
        hashes = tuple(range(i * 100, i * 100 + prompt // 8)) if draw(st.booleans()) else None
        requests.append(
            Request(
                request_id=i,
                arrival_s=float(a),
                prompt_tokens=prompt,
                output_tokens=0 if failed else draw(st.integers(1, 50)),
                session_id=draw(st.sampled_from([None, "a", "b", "c"])),
                model=draw(st.sampled_from(["ChatGPT", "GPT-4"])),
                log_type=draw(st.sampled_from(["API log", "Conversation log"])),
                failed=failed,
                prefix_hashes=hashes,
                block_tokens=None if hashes is None else 8,
            )
        )
    return Trace.from_requests(requests)


def assert_well_formed(out: Trace, source: Trace) -> None:
    a = out.arrival_s
    assert (np.diff(a) >= 0).all()
    assert (a >= 0).all()
    assert set(out.frame["request_id"]) <= set(source.frame["request_id"])
    assert len(out) <= len(source)


def subset_rows_unchanged(out: Trace, source: Trace) -> None:
    """Rows of a filter/sample are source rows, field for field (arrivals aside)."""
    by_id = {r.request_id: r for r in source}
    for r in out:
        s = by_id[r.request_id]
        assert (r.prompt_tokens, r.output_tokens, r.session_id, r.model, r.failed) == (
            s.prompt_tokens,
            s.output_tokens,
            s.session_id,
            s.model,
            s.failed,
        )


@FAST
@given(traces(), st.floats(0.0, 400.0), st.floats(0.01, 400.0))
def test_window_is_a_shifted_subset(trace: Trace, start: float, length: float) -> None:
    a = trace.arrival_s
    expected = int(((a >= start) & (a < start + length)).sum())
    if len(trace) and not expected:
        with pytest.raises(TraceError, match="holds no arrival"):
            window(trace, start, start + length)
        return
    out = window(trace, start, start + length)
    assert_well_formed(out, trace)
    subset_rows_unchanged(out, trace)
    assert len(out) == expected
    if len(out):
        assert out.arrival_s.max() < length


@FAST
@given(traces(), st.floats(1e-3, 1e3))
def test_time_scale_scales_the_span(trace: Trace, factor: float) -> None:
    out = time_scale(trace, factor)
    assert_well_formed(out, trace)
    assert len(out) == len(trace)
    # Scaling each arrival rounds at the arrivals' magnitude, not the span's.
    ulps = 4 * np.finfo(float).eps * max(1.0, float(np.abs(trace.arrival_s).max(initial=0.0)))
    assert out.span_s == pytest.approx(trace.span_s * factor, rel=1e-12, abs=ulps * factor)


@FAST
@given(traces(), st.floats(0.01, 100.0))
def test_scale_to_rate_hits_the_rate(trace: Trace, rate: float) -> None:
    if len(trace) >= 2 and trace.span_s <= 0:
        return
    out = scale_to_rate(trace, rate)
    assert_well_formed(out, trace)
    if len(out) >= 2:
        assert len(out) / out.span_s == pytest.approx(rate, rel=1e-9)


@FAST
@given(traces(), st.floats(0.01, 1.0), st.integers(0, 2**32), st.booleans())
def test_sample_is_a_subset(trace: Trace, fraction: float, seed: int, by_session: bool) -> None:
    try:
        out = sample(trace, fraction, seed, by_session=by_session)
    except TraceError as exc:
        # Only a sample too small to keep one row (or session) of a non-empty trace is refused.
        assert len(trace) and "keeps none" in str(exc)
        assert by_session or round(fraction * len(trace)) == 0
        return
    assert_well_formed(out, trace)
    subset_rows_unchanged(out, trace)
    assert out.arrival_s.tolist() == [
        r.arrival_s for r in trace if r.request_id in set(out.frame["request_id"])
    ]
    if by_session:
        kept = out.frame["session_id"].dropna()
        for sid in set(kept):
            assert (kept == sid).sum() == (trace.frame["session_id"] == sid).sum()
    else:
        assert len(out) == round(fraction * len(trace))


@FAST
@given(traces(), st.sampled_from([["GPT-4"], ["chatgpt"], ["api"], ["conversation"]]))
def test_filters_are_subsets(trace: Trace, names: list[str]) -> None:
    for kept in (
        lambda t: (
            filter_log_type(t, names)
            if names[0] in ("api", "conversation")
            else filter_model(t, names)
        ),
        drop_failed,
    ):
        try:
            result = kept(trace)
        except TraceError as exc:
            # Only a non-empty trace that the filter would empty is refused.
            assert len(trace) and ("match no request" in str(exc) or "leaves nothing" in str(exc))
            continue
        assert len(result) or not len(trace)
        assert_well_formed(result, trace)
        subset_rows_unchanged(result, trace)
        if kept is drop_failed:
            assert not result.frame["failed"].any()


@FAST
@given(traces(), st.integers(1, 250), st.integers(0, 30))
def test_cap_and_head_never_grow(trace: Trace, cap: int, n: int) -> None:
    capped = cap_prompt(trace, cap)
    assert_well_formed(capped, trace)
    assert (capped.prompt_tokens <= np.minimum(trace.prompt_tokens, cap)).all()
    for r in capped:
        if r.prefix_hashes is not None and r.block_tokens:
            assert len(r.prefix_hashes) * r.block_tokens <= r.prompt_tokens
    first = head(trace, n)
    assert ids_of(first) == ids_of(trace)[:n]


@FAST
@given(
    traces(),
    st.builds(
        TraceTransforms,
        window_s=st.none() | st.tuples(st.just(0.0), st.floats(1.0, 500.0)),
        sample=st.none() | st.floats(0.1, 1.0),
        time_scale=st.none() | st.floats(0.1, 10.0),
        drop_failed=st.booleans(),
        max_prompt_tokens=st.none() | st.integers(1, 100),
        max_requests=st.none() | st.integers(1, 10),
    ),
)
def test_applied_options_never_invent_rows(trace: Trace, opts: TraceTransforms) -> None:
    try:
        out = opts.apply(trace)
    except TraceError as exc:
        # A window, filter or sample that empties a non-empty trace says so instead.
        words = ("holds no arrival", "leaves nothing", "keeps none")
        assert len(trace) and any(w in str(exc) for w in words)
        return
    assert_well_formed(out, trace)
    if opts.max_requests is not None:
        assert len(out) <= opts.max_requests


def ids_of(trace: Trace) -> list[int]:
    return trace.frame["request_id"].tolist()


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    n=st.integers(0, 300),
    cv=st.floats(0.0, 4.0),
    share=st.floats(0.0, 1.0),
    sys_tokens=st.integers(0, 40),
    amplitude=st.floats(0.0, 1.0),
)
def test_generated_traces_are_well_formed(
    seed: int, n: int, cv: float, share: float, sys_tokens: int, amplitude: float
) -> None:
    cfg = SyntheticConfig(
        seed=seed,
        n_requests=n,
        cv=cv,
        conversation_share=share,
        system_prompt_tokens=sys_tokens,
        cycle_amplitude=amplitude,
        cycle_period_s=600.0,
        cycle_peak_hour=0.05,
        think_time_mean_s=3.0,
    )
    trace = generate(cfg)
    f = trace.frame
    assert len(trace) == n
    a = trace.arrival_s
    assert (np.diff(a) >= 0).all() and (a >= 0).all()
    assert (trace.prompt_tokens >= max(1, sys_tokens + 1)).all()
    assert ((trace.output_tokens == 0) == f["failed"].to_numpy()).all()
    assert (trace.output_tokens <= cfg.max_output_tokens).all()
    lengths = f["prefix_hashes"].map(len).to_numpy()
    assert (lengths == trace.prompt_tokens // 16).all()
    assert (f["session_id"].notna() == (f["log_type"] == "Conversation log")).all()
