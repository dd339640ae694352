"""CUDA-graph bucket clustering: short prefills grouped into captured (length, batch) shapes.

An engine replays a CUDA graph only for the shapes it captured. LAPS
captures short prefills on a grid of per-sequence lengths (8, 16, ..., 256
tokens) and batch sizes (1..64), pads each request to the nearest length
bucket and each batch to the nearest batch bucket, and so skips the eager
per-kernel launch cost of small, memory-bound batches (arXiv 2601.11589).
The batch sizes default to 1, 2, 4, 8 and every multiple of 8 up to 64, the
shape of SGLang's own capture list.

:meth:`GraphBuckets.plan` clusters one released batch of short prefills:

1. sort by uncached length; a request longer than the largest length bucket
   runs eager;
2. walk them in that order, each group taking the longest run from where
   the last one ended whose padded shape (``bucket(longest) x
   bucket(count)``) fits the grid and wastes at most ``max_padding_ratio``
   of its tokens on padding (empty sequences that fill the batch count as
   padding); a request that fits no group, even alone, runs eager;
3. with a step-cost function (the cost model), a group runs as a graph only
   if its padded graph step is estimated no slower than the same requests
   run eagerly, and the whole plan is replaced by one eager batch when that
   is estimated faster than the plan's steps together: every extra step
   streams the weights once more, which can cost more than a graph saves.

Eager requests form one group of their own (``padded_batch == 0``).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise

from traces.errors import ConfigError

__all__ = [
    "DEFAULT_BATCH_SIZES",
    "DEFAULT_LENGTHS",
    "GraphBuckets",
    "GraphGroup",
    "StepCostFn",
    "parse_grid",
]

#: LAPS's captured per-sequence prefill lengths, tokens.
DEFAULT_LENGTHS: tuple[int, ...] = (8, 16, 32, 64, 128, 256)
#: Captured batch sizes: 1, 2, 4, 8, then every multiple of 8 up to LAPS's 64.
DEFAULT_BATCH_SIZES: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64)

#: ``(new tokens, cached tokens, cuda_graph) -> seconds`` of one prefill step.
StepCostFn = Callable[[Sequence[int], Sequence[int], bool], float]


def parse_grid(text: str | Sequence[int], field: str) -> tuple[int, ...]:
    """A grid axis from ``"8,16,32"`` (or a sequence): positive, strictly increasing integers.

    Raises:
        ConfigError: naming ``field``, for anything else.
    """
    try:
        if isinstance(text, str):
            values = tuple(int(part) for part in text.split(",") if part.strip())
        else:
            values = tuple(int(v) for v in text)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{field}: expected comma-separated positive integers; got {text!r}"
        ) from None
    if not values or values[0] < 1 or any(b <= a for a, b in pairwise(values)):
        raise ConfigError(f"{field}: expected positive, strictly increasing integers; got {text!r}")
    return values


@dataclass(frozen=True, slots=True)
class GraphGroup:
    """Requests to run as one prefill batch, and the captured shape it replays.

    ``indices`` point into the lengths given to :meth:`GraphBuckets.plan`.
    ``padded_batch == 0`` means eager (no padding).
    """

    indices: tuple[int, ...]
    #: Uncached tokens of the real requests.
    real_tokens: int
    #: New tokens of every sequence of the captured shape (0 when eager).
    padded_tokens: int = 0
    #: Sequences of the captured shape (0 when eager).
    padded_batch: int = 0

    @property
    def cuda_graph(self) -> bool:
        """Whether the group replays a captured graph."""
        return self.padded_batch > 0

    @property
    def shape_tokens(self) -> int:
        """Tokens the step computes: the padded shape's, or the real ones when eager."""
        return self.padded_tokens * self.padded_batch if self.cuda_graph else self.real_tokens

    @property
    def padding_ratio(self) -> float:
        """Share of the computed tokens that are padding (0 when eager)."""
        shape = self.shape_tokens
        return 1.0 - self.real_tokens / shape if shape else 0.0


class GraphBuckets:
    """A captured grid and the clustering of short prefills onto it (see the module doc).

    Args:
        lengths: captured per-sequence lengths, tokens, increasing.
        batch_sizes: captured batch sizes, increasing.
        max_padding_ratio: the most of a graph step's tokens that may be padding.

    Raises:
        ConfigError: an axis that is not positive and increasing, or a ratio outside [0, 1).
    """

    __slots__ = ("batch_sizes", "lengths", "max_padding_ratio")

    def __init__(
        self,
        lengths: Sequence[int] | str = DEFAULT_LENGTHS,
        batch_sizes: Sequence[int] | str = DEFAULT_BATCH_SIZES,
        max_padding_ratio: float = 0.25,
    ) -> None:
        self.lengths = parse_grid(lengths, "graph_lengths")
        self.batch_sizes = parse_grid(batch_sizes, "graph_batch_sizes")
        if not 0.0 <= max_padding_ratio < 1.0:
            raise ConfigError(
                f"max_padding_ratio: expected a number in [0, 1); got {max_padding_ratio!r}"
            )
        self.max_padding_ratio = float(max_padding_ratio)

    @property
    def max_length(self) -> int:
        """The longest captured per-sequence length."""
        return self.lengths[-1]

    @property
    def max_batch(self) -> int:
        """The largest captured batch."""
        return self.batch_sizes[-1]

    def length_bucket(self, tokens: int) -> int | None:
        """The smallest captured length holding ``tokens``, or None when none does."""
        i = bisect_left(self.lengths, tokens)
        return self.lengths[i] if i < len(self.lengths) else None

    def batch_bucket(self, count: int) -> int | None:
        """The smallest captured batch size holding ``count`` sequences, or None."""
        i = bisect_left(self.batch_sizes, count)
        return self.batch_sizes[i] if i < len(self.batch_sizes) else None

    def shape(self, lengths: Sequence[int]) -> GraphGroup | None:
        """The graph group of all of ``lengths`` (indices 0..n-1), or None off the grid."""
        if not lengths:
            return None
        pad_len = self.length_bucket(max(lengths))
        pad_batch = self.batch_bucket(len(lengths))
        if pad_len is None or pad_batch is None:
            return None
        return GraphGroup(tuple(range(len(lengths))), sum(lengths), pad_len, pad_batch)

    def plan(
        self,
        lengths: Sequence[int],
        cached: Sequence[int] | None = None,
        step_cost: StepCostFn | None = None,
    ) -> list[GraphGroup]:
        """Cluster prefills of ``lengths`` uncached tokens into graph groups and one eager group.

        ``cached`` (cached tokens of each, for the cost estimate) and
        ``step_cost`` are optional; see the module doc. Graph groups come
        first, shortest first; the eager group, if any, last.
        """
        n = len(lengths)
        if n == 0:
            return []
        cached = list(cached) if cached is not None else [0] * n
        order = sorted(range(n), key=lambda i: (lengths[i], i))
        fits = [i for i in order if lengths[i] <= self.max_length]
        eager = [i for i in order if lengths[i] > self.max_length]
        planned: list[GraphGroup] = []
        start = 0
        while start < len(fits):
            # The largest run from here whose padded shape keeps within the cap.
            for k in range(min(self.max_batch, len(fits) - start), 0, -1):
                run = fits[start : start + k]
                group = self._graph(run, sum(lengths[i] for i in run), lengths)
                if group.padding_ratio <= self.max_padding_ratio:
                    planned.append(group)
                    start += k
                    break
            else:
                eager.append(fits[start])
                start += 1
        if step_cost is not None:
            planned = self._cheaper(planned, eager, lengths, cached, step_cost)
        if eager:
            eager.sort()
            planned.append(GraphGroup(tuple(eager), sum(lengths[i] for i in eager)))
        return planned

    def _graph(self, members: list[int], real: int, lengths: Sequence[int]) -> GraphGroup:
        pad_len = self.length_bucket(max(lengths[i] for i in members))
        pad_batch = self.batch_bucket(len(members))
        assert pad_len is not None and pad_batch is not None
        return GraphGroup(tuple(members), real, pad_len, pad_batch)

    @staticmethod
    def _cheaper(
        planned: list[GraphGroup],
        eager: list[int],
        lengths: Sequence[int],
        cached: Sequence[int],
        step_cost: StepCostFn,
    ) -> list[GraphGroup]:
        """Keep graph groups that pay off; fall back to one eager batch when that is faster.

        Demoted requests join ``eager`` (in place).
        """

        def eager_s(idx: Sequence[int]) -> float:
            if not idx:
                return 0.0
            return step_cost([lengths[i] for i in idx], [cached[i] for i in idx], False)

        kept: list[GraphGroup] = []
        graph_total = 0.0
        for g in planned:
            pad = g.padded_batch - len(g.indices)
            news = [g.padded_tokens] * g.padded_batch
            cach = [cached[i] for i in g.indices] + [0] * pad
            t_graph = step_cost(news, cach, True)
            if t_graph <= eager_s(g.indices):
                kept.append(g)
                graph_total += t_graph
            else:
                eager.extend(g.indices)
        if kept:
            everyone = [i for g in kept for i in g.indices] + eager
            if eager_s(everyone) < graph_total + eager_s(eager):
                eager.extend(i for g in kept for i in g.indices)
                kept = []
        return kept
