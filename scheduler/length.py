"""Short or long: classifying a prefill by the prompt tokens it still has to compute.

A request's prefill length is its **uncached** prompt: the prompt minus the
prefix the target instance already holds in its cache
(``InstanceView.cached_prefix_blocks(request) * block_tokens``), and at
least one token (an engine always computes the last one). In multi-turn
chat the history is cached, so a long conversation's next turn is usually a
short prefill. What the instance holds is what its view says: a router's
estimate from its record of the prompts it sent there
(:class:`scheduler.prefix.PrefixRecord`), which is also the simulator's
default; the engine's exact cache only under the simulator's oracle option.

The threshold is static (LAPS: 256 tokens; LMSYS-Chat-1M has 63% of first
turns and 81% of later turns under it, arXiv 2601.11589) or adaptive: the
length ``L`` where a prefill with ``H`` cached tokens stops being
memory-bound, the positive root of ``T_comp(L, H) = T_mem(L, H)`` with
LAPS's two terms::

    T_comp = a * L * (L + 2H) + b * L + e     attention, linear layers, LM head
    T_mem  = w + c * L + d * H                weights, KV written, KV read

read off the cost model's coefficients (:class:`scheduler.cost_model.Coefficients`:
``a`` = attention per unit / 2, ``b`` = linear layers per token, ``e`` = LM
head per sequence, ``w`` = weight read, ``c`` = ``d`` = KV bytes per token
over HBM bandwidth). The terms are re-read whenever the cost model's
coefficients object changes (a calibrated profile loaded), so the threshold
follows calibration. For Qwen2.5-32B on one H200 the crossover is 159 new
tokens with nothing cached and 120 with 16k cached (227 and 172 on an H100):
below LAPS's 256 because a 32B model's weights take 17 ms to stream from
the H200's HBM and its GEMMs catch up after about 160 tokens.
"""

from __future__ import annotations

from typing import Any

from scheduler.cost_model import RooflineTerms
from scheduler.policy import InstanceView, RequestLike
from traces.errors import ConfigError

__all__ = ["DEFAULT_THRESHOLD_TOKENS", "LengthClassifier", "RooflineTerms", "crossover_tokens"]

#: LAPS's short/long threshold, in uncached prompt tokens (arXiv 2601.11589).
DEFAULT_THRESHOLD_TOKENS = 256


def crossover_tokens(cost: Any, cached_tokens: int = 0) -> int:
    """The adaptive threshold for a prefill with ``cached_tokens`` cached, from a cost model.

    Uses the cost model's ``coefficients`` (LAPS's full form,
    :class:`~scheduler.cost_model.RooflineTerms`, the one definition); a cost
    model without them but with ``prefill_crossover_tokens`` answers for itself.

    Raises:
        ConfigError: the cost model offers neither.
    """
    k = getattr(cost, "coefficients", None)
    if k is not None:
        return RooflineTerms.from_coefficients(k).crossover_tokens(cached_tokens)
    own = getattr(cost, "prefill_crossover_tokens", None)
    if own is not None:
        return int(own(cached_tokens=cached_tokens))
    raise ConfigError(
        f"adaptive threshold: the cost model {type(cost).__name__} has neither "
        "coefficients nor prefill_crossover_tokens"
    )


class LengthClassifier:
    """Classifies prefills as short or long by their uncached prompt tokens.

    Args:
        threshold_tokens: the static threshold: a prefill of at most this many
            uncached tokens is short.
        adaptive: use the cost model's compute/memory crossover instead.
        cost: the cost model (required when ``adaptive``; may be given later
            with :meth:`use_cost_model`).

    Raises:
        ConfigError: a threshold below 1.
    """

    __slots__ = ("_cost", "_seen", "_terms", "adaptive", "threshold_tokens")

    def __init__(
        self,
        threshold_tokens: int = DEFAULT_THRESHOLD_TOKENS,
        *,
        adaptive: bool = False,
        cost: Any = None,
    ) -> None:
        if not isinstance(threshold_tokens, int) or threshold_tokens < 1:
            raise ConfigError(
                f"threshold_tokens: expected an integer >= 1; got {threshold_tokens!r}"
            )
        self.threshold_tokens = threshold_tokens
        self.adaptive = adaptive
        self._cost = cost
        self._seen: Any = None
        self._terms: RooflineTerms | None = None

    def use_cost_model(self, cost: Any) -> None:
        """Take the adaptive threshold from ``cost`` from now on."""
        self._cost = cost
        self._seen = self._terms = None

    @staticmethod
    def uncached_tokens(request: RequestLike, instance: InstanceView | None) -> tuple[int, int]:
        """``(uncached, cached)`` prompt tokens of ``request`` on ``instance`` (None: nothing cached).

        The uncached part is at least 1: a fully cached prompt still computes its last token.
        """
        prompt = request.prompt_tokens
        block = request.block_tokens
        if instance is None or not block or not request.prefix_hashes:
            return max(1, prompt), 0
        cached = min(prompt, instance.cached_prefix_blocks(request) * block)
        return max(1, prompt - cached), cached

    def threshold_for(self, cached_tokens: int = 0) -> int:
        """The threshold, in uncached tokens, for a prefill with ``cached_tokens`` cached.

        Raises:
            ConfigError: adaptive with no usable cost model.
        """
        if not self.adaptive:
            return self.threshold_tokens
        cost = self._cost
        if cost is None:
            raise ConfigError(
                "adaptive threshold needs a cost model: give the policy a model and gpu "
                "or call use_cost_model()"
            )
        k = getattr(cost, "coefficients", None)
        if k is None:
            return crossover_tokens(cost, cached_tokens)
        if k is not self._seen:  # a new profile: re-read the terms
            self._seen, self._terms = k, RooflineTerms.from_coefficients(k)
        assert self._terms is not None
        return self._terms.crossover_tokens(cached_tokens)

    def is_short(self, uncached_tokens: int, cached_tokens: int = 0) -> bool:
        """Whether a prefill of ``uncached_tokens`` new over ``cached_tokens`` cached is short."""
        return uncached_tokens <= self.threshold_for(cached_tokens)

    def classify(
        self, request: RequestLike, instance: InstanceView | None
    ) -> tuple[bool, int, int]:
        """``(short, uncached, cached)`` for ``request`` sent to ``instance``."""
        uncached, cached = self.uncached_tokens(request, instance)
        return self.is_short(uncached, cached), uncached, cached
