"""Test doubles for the simulator: an affine step-cost model and trace builders."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from scheduler.policy import NO_DECISIONS, ClusterView, Decisions, Policy, RequestLike
from sim.limits import EngineLimits
from traces.trace import Trace

__all__ = ["AffineCost", "HoldingPolicy", "make_limits", "make_trace", "random_trace"]


class AffineCost:
    """A :class:`scheduler.cost_model.StepCost` with simple, exactly known formulas.

    prefill: ``base + per_token * sum(new) + attn * sum(new * (cached + new / 2))``;
    decode of ``n`` sequences over ``ctx`` context tokens:
    ``decode_base + per_seq * n + per_ctx * ctx``; a mixed step is the prefill
    time plus the decode terms without ``decode_base``.
    """

    def __init__(
        self,
        *,
        prefill_base_s: float = 0.010,
        prefill_per_token_s: float = 5e-5,
        prefill_attn_s: float = 0.0,
        decode_base_s: float = 0.005,
        decode_per_seq_s: float = 2e-5,
        decode_per_ctx_s: float = 1e-8,
        transfer_base_s: float = 0.002,
        transfer_per_token_s: float = 1e-6,
        kv_capacity_tokens: int = 1_000_000,
    ) -> None:
        self.prefill_base_s = prefill_base_s
        self.prefill_per_token_s = prefill_per_token_s
        self.prefill_attn_s = prefill_attn_s
        self.decode_base_s = decode_base_s
        self.decode_per_seq_s = decode_per_seq_s
        self.decode_per_ctx_s = decode_per_ctx_s
        self.transfer_base_s = transfer_base_s
        self.transfer_per_token_s = transfer_per_token_s
        self._capacity = kv_capacity_tokens

    def prefill_time_s(
        self, new_tokens: Sequence[int], cached_tokens: Sequence[int], *, cuda_graph: bool = False
    ) -> float:
        attn = sum(n * (c + n / 2) for n, c in zip(new_tokens, cached_tokens, strict=True))
        return (
            self.prefill_base_s
            + self.prefill_per_token_s * sum(new_tokens)
            + self.prefill_attn_s * attn
        )

    def decode_coeffs(self, batch_size: int, *, cuda_graph: bool = True) -> tuple[float, float]:
        return self.decode_base_s + self.decode_per_seq_s * batch_size, self.decode_per_ctx_s

    def decode_time_s(
        self, batch_size: int, context_tokens: int, *, cuda_graph: bool = True
    ) -> float:
        a, b = self.decode_coeffs(batch_size)
        return a + b * context_tokens

    def mixed_time_s(
        self,
        new_tokens: Sequence[int],
        cached_tokens: Sequence[int],
        decode_batch_size: int,
        decode_context_tokens: int,
    ) -> float:
        return (
            self.prefill_time_s(new_tokens, cached_tokens)
            + self.decode_per_seq_s * decode_batch_size
            + self.decode_per_ctx_s * decode_context_tokens
        )

    def kv_transfer_time_s(self, tokens: int) -> float:
        return self.transfer_base_s + self.transfer_per_token_s * tokens

    @property
    def kv_bytes_per_token(self) -> int:
        return 1

    def kv_capacity_tokens(self, mem_fraction_static: float) -> int:
        return self._capacity


def make_limits(**overrides: int | bool) -> EngineLimits:
    """Engine limits with small defaults (override any field)."""
    base: dict[str, int | bool] = {
        "max_running_requests": 64,
        "max_prefill_tokens": 4096,
        "chunked_prefill_size": 2048,
        "max_total_tokens": 200_000,
        "cuda_graph_max_bs": 32,
    }
    base.update(overrides)
    return EngineLimits(**base)  # type: ignore[arg-type]


def make_trace(
    arrival_s: Sequence[float],
    prompt_tokens: Sequence[int],
    output_tokens: Sequence[int],
    *,
    prefix_hashes: Sequence[Sequence[int] | None] | None = None,
    block_tokens: int | None = None,
    failed: Sequence[bool] | None = None,
    slo_ttft_s: Sequence[float] | None = None,
    slo_tpot_s: Sequence[float] | None = None,
) -> Trace:
    """A trace from plain columns (prefix hashes optional)."""
    cols: dict[str, object] = {
        "arrival_s": np.asarray(arrival_s, dtype=np.float64),
        "prompt_tokens": np.asarray(prompt_tokens, dtype=np.int64),
        "output_tokens": np.asarray(output_tokens, dtype=np.int64),
    }
    n = len(arrival_s)
    if prefix_hashes is not None:
        hashes = np.empty(n, dtype=object)
        for i, h in enumerate(prefix_hashes):
            hashes[i] = None if h is None else np.asarray(h, dtype=np.int64)
        cols["prefix_hashes"] = hashes
        cols["block_tokens"] = pd.array([block_tokens] * n, dtype="Int64")
    if failed is not None:
        cols["failed"] = np.asarray(failed, dtype=bool)
    if slo_ttft_s is not None:
        cols["slo_ttft_s"] = np.asarray(slo_ttft_s, dtype=np.float64)
    if slo_tpot_s is not None:
        cols["slo_tpot_s"] = np.asarray(slo_tpot_s, dtype=np.float64)
    return Trace(pd.DataFrame(cols), name="test")


class HoldingPolicy(Policy):
    """Holds arrivals and releases them in batches: exercises timers, progress and views.

    Every arrival is held; a timer ``window_s`` after the first held one
    releases them all, each to the entry instance with the most cached prefix
    blocks, then the least KV in use (both read mid-stretch). A progress
    report releases one held request to the reporting instance when its
    queue is empty.
    """

    name = "holding"

    def __init__(self, window_s: float = 0.02) -> None:
        self.window_s = window_s
        self.held: list[RequestLike] = []

    def on_arrival(self, request: RequestLike, now_s: float, view: ClusterView) -> Decisions:
        self.held.append(request)
        if len(self.held) == 1:
            return Decisions(wake_at_s=now_s + self.window_s)
        return NO_DECISIONS

    def on_timer(self, now_s: float, view: ClusterView) -> Decisions:
        pool = view.pool("entry")
        out = []
        for req in self.held:
            best = max(pool, key=lambda v: (v.cached_prefix_blocks(req), -v.kv_used_tokens))
            out.append((req, best.instance_id))
        self.held = []
        return Decisions(tuple(out))

    def on_progress(self, instance_id: int, now_s: float, view: ClusterView) -> Decisions:
        inst = view.instance(instance_id)
        if self.held and inst.role != "decode" and inst.n_waiting == 0:
            return Decisions.dispatch(self.held.pop(0), instance_id)
        return NO_DECISIONS

    def reset(self) -> None:
        self.held = []


def random_trace(
    seed: int,
    n: int = 200,
    *,
    mean_gap_s: float = 0.04,
    max_prompt: int = 3000,
    max_output: int = 300,
    block_tokens: int | None = 64,
) -> Trace:
    """A random trace; with ``block_tokens``, prompts share system-prompt blocks (prefix hits)."""
    rng = np.random.default_rng(seed)
    arrival = np.cumsum(rng.exponential(mean_gap_s, n))
    prompt = rng.integers(1, max_prompt, n)
    output = rng.integers(1, max_output, n)
    hashes = None
    if block_tokens:
        hashes = []
        for i in range(n):
            n_blocks = -(-int(prompt[i]) // block_tokens)
            shared = min(n_blocks, int(rng.integers(0, 10)))
            family = 1000 + 100 * int(rng.integers(0, 4))
            own = [10**6 + 1000 * i + j for j in range(n_blocks - shared)]
            hashes.append([family + j for j in range(shared)] + own)
    return make_trace(arrival, prompt, output, prefix_hashes=hashes, block_tokens=block_tokens)
