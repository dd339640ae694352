"""Synthetic BurstGPT-style workloads: seeded, vectorized, with sessions and prefix hashes.

``generate(config)`` builds a :class:`~traces.trace.Trace` in four steps:

1. **Starts.** A Gamma renewal process with mean gap 1 in *operational time*
   (shape ``1/cv**2``) is mapped to real time through the inverse cumulative
   intensity of ``rate_rps`` times an optional daily sinusoid, so bursts keep
   their Gamma structure while the rate follows the cycle.
2. **Kinds.** Each start is a one-shot API request or, with the probability
   that makes ``conversation_share`` of all rows conversation turns, the first
   turn of a session. Turn k's prompt is the whole history (system prompt,
   earlier new tokens and responses) plus its own new tokens; it arrives after
   the previous turn's *estimated response time* (its output tokens times
   ``response_s_per_token``) plus a think time. The generator knows no real
   latency, so a slow simulated server can still receive turn k before turn
   k-1 finishes.
3. **Lengths and outcomes.** Prompts from a truncated Zipf or a log-normal;
   responses log-normal with a set correlation to the (new) prompt tokens;
   failures flagged independently with ``output_tokens = 0``.
4. **Prefix hashes.** Block j of a request is hashed from (seed, owner, j):
   owner is the system prompt for blocks made only of system-prompt tokens,
   else the session (all turns share one growing token stream) or the request.
   The owner fixes every token before block j, so equal hashes mean equal
   prefixes, as a chained hash would.

Sessions start during a warm-up before t = 0 (ten mean session lengths) and
only rows at t >= 0 are kept, so the trace opens in steady state: some
sessions enter it mid-conversation, their first row already carrying history.
With sessions the row process is not a renewal process, so its measured
inter-arrival CV differs from ``cv``; without them the first row is at 0.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from traces.errors import ConfigError
from traces.trace import MAX_SPAN_S, Trace
from traces.transforms import config_error

__all__ = [
    "DEFAULT_N_REQUESTS",
    "MAX_ROWS",
    "PRESETS",
    "SyntheticConfig",
    "chat_preset",
    "generate",
    "preset",
]

#: Rows generated when neither ``n_requests`` nor ``duration_s`` is set.
DEFAULT_N_REQUESTS = 10_000

#: The most rows one synthetic trace may have (BurstGPT's largest file has 5.3 million).
MAX_ROWS = 100_000_000

_API, _CONV = "API log", "Conversation log"


class SyntheticConfig(BaseModel):
    """Parameters of a synthetic workload; each says its unit and where its default comes from.

    BurstGPT figures are from arXiv 2401.17644 and its README (BurstGPT_1 unless
    said otherwise); LMSYS figures from arXiv 2309.11998. Build variants with
    :func:`preset` so the result is validated.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    name: str = "synthetic"
    """Trace name shown in reports."""
    seed: int = 0
    """Seed of ``numpy.random.default_rng``: the same config gives the same trace."""

    n_requests: int | None = Field(None, ge=0, le=MAX_ROWS)
    """Rows to generate (later session turns past the cut are dropped). Default:
    10,000 when ``duration_s`` is unset too."""
    duration_s: float | None = Field(None, gt=0, le=MAX_SPAN_S)
    """Seconds of arrivals to generate instead of a row count."""

    rate_rps: float = Field(10.0, gt=0, allow_inf_nan=False)
    """Mean rate of all rows, requests/s. Assumption: a load a few instances
    serve; BurstGPT itself averages 0.27 req/s (BurstGPT_1), so scale freely."""
    cv: float = Field(2.0, ge=0, le=100, allow_inf_nan=False)
    """Coefficient of variation of the renewal gaps (1 = Poisson, 0 = evenly
    spaced). BurstGPT fits Gamma gaps; its generator's default shape 0.25 is CV 2.
    The renewal process places one-shot requests and session starts; later turns
    follow their think times, so with conversations the CV of all rows drifts
    toward 1."""
    cycle_amplitude: float = Field(0.0, ge=0, le=1)
    """Relative amplitude A of the daily cycle: rate * (1 + A cos(...)); peak/trough
    = (1+A)/(1-A). 0 disables. BurstGPT_1's hourly peak/valley ratio of about
    11.7 (tokens/s, third-party aggregate) is A of about 0.84."""
    cycle_period_s: float = Field(86_400.0, gt=0, allow_inf_nan=False)
    """Period of the cycle, s (one day; BurstGPT shows daily and weekly cycles)."""
    cycle_peak_hour: float = Field(14.0, ge=0, allow_inf_nan=False)
    """Hours after each period start (t = 0 is midnight) at which the rate
    peaks. Assumption: working-hours traffic peaks in the early afternoon."""

    prompt_dist: Literal["zipf", "lognormal"] = "zipf"
    """Law of one-shot prompt tokens. BurstGPT models request tokens with Zipf."""
    zipf_a: float = Field(1.1, gt=0, allow_inf_nan=False)
    """Zipf exponent: P(k) ~ k**-a on [prompt_min_tokens, prompt_max_tokens],
    sampled exactly (same law as redrawing out-of-range values). BurstGPT's
    generator uses a = 1.1."""
    prompt_min_tokens: int = Field(1, ge=1)
    """Smallest drawn prompt, tokens (lognormal values are clipped to it)."""
    prompt_max_tokens: int = Field(1023, ge=1, le=10_000_000)
    """Largest drawn prompt, tokens (lognormal values are clipped to it).
    BurstGPT's generator truncates below 1,024."""
    prompt_mean_tokens: float | None = Field(None, gt=0)
    """Lognormal prompt mean, tokens (set this or ``prompt_median_tokens``)."""
    prompt_median_tokens: float | None = Field(None, gt=0)
    """Lognormal prompt median, tokens."""
    prompt_sigma: float = Field(1.0, ge=0, allow_inf_nan=False)
    """Lognormal prompt log-std. Assumption: 1.0, a typical spread of chat prompts."""

    output_mean_tokens: float = Field(214.5, gt=0)
    """Mean response, tokens (before clipping). LMSYS-Chat-1M: 214.5 per turn."""
    output_sigma: float = Field(1.0, ge=0, allow_inf_nan=False)
    """Log-std of the response. Assumption: 1.0 puts p99 near 10x the median,
    like Azure conv 2023's 601 vs 129."""
    output_prompt_corr: float = Field(0.2, ge=-1, le=1)
    """Correlation of log response with log prompt (new tokens for turns),
    standardized within one-shot rows and within turns. Assumption: weak and
    positive; 0 makes them independent."""
    max_output_tokens: int = Field(4096, ge=1)
    """Responses are clipped to [1, this]. Assumption: a common max_tokens cap."""

    conversation_share: float = Field(0.10, ge=0, le=1)
    """Share of rows that are conversation turns. BurstGPT: 10.4% (_1), 2.1% (_2), 4.4% (_3)."""
    session_turns_mean: float = Field(2.0, ge=1, allow_inf_nan=False)
    """Mean turns per session. LMSYS-Chat-1M: about 2.0 per conversation."""
    session_turns_dist: Literal["geometric", "fixed"] = "geometric"
    """Turns per session: geometric on 1, 2, ... (memoryless users) or fixed."""
    turn_mean_tokens: float = Field(69.5, gt=0)
    """Mean new user tokens per turn (lognormal). LMSYS-Chat-1M: 69.5."""
    turn_sigma: float = Field(1.0, ge=0, allow_inf_nan=False)
    """Log-std of new tokens per turn. Assumption: 1.0 keeps about 96% of turns
    under 256 tokens (LMSYS-Chat-1M turns are mostly that short)."""
    long_first_prompt_share: float = Field(0.0, ge=0, le=1)
    """Share of sessions whose first turn is long (a pasted document)."""
    long_first_prompt_median_tokens: float = Field(2048.0, gt=0)
    """Median of a long first turn, tokens (lognormal). Assumption: a few pages."""
    long_first_prompt_sigma: float = Field(0.8, ge=0, allow_inf_nan=False)
    """Log-std of a long first turn. Assumption."""
    think_time_dist: Literal["lognormal", "exponential"] = "lognormal"
    """Law of the user's think time between turns."""
    think_time_mean_s: float = Field(100.0, ge=0, allow_inf_nan=False)
    """Mean think time, s. With the log-std 1.5 and the estimated response time,
    gaps match RAGPulse's inter-turn gaps (median 40 s, log-std 1.5)."""
    think_time_sigma: float = Field(1.5, ge=0, allow_inf_nan=False)
    """Log-std of a lognormal think time (RAGPulse, as above)."""
    response_s_per_token: float = Field(0.02, ge=0, allow_inf_nan=False)
    """Estimated streaming time per response token, s, added before the think
    time. Assumption: about 50 tokens/s as hosted chat streams; 0 disables."""
    max_context_tokens: int = Field(32_768, ge=2)
    """A session ends before a turn whose prompt would exceed this; first turns
    are clipped to it. Assumption: a 32k context window."""

    system_prompt_tokens: int = Field(0, ge=0)
    """Tokens of a system prompt at the head of every one-shot prompt and of
    each session's first turn (they count in prompt_tokens). Assumption: 0."""
    system_prompt_count: int = Field(1, ge=1)
    """Distinct system prompts (applications); each request or session picks one."""
    block_tokens: int = Field(16, ge=0)
    """Tokens per prefix-hash block; 0 disables hashes. vLLM's default block size."""

    failure_rate: float = Field(0.0178, ge=0, le=1)
    """Share of failed rows (output 0). BurstGPT: 1.78% (_1) to 7.26% (_3)."""
    model_mix: dict[str, float] = Field(
        default_factory=lambda: {"ChatGPT": 1_189_167.0, "GPT-4": 215_127.0}
    )
    """Model name -> weight (normalized); a session keeps one model; {} leaves
    the column empty. BurstGPT_1: 1,189,167 ChatGPT vs 215,127 GPT-4 rows."""

    @model_validator(mode="after")
    def _check(self) -> SyntheticConfig:
        if self.n_requests is not None and self.duration_s is not None:
            raise ValueError("n_requests and duration_s: set one, not both")
        rows = DEFAULT_N_REQUESTS if self.n_requests is None else self.n_requests
        if self.duration_s is None and rows / self.rate_rps > MAX_SPAN_S:
            raise ValueError(
                f"n_requests / rate_rps: {rows:,} requests at {self.rate_rps:g} req/s span "
                f"{rows / self.rate_rps:.3g} s; a trace may span at most {MAX_SPAN_S:.0e} s"
            )
        if self.duration_s is not None and self.duration_s * self.rate_rps > MAX_ROWS:
            raise ValueError(
                f"duration_s * rate_rps: about {self.duration_s * self.rate_rps:.3g} requests; "
                f"at most {MAX_ROWS:,}"
            )
        if self.prompt_min_tokens > self.prompt_max_tokens:
            raise ValueError("prompt_min_tokens must not exceed prompt_max_tokens")
        if self.prompt_dist == "lognormal" and (
            (self.prompt_mean_tokens is None) == (self.prompt_median_tokens is None)
        ):
            raise ValueError(
                "prompt_mean_tokens or prompt_median_tokens: set exactly one for lognormal"
            )
        if self.session_turns_dist == "fixed" and self.session_turns_mean != int(
            self.session_turns_mean
        ):
            raise ValueError("session_turns_mean must be a whole number when fixed")
        if self.cycle_peak_hour * 3600.0 >= self.cycle_period_s:
            raise ValueError("cycle_peak_hour must fall within cycle_period_s")
        if self.system_prompt_tokens >= self.max_context_tokens:
            raise ValueError("system_prompt_tokens must be below max_context_tokens")
        if self.model_mix and (
            any(w < 0 or not math.isfinite(w) for w in self.model_mix.values())
            or sum(self.model_mix.values()) <= 0
        ):
            raise ValueError("model_mix: weights must be >= 0 with a positive sum")
        return self


def generate(config: SyntheticConfig) -> Trace:
    """Build the trace ``config`` describes; equal configs give equal traces."""
    cfg = config
    if cfg.duration_s is not None:
        rows, _ = _build(cfg, None)
        keep = rows["arrival_s"] < cfg.duration_s
        return _to_trace(cfg, {k: v[keep] for k, v in rows.items()})
    n = DEFAULT_N_REQUESTS if cfg.n_requests is None else cfg.n_requests
    plan = _Plan(cfg)
    # Starts for n rows, the warm-up and the turns still to come at the cut;
    # redrawn with twice as many if the cut at row n would miss rows.
    in_flight = cfg.rate_rps * plan.warmup_s / 3
    n_starts = int((n * 1.05 + in_flight) / plan.rows_per_start + plan.warmup_starts) + 64
    while True:
        rows, last_start_s = _build(cfg, n_starts)
        if np.count_nonzero(rows["arrival_s"] <= last_start_s) >= n:
            return _to_trace(cfg, {k: v[:n] for k, v in rows.items()})
        n_starts *= 2


class _Plan:
    """Derived rates: how starts split into one-shot requests and sessions."""

    def __init__(self, cfg: SyntheticConfig) -> None:
        turns, p = cfg.session_turns_mean, cfg.conversation_share
        #: Share of starts that open a session, so that turns make up
        #: conversation_share of the rows (p = q*T / (1 - q + q*T)).
        self.q = p / (turns * (1.0 - p) + p)
        self.rows_per_start = 1.0 - self.q + self.q * turns
        turn_gap_s = cfg.think_time_mean_s + cfg.output_mean_tokens * cfg.response_s_per_token
        #: Sessions start this long before 0 so the trace opens in steady state
        #: (ten mean session lengths; 0 without multi-turn sessions).
        self.warmup_s = 10.0 * (turns - 1.0) * turn_gap_s if p > 0 else 0.0
        #: Expected rows before 0 (negative), in the cumulative-intensity scale.
        self.x0 = _cum_intensity(cfg, -self.warmup_s)
        self.warmup_starts = -self.x0 / self.rows_per_start


def _build(cfg: SyntheticConfig, n_starts: int | None) -> tuple[dict[str, np.ndarray], float]:
    """Rows at t >= 0 of ``n_starts`` starts (or of ``duration_s``) sorted by arrival,
    and the last start time (every row before it is present)."""
    plan = _Plan(cfg)
    rng = np.random.default_rng(cfg.seed)
    start_s = _start_times(cfg, rng, plan, n_starts)
    n_start = len(start_s)
    is_session = rng.random(n_start) < plan.q
    names = list(cfg.model_mix)
    if names:
        weights = np.array([cfg.model_mix[m] for m in names], dtype=float)
        model = rng.choice(len(names), size=n_start, p=weights / weights.sum()).astype(np.int8)
    else:
        model = np.full(n_start, -1, dtype=np.int8)
    app = rng.integers(cfg.system_prompt_count, size=n_start)

    # One-shot API requests.
    one = np.flatnonzero(~is_session)
    drawn = _prompt_lengths(cfg, rng, len(one))
    out_one = _outputs(cfg, rng, drawn)
    fail_one = rng.random(len(one)) < cfg.failure_rate
    out_one[fail_one] = 0

    # Sessions: one row per turn, turns of a session adjacent.
    ses = np.flatnonzero(is_session)
    turns = _turn_counts(cfg, rng, len(ses))
    sess_of = np.repeat(np.arange(len(ses)), turns)
    first_at = np.cumsum(turns) - turns
    first = np.zeros(len(sess_of), dtype=bool)
    first[first_at] = True
    new = _lognormal(
        rng, np.log(cfg.turn_mean_tokens) - cfg.turn_sigma**2 / 2, cfg.turn_sigma, len(sess_of)
    )
    long = first & (rng.random(len(sess_of)) < cfg.long_first_prompt_share)
    new[long] = _lognormal(
        rng,
        np.log(cfg.long_first_prompt_median_tokens),
        cfg.long_first_prompt_sigma,
        int(long.sum()),
    )
    new = np.clip(new, 1, cfg.max_context_tokens - cfg.system_prompt_tokens)
    out_turn = _outputs(cfg, rng, new)
    fail_turn = rng.random(len(sess_of)) < cfg.failure_rate
    out_turn[fail_turn] = 0
    # A failed turn adds no response to the history (and takes no time).
    prev_out = np.concatenate([[0], out_turn[:-1]])
    prev_out[first] = 0
    contrib = new + prev_out
    contrib[first] += cfg.system_prompt_tokens
    prompt_turn = _segment_cumsum(contrib, first_at, turns)
    gap = prev_out * cfg.response_s_per_token + _think_times(cfg, rng, len(sess_of))
    gap[first] = 0.0
    arrival_turn = start_s[ses][sess_of] + _segment_cumsum(gap, first_at, turns)
    # Prompts grow within a session, so this keeps a prefix of each one.
    kept = prompt_turn <= cfg.max_context_tokens

    cat = np.concatenate
    rows = {
        "arrival_s": cat([start_s[one], arrival_turn[kept]]),
        "prompt_tokens": cat([drawn + cfg.system_prompt_tokens, prompt_turn[kept]]),
        "output_tokens": cat([out_one, out_turn[kept]]),
        "failed": cat([fail_one, fail_turn[kept]]),
        "session": cat([np.full(len(one), -1), sess_of[kept]]),
        "owner": cat([one, sess_of[kept]]),
        "app": cat([app[one], app[ses][sess_of[kept]]]),
        "model": cat([model[one], model[ses][sess_of[kept]]]),
    }
    order = np.argsort(rows["arrival_s"], kind="stable")
    order = order[rows["arrival_s"][order] >= 0.0]  # drop the warm-up
    return {k: v[order] for k, v in rows.items()}, float(start_s[-1]) if n_start else 0.0


def _start_times(
    cfg: SyntheticConfig, rng: np.random.Generator, plan: _Plan, n: int | None
) -> np.ndarray:
    """Start times from -warm-up: a unit-mean Gamma renewal process mapped
    through the inverse cumulative intensity."""

    def gaps(size: int) -> np.ndarray:
        if cfg.cv < 1e-6:  # Gamma shape 1e12 and beyond: evenly spaced, and no overflow
            return np.ones(size)
        shape = 1.0 / cfg.cv**2
        return rng.gamma(shape, 1.0 / shape, size)

    if n is not None:
        op = np.concatenate([[0.0], np.cumsum(gaps(max(n - 1, 0)))])[:n]
    else:
        # Operational time needed to reach duration_s: starts expected by then.
        horizon = (_cum_intensity(cfg, cfg.duration_s or 0.0) - plan.x0) / plan.rows_per_start
        chunks, total = [np.zeros(1)], 0.0
        while total < horizon:
            size = int(horizon * 1.1 + 5 * cfg.cv * math.sqrt(horizon) + 16)
            c = total + np.cumsum(gaps(size))
            chunks.append(c)
            total = float(c[-1])
        op = np.concatenate(chunks)
        op = op[op < horizon]
    return _inverse_intensity(cfg, plan.x0 + op * plan.rows_per_start)


def _cum_intensity(cfg: SyntheticConfig, t: float) -> float:
    """Expected rows in [0, t) (negative for t < 0): the integral of the cycled rate."""
    a, period = cfg.cycle_amplitude, cfg.cycle_period_s
    phase = 2 * math.pi * cfg.cycle_peak_hour * 3600.0 / period
    wave = math.sin(2 * math.pi * t / period - phase) + math.sin(phase)
    return cfg.rate_rps * (t + a * period / (2 * math.pi) * wave)


def _inverse_intensity(cfg: SyntheticConfig, x: np.ndarray) -> np.ndarray:
    """Real times whose cumulative intensity is ``x`` (expected rows)."""
    t = x / cfg.rate_rps
    if cfg.cycle_amplitude == 0 or len(t) == 0:
        return t
    # The integral is t plus a bounded periodic term, so invert one period on
    # a fine grid and add whole periods.
    period = cfg.cycle_period_s
    grid = np.linspace(0.0, period, 65_537)
    phase = 2 * math.pi * cfg.cycle_peak_hour * 3600.0 / period
    g = grid + cfg.cycle_amplitude * period / (2 * math.pi) * (
        np.sin(2 * math.pi * grid / period - phase) + math.sin(phase)
    )
    whole = np.floor(t / period)
    return whole * period + np.interp(t - whole * period, g, grid)


def _prompt_lengths(cfg: SyntheticConfig, rng: np.random.Generator, n: int) -> np.ndarray:
    lo, hi = cfg.prompt_min_tokens, cfg.prompt_max_tokens
    if cfg.prompt_dist == "zipf":
        cdf = np.cumsum(np.arange(lo, hi + 1, dtype=float) ** -cfg.zipf_a)
        idx = np.searchsorted(cdf / cdf[-1], rng.random(n), side="right")
        return lo + np.minimum(idx, hi - lo).astype(np.int64)
    s = cfg.prompt_sigma
    if cfg.prompt_median_tokens is not None:
        mu = math.log(cfg.prompt_median_tokens)
    else:
        mu = math.log(cfg.prompt_mean_tokens or 1.0) - s**2 / 2
    return np.clip(_lognormal(rng, mu, s, n), lo, hi)


def _outputs(cfg: SyntheticConfig, rng: np.random.Generator, prompt: np.ndarray) -> np.ndarray:
    """Log-normal responses whose log has correlation ``output_prompt_corr`` with log prompt."""
    n = len(prompt)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    x = np.log(prompt)
    sd = float(x.std())
    z = (x - x.mean()) / sd if sd > 0 else np.zeros(n)
    s, rho = cfg.output_sigma, cfg.output_prompt_corr
    mu = math.log(cfg.output_mean_tokens) - s**2 / 2
    noise = rng.standard_normal(n)
    log_out = mu + s * (rho * z + math.sqrt(1.0 - rho**2) * noise)
    return np.clip(np.rint(np.exp(log_out)), 1, cfg.max_output_tokens).astype(np.int64)


def _turn_counts(cfg: SyntheticConfig, rng: np.random.Generator, n: int) -> np.ndarray:
    if cfg.session_turns_dist == "fixed":
        return np.full(n, int(cfg.session_turns_mean), dtype=np.int64)
    return rng.geometric(1.0 / cfg.session_turns_mean, n).astype(np.int64)


def _think_times(cfg: SyntheticConfig, rng: np.random.Generator, n: int) -> np.ndarray:
    mean = cfg.think_time_mean_s
    if cfg.think_time_dist == "exponential":
        return rng.exponential(mean, n) if mean > 0 else np.zeros(n)
    s = cfg.think_time_sigma
    return rng.lognormal(math.log(mean) - s**2 / 2, s, n) if mean > 0 else np.zeros(n)


def _lognormal(rng: np.random.Generator, mu: float, sigma: float, n: int) -> np.ndarray:
    """Whole token counts >= 1 from a log-normal."""
    return np.maximum(np.rint(rng.lognormal(mu, sigma, n)), 1).astype(np.int64)


def _segment_cumsum(values: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Cumulative sums restarting at each segment start."""
    if len(values) == 0:
        return values.copy()
    c = np.cumsum(values)
    return c - np.repeat(c[starts] - values[starts], lengths)


# -- prefix hashes ----------------------------------------------------------

_M64 = (1 << 64) - 1
_TAG_SYSTEM, _TAG_SESSION, _TAG_REQUEST = 0x5157, 0x5E55, 0x4E51
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer (a bijection on uint64 with good avalanche), in place."""
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def _keys(seed: int, tag: int, ids: np.ndarray) -> np.ndarray:
    base = _mix64(np.array([(seed * 0x100000001B3 + tag) & _M64], dtype=np.uint64))
    return _mix64(ids.astype(np.uint64) ^ base)


def _ranks(counts: np.ndarray) -> np.ndarray:
    """0, 1, ..., c-1 for each count c, concatenated."""
    ends = np.cumsum(counts)
    return np.arange(int(ends[-1]) if len(ends) else 0) - np.repeat(ends - counts, counts)


def _prefix_hashes(cfg: SyntheticConfig, rows: dict[str, np.ndarray]) -> np.ndarray:
    """One int64 array of full-block hashes per row (views into one buffer)."""
    n_blocks = rows["prompt_tokens"] // cfg.block_tokens
    ends = np.cumsum(n_blocks)
    starts = ends - n_blocks
    owner = np.where(
        rows["session"] >= 0,
        _keys(cfg.seed, _TAG_SESSION, rows["owner"]),
        _keys(cfg.seed, _TAG_REQUEST, rows["owner"]),
    )
    system = _keys(cfg.seed, _TAG_SYSTEM, rows["app"])
    n_sys = np.minimum(n_blocks, cfg.system_prompt_tokens // cfg.block_tokens)
    flat = np.empty(int(ends[-1]) if len(ends) else 0, dtype=np.uint64)
    # Rows in chunks of about 4M blocks bound the temporaries to a few times that.
    step = 1 << 22
    cuts = np.searchsorted(ends, np.arange(step, len(flat), step), side="left").tolist()
    bounds = [0, *cuts, len(ends)]
    for r0, r1 in itertools.pairwise(bounds):
        if r1 > r0:
            _fill_hashes(flat[starts[r0] :], r0, r1, n_blocks, owner, system, n_sys)
    flat = flat.view(np.int64)
    return np.fromiter(
        map(flat.__getitem__, map(slice, starts.tolist(), ends.tolist())),
        dtype=object,
        count=len(n_blocks),
    )


def _fill_hashes(
    out: np.ndarray,
    r0: int,
    r1: int,
    n_blocks: np.ndarray,
    owner: np.ndarray,
    system: np.ndarray,
    n_sys: np.ndarray,
) -> None:
    """Hashes of the blocks of rows [r0, r1) written to the head of ``out``."""
    counts = n_blocks[r0:r1]
    sys_counts = n_sys[r0:r1]
    x = np.repeat(owner[r0:r1], counts)
    if sys_counts.any():
        local = np.cumsum(counts) - counts
        x[np.repeat(local, sys_counts) + _ranks(sys_counts)] = np.repeat(system[r0:r1], sys_counts)
    j = _ranks(counts).astype(np.uint64)
    j += np.uint64(1)
    j *= _GOLDEN
    x += j
    out[: len(x)] = _mix64(x)


def _to_trace(cfg: SyntheticConfig, rows: dict[str, np.ndarray]) -> Trace:
    n = len(rows["arrival_s"])
    session = rows["session"]
    session_id = np.full(n, None, dtype=object)
    in_session = session >= 0
    # Sessions numbered from 0 in order of their first row in the trace.
    _, first_row, rank = np.unique(session[in_session], return_index=True, return_inverse=True)
    renumber = np.empty(len(first_row), dtype=np.int64)
    renumber[np.argsort(first_row)] = np.arange(len(first_row))
    labels = np.array([f"s{i:06d}" for i in range(len(first_row))], dtype=object)
    rank = renumber[rank]
    session_id[in_session] = labels[rank]
    if cfg.block_tokens:
        hashes: Any = _prefix_hashes(cfg, rows)
        block: Any = pd.array(np.full(n, cfg.block_tokens), dtype="Int64")
    else:
        hashes = np.full(n, None, dtype=object)
        block = pd.array([pd.NA] * n, dtype="Int64")
    names = list(cfg.model_mix)
    frame = pd.DataFrame(
        {
            "request_id": np.arange(n, dtype=np.int64),
            "arrival_s": rows["arrival_s"].astype(np.float64),
            "prompt_tokens": rows["prompt_tokens"].astype(np.int64),
            "output_tokens": rows["output_tokens"].astype(np.int64),
            "session_id": pd.Series(session_id, dtype=object),
            "prefix_hashes": pd.Series(hashes, dtype=object),
            "block_tokens": block,
            "model": pd.Categorical.from_codes(rows["model"], categories=names)
            if names
            else pd.Categorical([None] * n),
            "log_type": pd.Categorical.from_codes(
                (session >= 0).astype(np.int8), categories=[_API, _CONV]
            ),
            "failed": rows["failed"].astype(bool),
        }
    )
    return Trace(frame, name=cfg.name)


# -- presets ----------------------------------------------------------------


def chat_preset(**overrides: Any) -> SyntheticConfig:
    """LMSYS-like multi-turn chat: every row a session turn (see ``PRESETS['chat']``)."""
    return preset("chat", **overrides)


def preset(name: str, **overrides: Any) -> SyntheticConfig:
    """A named preset with ``overrides`` applied and validated.

    Raises:
        ConfigError: unknown preset name, or an override that is not valid
            (the message names the field).
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown synthetic preset {name!r}; known: {', '.join(PRESETS)}")
    values = PRESETS[name].model_dump()
    if "n_requests" in overrides and "duration_s" not in overrides:
        values["duration_s"] = None
    if "duration_s" in overrides and "n_requests" not in overrides:
        values["n_requests"] = None
    try:
        return SyntheticConfig.model_validate({**values, **overrides})
    except ValidationError as exc:
        raise config_error(exc, f"synthetic preset {name!r}") from None


#: Named starting points for experiments.
#:
#: - ``burstgpt``: the defaults: BurstGPT_1's Gamma arrivals, Zipf prompts,
#:   10% conversation rows, 1.78% failures and ChatGPT/GPT-4 mix.
#: - ``chat``: LMSYS-Chat-1M-like sessions only: about 2 turns, 69.5 new and
#:   214.5 response tokens per turn, 10% of sessions opening with a pasted
#:   document (assumption), Poisson session starts.
#: - ``api``: one-shot requests with Azure code 2023 lengths (prompt median
#:   1,469 / mean 2,048, so log-std 0.82; response median 13 / mean 28, so
#:   log-std 1.24) and 4 applications with 512-token system prompts
#:   (assumption: something for cache-aware routing to find); CV 3 sits
#:   between Azure conv (1.1) and Azure code (13.2).
PRESETS: dict[str, SyntheticConfig] = {
    "burstgpt": SyntheticConfig(name="burstgpt"),
    "chat": SyntheticConfig(
        name="chat",
        cv=1.0,
        conversation_share=1.0,
        long_first_prompt_share=0.1,
        failure_rate=0.0,
    ),
    "api": SyntheticConfig(
        name="api",
        cv=3.0,
        conversation_share=0.0,
        prompt_dist="lognormal",
        prompt_median_tokens=1469.0,
        prompt_sigma=0.82,
        prompt_max_tokens=8192,
        output_mean_tokens=28.0,
        output_sigma=1.24,
        system_prompt_tokens=512,
        system_prompt_count=4,
    ),
}
