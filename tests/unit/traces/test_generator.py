"""The synthetic workload generator: arrivals, lengths, sessions, hashes, failures, presets."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from traces.errors import ConfigError
from traces.generator import (
    DEFAULT_N_REQUESTS,
    PRESETS,
    SyntheticConfig,
    chat_preset,
    generate,
    preset,
)


def one_shot(**overrides: object) -> SyntheticConfig:
    """API rows only, no hashes: the pure arrival and length processes."""
    values: dict[str, object] = {"conversation_share": 0.0, "block_tokens": 0}
    values.update(overrides)
    return SyntheticConfig(**values)


def sessions_of(frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    turns = frame[frame["session_id"].notna()]
    return {str(k): g.sort_values("arrival_s") for k, g in turns.groupby("session_id")}


# -- arrivals ---------------------------------------------------------------


@pytest.mark.parametrize("cv", [0.5, 1.0, 3.0])
def test_rate_and_interarrival_cv_match_the_request(cv: float) -> None:
    trace = generate(one_shot(n_requests=200_000, rate_rps=7.5, cv=cv, seed=11))
    gaps = np.diff(trace.arrival_s)
    assert len(trace) == 200_000
    assert len(trace) / trace.span_s == pytest.approx(7.5, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.05)
    assert trace.arrival_s[0] == 0.0


def test_cv_zero_spaces_arrivals_evenly() -> None:
    gaps = np.diff(generate(one_shot(n_requests=100, rate_rps=4.0, cv=0.0)).arrival_s)
    assert gaps == pytest.approx(np.full(99, 0.25))


def test_duration_bounds_arrivals_and_sets_the_count() -> None:
    trace = generate(one_shot(duration_s=2_000.0, rate_rps=20.0, cv=1.0, seed=3))
    assert trace.arrival_s.max() < 2_000.0
    assert len(trace) == pytest.approx(40_000, rel=0.03)


def test_default_size_is_documented_count() -> None:
    assert len(generate(one_shot())) == DEFAULT_N_REQUESTS


def test_daily_cycle_counts_follow_the_sinusoid() -> None:
    period_s, amplitude, rate = 1_000.0, 0.5, 50.0
    peak_s = 375.0  # the middle of phase bin 7 of 20
    cfg = one_shot(
        duration_s=4 * period_s,
        rate_rps=rate,
        cv=1.0,
        cycle_amplitude=amplitude,
        cycle_period_s=period_s,
        cycle_peak_hour=peak_s / 3600.0,
        seed=5,
    )
    trace = generate(cfg)
    n_bins = 20
    phase = (trace.arrival_s % period_s) / period_s
    counts = np.bincount((phase * n_bins).astype(int), minlength=n_bins)
    # Expected: the rate integrated over each phase bin, over 4 periods.
    edges = np.linspace(0.0, period_s, n_bins + 1)
    w = 2 * math.pi / period_s
    integral = edges + amplitude / w * np.sin(w * (edges - peak_s))
    expected = 4 * rate * np.diff(integral)
    assert counts == pytest.approx(expected, rel=0.06)
    assert abs(int(np.argmax(counts)) - 7) <= 1
    # Peak vs trough ratio near (1 + A) / (1 - A) = 3 (bins average a little).
    assert counts.max() / counts.min() == pytest.approx(expected.max() / expected.min(), rel=0.08)
    assert expected.max() / expected.min() > 2.8


def test_daily_cycle_keeps_the_mean_rate_over_whole_periods() -> None:
    cfg = one_shot(
        duration_s=3_000.0,
        rate_rps=10.0,
        cycle_amplitude=0.9,
        cycle_period_s=1_000.0,
        cycle_peak_hour=0.1,
    )
    assert len(generate(cfg)) == pytest.approx(30_000, rel=0.05)


# -- lengths ----------------------------------------------------------------


def test_lognormal_prompt_mean_is_respected() -> None:
    cfg = one_shot(
        n_requests=100_000,
        prompt_dist="lognormal",
        prompt_mean_tokens=800.0,
        prompt_sigma=0.7,
        prompt_max_tokens=1_000_000,
    )
    prompt = generate(cfg).prompt_tokens
    assert prompt.mean() == pytest.approx(800.0, rel=0.03)
    assert np.log(prompt).std() == pytest.approx(0.7, rel=0.05)


def test_lognormal_prompt_median_is_respected_and_clipped() -> None:
    cfg = one_shot(
        n_requests=100_000,
        prompt_dist="lognormal",
        prompt_median_tokens=300.0,
        prompt_sigma=1.0,
        prompt_min_tokens=20,
        prompt_max_tokens=2_000,
    )
    prompt = generate(cfg).prompt_tokens
    assert np.median(prompt) == pytest.approx(300.0, rel=0.03)
    assert prompt.min() == 20
    assert prompt.max() == 2_000


def test_zipf_prompts_stay_in_bounds_with_zipf_frequencies() -> None:
    cfg = one_shot(n_requests=100_000, zipf_a=1.1, prompt_min_tokens=10, prompt_max_tokens=500)
    prompt = generate(cfg).prompt_tokens
    assert prompt.min() == 10
    assert prompt.max() == 500
    counts = np.bincount(prompt)
    # P(k) ~ k**-a: P(10) / P(20) = 2**1.1.
    assert counts[10] / counts[20] == pytest.approx(2**1.1, rel=0.1)


def test_outputs_have_the_mean_and_prompt_correlation_asked_for() -> None:
    cfg = one_shot(
        n_requests=100_000,
        prompt_dist="lognormal",
        prompt_median_tokens=500.0,
        prompt_max_tokens=1_000_000,
        output_mean_tokens=150.0,
        output_sigma=0.6,
        output_prompt_corr=0.5,
        max_output_tokens=100_000,
        failure_rate=0.0,
    )
    trace = generate(cfg)
    out = trace.output_tokens
    assert out.mean() == pytest.approx(150.0, rel=0.03)
    corr = np.corrcoef(np.log(trace.prompt_tokens), np.log(out))[0, 1]
    assert corr == pytest.approx(0.5, abs=0.03)


def test_outputs_are_clipped_to_max_output_tokens() -> None:
    out = generate(one_shot(n_requests=20_000, max_output_tokens=300, failure_rate=0.0))
    assert out.output_tokens.max() == 300
    assert out.output_tokens.min() >= 1


# -- failures and models ----------------------------------------------------


def test_failure_share_and_failed_rows_have_no_output() -> None:
    frame = generate(preset("burstgpt", n_requests=100_000, failure_rate=0.0726)).frame
    failed = frame["failed"].to_numpy()
    assert failed.mean() == pytest.approx(0.0726, abs=0.003)
    assert (frame["output_tokens"].to_numpy()[failed] == 0).all()
    assert (frame["output_tokens"].to_numpy()[~failed] >= 1).all()


def test_model_mix_follows_burstgpt_counts_and_sessions_keep_one_model() -> None:
    frame = generate(preset("burstgpt", n_requests=50_000, conversation_share=0.5)).frame
    share = (frame["model"] == "ChatGPT").mean()
    assert share == pytest.approx(1_189_167 / (1_189_167 + 215_127), abs=0.01)
    assert frame[frame["session_id"].notna()].groupby("session_id")["model"].nunique().max() == 1


def test_empty_model_mix_leaves_the_model_unset() -> None:
    trace = generate(one_shot(n_requests=10, model_mix={}))
    assert all(r.model is None for r in trace)


# -- sessions ---------------------------------------------------------------


def chat(**overrides: object) -> pd.DataFrame:
    values: dict[str, object] = {"n_requests": 6_000, "seed": 2}
    values.update(overrides)
    return generate(chat_preset(**values)).frame


def test_turn_prompts_hold_the_whole_history() -> None:
    frame = chat()
    checked = 0
    for turns in sessions_of(frame).values():
        prompt = turns["prompt_tokens"].to_numpy()
        out = turns["output_tokens"].to_numpy()
        # Turn k = turn k-1's prompt + its response + at least one new token.
        assert (prompt[1:] >= prompt[:-1] + out[:-1] + 1).all()
        checked += len(turns) - 1
    assert checked > 1_000


def test_turn_hashes_extend_the_previous_turn_and_sessions_share_none() -> None:
    frame = chat()
    owners: dict[int, str] = {}
    for sid, turns in sessions_of(frame).items():
        hashes = turns["prefix_hashes"].tolist()
        prompts = turns["prompt_tokens"].tolist()
        for k, h in enumerate(hashes):
            assert len(h) == prompts[k] // 16
            if k:
                assert np.array_equal(h[: len(hashes[k - 1])], hashes[k - 1])
            for value in h.tolist():
                assert owners.setdefault(value, sid) == sid
    assert len(owners) > 10_000


def test_one_shot_requests_and_sessions_share_no_hashes() -> None:
    frame = generate(preset("burstgpt", n_requests=5_000, conversation_share=0.5)).frame
    owners: dict[int, str] = {}
    for rid, sid, hashes in frame[["request_id", "session_id", "prefix_hashes"]].itertuples(
        index=False
    ):
        owner = sid if isinstance(sid, str) else f"request {rid}"
        for value in hashes.tolist():
            assert owners.setdefault(value, owner) == owner
    assert len(set(owners.values())) > 1_500  # prompts under 16 tokens have no block


def test_a_system_prompt_is_the_only_thing_sessions_share() -> None:
    frame = chat(system_prompt_tokens=72, system_prompt_count=1)
    first = frame["prefix_hashes"].map(lambda h: tuple(h[:4].tolist()))
    assert first.nunique() == 1  # 72 tokens: 4 whole blocks of 16
    owners: dict[int, str] = {}
    for sid, turns in sessions_of(frame).items():
        for h in turns["prefix_hashes"]:
            for value in h[4:].tolist():
                assert owners.setdefault(value, sid) == sid
    assert (frame["prompt_tokens"] >= 73).all()


def test_system_prompts_split_requests_into_applications() -> None:
    frame = generate(preset("api", n_requests=4_000, system_prompt_count=3)).frame
    heads = frame["prefix_hashes"].map(lambda h: int(h[0]))
    assert heads.nunique() == 3
    # Past the 512-token system prompt no two one-shot requests share a block.
    tails = np.concatenate([h[32:] for h in frame["prefix_hashes"]])
    assert len(np.unique(tails)) == len(tails)


def test_session_counts_turns_and_conversation_share_match_the_config() -> None:
    cfg = preset(
        "burstgpt",
        n_requests=60_000,
        conversation_share=0.3,
        session_turns_mean=3.0,
        think_time_mean_s=2.0,
        seed=9,
    )
    frame = generate(cfg).frame
    conv = frame["session_id"].notna()
    assert conv.mean() == pytest.approx(0.3, abs=0.02)
    assert (frame.loc[conv, "log_type"] == "Conversation log").all()
    assert (frame.loc[~conv, "log_type"] == "API log").all()
    per_session = frame[conv].groupby("session_id").size()
    assert per_session.mean() == pytest.approx(3.0, rel=0.05)
    # Geometric turns: a third of sessions have one turn.
    assert (per_session == 1).mean() == pytest.approx(1 / 3, abs=0.03)
    assert all(re.fullmatch(r"s\d{6}", s) for s in per_session.index)


def test_session_workloads_hold_the_rate_from_the_first_minute() -> None:
    trace = generate(chat_preset(n_requests=20_000, rate_rps=10.0, seed=4))
    assert len(trace) / trace.span_s == pytest.approx(10.0, rel=0.05)
    # Sessions begun before t = 0 are in progress: no start-up dip.
    assert np.count_nonzero(trace.arrival_s < 120.0) == pytest.approx(1_200, rel=0.15)


def test_fixed_turns_and_think_time_after_the_estimated_response() -> None:
    frame = chat(
        session_turns_dist="fixed",
        session_turns_mean=4,
        think_time_dist="exponential",
        think_time_mean_s=5.0,
        response_s_per_token=0.01,
        long_first_prompt_share=0.0,
        duration_s=1_500.0,
        n_requests=None,
    )
    gaps = []
    for turns in sessions_of(frame).values():
        assert len(turns) <= 4
        if 60.0 < turns["arrival_s"].iloc[0] < 1_000.0:  # began inside the trace and fit it
            assert len(turns) == 4
        a = turns["arrival_s"].to_numpy()
        response_s = turns["output_tokens"].to_numpy()[:-1] * 0.01
        assert (np.diff(a) >= response_s - 1e-9).all()
        gaps.extend(np.diff(a) - response_s)
    assert np.mean(gaps) == pytest.approx(5.0, rel=0.05)


def test_long_first_prompts_and_the_context_cap() -> None:
    frame = chat(long_first_prompt_share=0.5, max_context_tokens=3_000, n_requests=4_000)
    firsts = frame.sort_values("arrival_s").groupby("session_id").head(1)
    assert (firsts["prompt_tokens"] > 1_000).mean() == pytest.approx(0.5 * 0.8, abs=0.06)
    assert frame["prompt_tokens"].max() <= 3_000


# -- determinism, config, presets ---------------------------------------------


def test_same_seed_same_trace_other_seed_other_trace() -> None:
    cfg = preset("burstgpt", n_requests=3_000, conversation_share=0.4, system_prompt_tokens=40)
    assert generate(cfg).equals(generate(cfg))
    other = generate(cfg.model_copy(update={"seed": 1}))
    assert not generate(cfg).equals(other)
    assert not np.array_equal(generate(cfg).arrival_s, other.arrival_s)


def test_every_field_documents_itself() -> None:
    for name, field in SyntheticConfig.model_fields.items():
        assert field.description and len(field.description) > 15, name


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValidationError, match="n_requests and duration_s"):
        SyntheticConfig(n_requests=10, duration_s=5.0)
    with pytest.raises(ValidationError, match="prompt_mean_tokens or prompt_median_tokens"):
        SyntheticConfig(prompt_dist="lognormal")
    with pytest.raises(ValidationError, match="rate_rps"):
        SyntheticConfig(rate_rps=0)
    with pytest.raises(ValidationError, match="conversation_share"):
        SyntheticConfig(conversation_share=1.5)
    with pytest.raises(ValidationError, match="model_mix"):
        SyntheticConfig(model_mix={"a": -1.0})
    with pytest.raises(ValidationError, match="tokens_per_turn"):
        SyntheticConfig(tokens_per_turn=3)
    with pytest.raises(ConfigError, match="cv"):
        preset("chat", cv=-1)
    with pytest.raises(ConfigError, match="known: burstgpt, chat, api"):
        preset("nope")


def test_preset_size_overrides_replace_each_other() -> None:
    cfg = preset("chat", duration_s=50.0)
    assert (cfg.duration_s, cfg.n_requests) == (50.0, None)
    assert preset("chat", n_requests=7).n_requests == 7


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_generate_what_they_promise(name: str) -> None:
    frame = generate(preset(name, n_requests=3_000)).frame
    assert len(frame) == 3_000
    conv = frame["session_id"].notna().mean()
    expected = {"burstgpt": 0.10, "chat": 1.0, "api": 0.0}[name]
    assert conv == pytest.approx(expected, abs=0.03)
    assert frame["arrival_s"].is_monotonic_increasing
    assert (frame["request_id"] == np.arange(3_000)).all()


def test_block_tokens_zero_disables_hashes() -> None:
    trace = generate(one_shot(n_requests=5))
    assert all(r.prefix_hashes is None and r.block_tokens is None for r in trace)


def test_empty_trace() -> None:
    trace = generate(preset("burstgpt", n_requests=0))
    assert len(trace) == 0


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        ({"duration_s": 1e300}, "duration_s"),
        ({"n_requests": 10, "rate_rps": 1e-300}, "span 1e+301 s; a trace may span at most 1e+09 s"),
        ({"cv": 1e300}, "cv"),
        ({"n_requests": 10**12}, "n_requests"),
        ({"duration_s": 1e8, "rate_rps": 10.0}, "about 1e+09 requests; at most 100,000,000"),
    ],
)
def test_sizes_that_cannot_be_generated_are_refused_before_any_work(
    overrides: dict, says: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(says)):
        preset("burstgpt", **overrides)
