"""Step-time cost model shared by the simulator, the emulator and policies.

The contract every driver relies on is :class:`StepCost`: how long one
forward pass of an instance takes, given what is in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

__all__ = ["StepCost"]


@runtime_checkable
class StepCost(Protocol):
    """Durations of engine steps, in seconds.

    ``decode_time_s`` must be affine in ``context_tokens`` for a fixed batch
    size (``a + b * context_tokens``, with ``(a, b) = decode_coeffs(n)``), so
    a stretch of decode steps whose batch does not change has a closed-form
    duration.
    """

    def prefill_time_s(
        self, new_tokens: Sequence[int], cached_tokens: Sequence[int], *, cuda_graph: bool = False
    ) -> float:
        """One prefill (extend) pass over sequences with these new and cached tokens."""
        ...

    def decode_time_s(self, batch_size: int, context_tokens: int, *, cuda_graph: bool = True) -> float:
        """One decode step of ``batch_size`` sequences whose contexts total ``context_tokens``."""
        ...

    def decode_coeffs(self, batch_size: int, *, cuda_graph: bool = True) -> tuple[float, float]:
        """``(a, b)`` with ``decode_time_s(n, ctx) == a + b * ctx`` for ``n == batch_size``."""
        ...

    def mixed_time_s(
        self,
        new_tokens: Sequence[int],
        cached_tokens: Sequence[int],
        decode_batch_size: int,
        decode_context_tokens: int,
    ) -> float:
        """One step that runs prefill chunks and decode sequences together."""
        ...

    def kv_transfer_time_s(self, tokens: int) -> float:
        """Moving ``tokens`` tokens of KV cache between instances (PD disaggregation)."""
        ...

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes one token occupies on one instance (all layers, after TP split)."""
        ...

    def kv_capacity_tokens(self, mem_fraction_static: float) -> int:
        """Tokens of KV cache that fit in one instance's memory."""
        ...
