"""``cache_aware``: the SGLang router's rule, prefix affinity unless the load is imbalanced.

The rule (sgl-model-gateway/src/policies/cache_aware.rs, and sgl-router/ in
older trees), with load = outstanding (waiting plus running) requests, taken
over the healthy candidates:

1. Imbalanced if ``max_load - min_load > balance_abs_threshold`` and
   ``max_load > balance_rel_threshold * min_load``: the least-loaded instance
   (ties: lower id).
2. Otherwise the instance whose record matches the longest prefix of the
   prompt, if ``matched tokens / prompt tokens > cache_threshold`` (ties:
   fewer outstanding requests, then lower id; the gateway takes any holder).
3. Otherwise the instance with the smallest record (ties: lower id), the
   one with the most room for new prefixes.

Every placement, whichever branch made it, adds the prompt to the chosen
instance's record.

The record: the gateway keeps an approximate radix tree per worker of the
text it routed there, never asking the engines what they hold. Here it is
the core router-side record, :class:`scheduler.prefix.PrefixRecord`, over
the request's chained ``prefix_hashes``: each instance's record holds the
blocks sent to it, and its match is the longest leading run of the prompt's
blocks it holds. Deliberate differences from the gateway:

* blocks, not characters: the match is counted in whole blocks of
  ``block_tokens`` (the last one may be partial), keyed by hash and size;
* a prompt without hashes counts toward the record's size (as the
  gateway's tree grows with every text) but can never match;
* the record is bounded by ``max_tree_tokens`` (not by the instance's KV
  capacity, as the record the simulator's views keep is) and evicts least
  recently sent blocks on insert, a prompt's tail before its head, as the
  radix tree evicts leaves before their parents; the gateway evicts to
  ``max_tree_size`` on a timer;
* the record is the policy's own: what other policies or drivers sent is
  not in it, as the gateway's tree holds only what it routed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from scheduler.params import PolicyConfig, param
from scheduler.policy import ClusterView, InstanceView, RequestLike
from scheduler.prefix import PrefixRecord
from scheduler.registry import register
from scheduler.routing import RoutingPolicy, healthy_instances

__all__ = ["CacheAwareConfig", "CacheAwarePolicy"]

_DEFAULTS = "SGLang router launch defaults (sglang_router router_args.py)"


@dataclass(frozen=True)
class CacheAwareConfig(PolicyConfig):
    """Parameters of ``cache_aware``; the defaults are the SGLang router's."""

    cache_threshold: float = param(
        0.3,
        help="Least prefix match rate (matched / prompt tokens) for prefix affinity; "
        "at or below it the instance with the smallest record is taken.",
        source=_DEFAULTS,
        unit="fraction",
        ge=0.0,
        le=1.0,
    )
    balance_abs_threshold: int = param(
        64,
        help="Load is imbalanced only if the busiest instance has more than this many "
        "outstanding requests over the idlest ...",
        source=_DEFAULTS,
        unit="requests",
        ge=0,
    )
    balance_rel_threshold: float = param(
        1.5,
        help="... and more than this many times as many; then the least loaded is taken.",
        source=_DEFAULTS,
        unit="ratio",
        ge=0.0,
    )
    max_tree_tokens: int = param(
        2**24,
        help="Prompt tokens each instance's record holds at most before evicting the least "
        "recently sent blocks.",
        source="router max_tree_size 2**26 characters at about 4 characters per token",
        gt=0,
    )


def _block_tokens(request: RequestLike, n_blocks: int) -> int:
    if request.block_tokens:
        return request.block_tokens
    return max(1, -(-request.prompt_tokens // n_blocks))


@register("cache_aware")
class CacheAwarePolicy(RoutingPolicy):
    """Prefix affinity when the load is balanced, the least loaded when it is not (SGLang router)."""

    config_class = CacheAwareConfig
    source = (
        "sgl-model-gateway/src/policies/cache_aware.rs (sgl-router/src/policies/ in older trees)"
    )
    config: CacheAwareConfig

    def __init__(self, config: CacheAwareConfig | None = None, /, **params: object) -> None:
        super().__init__(config, **params)
        self._record = PrefixRecord(self.config.max_tree_tokens, count_unhashed=True)

    def tree_tokens(self, instance_id: int) -> int:
        """Prompt tokens in the record of what was sent to ``instance_id``."""
        return self._record.size_tokens(instance_id)

    def choose(
        self,
        request: RequestLike,
        candidates: Sequence[InstanceView],
        view: ClusterView,
        now_s: float,
    ) -> InstanceView | None:
        healthy = healthy_instances(candidates)
        if not healthy:
            return None
        cfg = self.config
        loads = [inst.outstanding for inst in healthy]
        lo, hi = min(loads), max(loads)
        if hi - lo > cfg.balance_abs_threshold and hi > cfg.balance_rel_threshold * lo:
            target = min(zip(loads, healthy, strict=True), key=lambda p: (p[0], p[1].instance_id))[
                1
            ]
        else:
            target = self._by_prefix(request, healthy, loads)
        self._record.record(target.instance_id, request)
        return target

    def _by_prefix(
        self, request: RequestLike, healthy: list[InstanceView], loads: list[int]
    ) -> InstanceView:
        hashes = request.prefix_hashes
        prompt = request.prompt_tokens
        if hashes and prompt > 0:
            best_key, best = None, healthy[0]
            record = self._record
            for inst, load in zip(healthy, loads, strict=True):
                iid = inst.instance_id
                key = (-record.cached_blocks(iid, request), load, iid)
                if best_key is None or key < best_key:
                    best_key, best = key, inst
            assert best_key is not None
            matched = min(-best_key[0] * _block_tokens(request, len(hashes)), prompt)
            if matched / prompt > self.config.cache_threshold:
                return best
        return min(healthy, key=lambda inst: (self.tree_tokens(inst.instance_id), inst.instance_id))

    def reset(self) -> None:
        super().reset()
        self._record.reset()
