"""``laps``: length-aware prefill scheduling (LAPS, arXiv 2601.11589).

Each arrival is classified short or long by the prompt tokens its target
instance still has to compute (:mod:`scheduler.length`: static threshold or
the cost model's compute/memory crossover). Then, by ``mode``:

* **temporal** (``auto``, the default, or ``mode=temporal``): the policy holds
  two queues per instance (:class:`scheduler.batch_window.PrefillQueue`)
  and hands the instance work only when it can take it: all that was sent
  there and has no first token yet is the last unit released, so at most
  one unit waits behind the prefill in progress (the router's own count,
  not a polled queue: the rule holds however late the gauges are), and, for
  a prefill-role instance, nothing waits or is prefilled (so the released
  work is exactly its next step). It then releases the
  short queue's head batch if due (the batch window below), otherwise one
  long request if no short one is held. A long request ranks as if it had
  arrived ``max_wait_ms`` later, so it goes first once it arrived that much
  before the oldest short one (the starvation bound;
  :mod:`scheduler.policies.laps_temporal`). With several entry instances
  an arrival is held for one of the healthy instances within
  ``max_skew_requests`` outstanding requests (sent and held) of the least
  loaded: the one holding most of its prompt's prefix, when that is more
  than ``affinity_threshold`` of the prompt (a session's earlier turns, not
  a shared system prompt); otherwise the one with the least backlog (queued
  plus held prefill tokens) after its own uncached tokens, so a cached
  prefix counts; ties go to fewer outstanding requests, then the lower id
  (``placement``).
* **spatial** (``mode=spatial``): short and long pools
  (:mod:`scheduler.policies.laps_spatial`), rebalanced from queue pressure;
  long requests are dispatched at once to their pool, short ones pass
  through the batch window and the release rule above on their instance.
  ``auto`` no longer picks it: pools sized by instance count lost to the
  best baseline on every matrix cell with several entry instances
  (``docs/laps.md``).

Batch window (:mod:`scheduler.batch_window`): short requests are held up
to ``window_ms`` or until ``max_batch`` wait, or less when a request's TTFT
slack runs out (``arrival + SLO - now - estimated prefill``).
``window_ms=0`` is a plain dual queue. With ``release_alone`` a short
request that finds its instance ready and nothing else held for it goes at
once: holding it cannot form a batch from what is held (off by default:
the matrix measured no gain). With ``graph_buckets`` each released
batch is clustered onto the captured CUDA-graph grid
(:mod:`scheduler.graph_buckets`) and graph groups go out with a
:class:`~scheduler.policy.BatchHint`, which the simulator runs as one
padded graph step. Under prefill/decode disaggregation ``laps`` is the
prefill side of ``create_pd("laps", decode)``.

Failure and change. Placement skips unhealthy instances. Work held for an
instance that turns unhealthy, or leaves the entry pool, is taken back at
the policy's next event (``on_health`` at once, where the driver reports
health; otherwise the next arrival or timer) and placed again, oldest
first, keeping its age for the starvation bound and the window. Instances
that join the entry pool get queues and (spatial) a pool. With no healthy
entry instance, requests are parked in arrival order and retried every
:data:`scheduler.routing.HOLD_RETRY_S`, as the routing policies do; nothing
raises. The mode (temporal or spatial) is chosen once, at the first arrival.

The cost model (for the adaptive threshold, slack estimates and the graph
plan's cost check) comes from the driver through
:meth:`LapsPolicy.use_cost_model` (the simulator hands over its instances'
model, calibrated profile included), or is built from the catalogue's
``model``/``gpu``/``tp``; the policy reads no file. Without one the
threshold must be static, estimates are 0 and every in-cap graph group is
used.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from scheduler.batch_window import BatchWindow, Held, slack_deadline_s
from scheduler.graph_buckets import DEFAULT_BATCH_SIZES, DEFAULT_LENGTHS, GraphBuckets, parse_grid
from scheduler.length import DEFAULT_THRESHOLD_TOKENS, LengthClassifier
from scheduler.params import PolicyConfig, make_config, param
from scheduler.policies.laps_spatial import Placement, PoolSplit
from scheduler.policies.laps_temporal import DualQueues
from scheduler.policy import NO_DECISIONS, ClusterView, Decisions, InstanceView, Policy, RequestLike
from scheduler.registry import register
from scheduler.routing import HOLD_RETRY_S
from traces.errors import ConfigError

__all__ = ["LapsConfig", "LapsPolicy"]

_PAPER = "LAPS, arXiv 2601.11589"


@dataclass(frozen=True)
class LapsConfig(PolicyConfig):
    """Parameters of ``laps``."""

    mode: Literal["auto", "temporal", "spatial"] = param(
        "auto",
        help="temporal: dual queue per instance; spatial: short and long instance pools; "
        "auto: temporal (the policy matrix: spatial pools sized by instance count lost on "
        "every cell with several entry instances, temporal matched or beat the best baseline).",
        source=_PAPER + " (temporal and spatial disaggregation); bench/bench_policy_matrix.py "
        "(docs/laps.md)",
    )
    placement: Literal["bounded", "affinity", "backlog"] = param(
        "affinity",
        help="Temporal, several entry instances: backlog: the least prefill backlog (queued "
        "and held tokens plus the request's uncached ones, so a cached prefix counts), then "
        "fewer outstanding requests (sent and held), then the lower id; bounded: the same "
        "among the instances within max_skew_requests outstanding of the least; "
        "affinity: among those, the one holding most of the prompt's prefix first when it "
        "holds more than affinity_threshold of the prompt, else as bounded.",
        source="least_load's and cache_aware's rules (SGLang router) over laps's backlog; "
        "the policy matrix and the head-to-head (docs/laps.md): affinity cut violations at "
        "chat's knee by 30-45% against bounded, and matched it on the API and Azure traces",
    )
    backlog: Literal["pending", "queued"] = param(
        "pending",
        help="Temporal placement's backlog of an instance: pending: prompt tokens sent there "
        "with no first token yet (queued or in their prefill, the router's own count); "
        "queued: only those its queue gauge shows (a long prefill in progress counts as "
        "nothing); both plus what is held for it.",
        source="The policy matrix (docs/laps.md): queued left Qwen2.5-32B Azure conv at "
        "0.88-0.89 of cache_aware's knee",
    )
    affinity_threshold: float = param(
        0.3,
        help="Affinity placement: follow the prefix only when the instance holding most of it "
        "holds more than this share of the prompt; otherwise place as bounded does.",
        source="cache_aware's cache_threshold (SGLang router default 0.3)",
        unit="fraction",
        ge=0.0,
        le=1.0,
    )
    max_skew_requests: int = param(
        64,
        help="Bounded and affinity placement: an instance is a candidate only if it has at "
        "most this many outstanding requests (sent and held) more than the least loaded.",
        source="cache_aware's balance_abs_threshold (SGLang router default 64); with affinity, "
        "16 kept a session's turns off their prefix holder and cost most of its gain "
        "(docs/laps.md)",
        unit="requests",
        ge=0,
    )
    release_alone: bool = param(
        False,
        help="Release a short request at once when its instance can take work and nothing "
        "else is held for it (holding cannot form a batch from what is held); False: hold "
        "it for the window, for later arrivals to join.",
        source="The policy matrix (docs/laps.md): on, every cell within 1% of off; off keeps "
        "the window of LAPS, arXiv 2601.11589",
    )
    long_batch_tokens: int = param(
        8192,
        help="Temporal: a release that hands over a long request adds the next long ones "
        "(in the queue's order, while they still rank before the short queue) up to this many "
        "uncached tokens, so the engine prefills them in one step; 0: one long request per "
        "release.",
        source="SGLang's chunked_prefill_size on H100/H200 (8192): a step that size is "
        "compute-bound, so joining long prefills costs no extra work, while each extra "
        "prefill step stalls every running decode (the policy matrix, docs/laps.md)",
        unit="tokens",
        ge=0,
    )
    threshold_mode: Literal["static", "adaptive"] = param(
        "static",
        help="static: threshold_tokens; adaptive: the cost model's compute/memory crossover "
        "for the request's cached prefix.",
        source=_PAPER + " (T_comp vs T_mem)",
    )
    threshold_tokens: int = param(
        DEFAULT_THRESHOLD_TOKENS,
        help="A prefill of at most this many uncached prompt tokens is short (static mode).",
        source=_PAPER + " (LMSYS-Chat-1M: 63% of first turns, 81% of later ones under 256)",
        ge=1,
    )
    window_ms: float = param(
        6.0,
        help="Longest hold of a short request for batching; 0: plain dual queue.",
        source=_PAPER + " (batch waiting window of a few ms); about a third of one short "
        "prefill step of Qwen2.5-32B on H200 (19-21 ms)",
        ge=0.0,
    )
    max_batch: int = param(
        64,
        help="Short requests per released batch; this many held release it at once.",
        source=_PAPER + " (graph grid batch sizes up to 64)",
        ge=1,
    )
    max_wait_ms: float = param(
        400.0,
        help="Starvation bound: a long request ranks as if it arrived this much later, so "
        "no short request arriving more than this after it goes first.",
        source="The 400 ms TTFT SLO of LAPS's evaluation: a long request is delayed at most "
        "one SLO beyond first come, first served",
        ge=0.0,
    )
    slo_ttft_ms: float = param(
        400.0,
        help="TTFT SLO for the window's slack check, when a request carries none.",
        source=_PAPER + " (TTFT SLO 0.4 s)",
        gt=0.0,
    )
    graph_buckets: bool = param(
        True,
        help="Cluster released short batches onto the CUDA-graph grid (padded graph steps).",
        source=_PAPER + " (CUDA Graph-based clustering)",
    )
    graph_lengths: str = param(
        ",".join(map(str, DEFAULT_LENGTHS)),
        help="Captured per-sequence lengths, tokens, comma-separated.",
        source=_PAPER,
        unit="tokens",
    )
    graph_batch_sizes: str = param(
        ",".join(map(str, DEFAULT_BATCH_SIZES)),
        help="Captured batch sizes, comma-separated.",
        source=_PAPER + " (1..64); 1, 2, 4, then multiples of 8 as SGLang captures",
    )
    max_padding_ratio: float = param(
        0.25,
        help="Most of a graph step's tokens that may be padding; a group above runs eager.",
        source="Assumption: a quarter, so padding costs at most a third more compute",
        unit="ratio",
        ge=0.0,
        le=0.99,
    )
    short_share: float = param(
        0.375,
        help="Spatial: share of the entry instances in the short pool at start (at least "
        "one in each pool).",
        source="Assumption: short prefills are most requests but little prefill compute; "
        "3 of 8 instances carried their prefill and decode best on LMSYS-like chat. "
        "Rebalancing corrects it",
        unit="ratio",
        gt=0.0,
        le=1.0,
    )
    rebalance_period_s: float = param(
        10.0,
        help="Spatial: cool-down; at most one instance changes pool per period.",
        source="Assumption: several times a long prefill, so a move is judged on its effect",
        gt=0.0,
    )
    rebalance_ratio: float = param(
        2.0,
        help="Spatial: move only when one pool's outstanding requests per instance exceed "
        "this times the other's ...",
        source="Assumption (hysteresis)",
        unit="ratio",
        ge=1.0,
    )
    rebalance_min_requests: int = param(
        16,
        help="... and exceed them by more than this many.",
        source="Assumption: a few decode batches' worth of change, not noise",
        ge=0,
    )
    model: str = param("", help="Cost model: served model name ('' for none).", source="catalogue")
    gpu: str = param("", help="Cost model: GPU name (with model).", source="catalogue")
    tp: int = param(1, help="Cost model: tensor parallelism.", source="catalogue", ge=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_grid(self.graph_lengths, "graph_lengths")
        parse_grid(self.graph_batch_sizes, "graph_batch_sizes")
        if bool(self.model) != bool(self.gpu):
            raise ConfigError("policy 'laps': model and gpu: set both or neither")


@register("laps")
class LapsPolicy(Policy):
    """Length-aware prefill: short prefills first and batched, long ones apart.

    Raises:
        ConfigError: bad parameters, or an adaptive threshold with no cost model.
    """

    config_class = LapsConfig
    source = _PAPER
    config: LapsConfig

    def __init__(self, config: LapsConfig | None = None, /, *, cost: Any = None, **params: Any):
        self.config = cfg = make_config(type(self), config, params)  # type: ignore[assignment]
        self.classifier = LengthClassifier(
            cfg.threshold_tokens, adaptive=cfg.threshold_mode == "adaptive"
        )
        buckets = None
        if cfg.graph_buckets:
            buckets = GraphBuckets(cfg.graph_lengths, cfg.graph_batch_sizes, cfg.max_padding_ratio)
        self.queues = DualQueues(
            BatchWindow(cfg.window_ms / 1000.0, cfg.max_batch),
            cfg.max_wait_ms / 1000.0,
            buckets,
            release_alone=cfg.release_alone,
            long_batch_tokens=cfg.long_batch_tokens,
        )
        self._slo_s = cfg.slo_ttft_ms / 1000.0
        self._pending = cfg.backlog == "pending"
        self.cost: Any = None
        if cost is None and cfg.model:
            from scheduler.cost_model import CostModel

            cost = CostModel.from_names(cfg.model, cfg.gpu, cfg.tp)
        if cost is not None:
            self.use_cost_model(cost)
        elif self.classifier.adaptive:
            self.classifier.threshold_for(0)  # raises: adaptive needs a cost model
        self.reset()

    def use_cost_model(self, cost: Any) -> None:
        """Estimate prefill times, the adaptive threshold and graph steps with ``cost``."""
        self.cost = self.queues.cost = cost
        self.classifier.use_cost_model(cost)

    def reset(self) -> None:
        self.queues.clear()
        #: The short/long pools (spatial mode, once the first request arrived).
        self.split: PoolSplit | None = None
        self._spatial = False
        self._started = False
        self._wake_s: float | None = None
        #: Requests that found no healthy entry instance, oldest first, with
        #: when they were first enqueued (so re-placed work keeps its age).
        self._parked: deque[tuple[RequestLike, float]] = deque()
        #: The entry pool as last seen (its identity, then its ids): a change
        #: means instances joined or left.
        self._entry_seen: object = None
        self._entry_ids: tuple[int, ...] = ()
        self._members: frozenset[int] = frozenset()

    @property
    def n_parked(self) -> int:
        """Requests waiting for any healthy entry instance."""
        return len(self._parked)

    # -- hooks ---------------------------------------------------------------------

    def on_arrival(self, request: RequestLike, now_s: float, view: ClusterView) -> Decisions:
        if not self._started:
            self._start(view)
        self._sync(view)
        split = self.split
        if split is not None:
            split.settle(now_s, view, self.queues.count)
            split.rebalance(now_s, view, self._outstanding)
        moved = self._evacuate(view)
        if not moved and not self._parked:  # the common case: place this one request
            placed = self._place(request, view)
            if placed is None:
                self._parked.append((request, now_s))
                return self._release(now_s, view, ())
            iid, short, uncached, cached = placed
            if split is not None and not short:
                return Decisions.dispatch(request, iid)
            self._hold(request, now_s, iid, short, uncached, cached)
            return self._release(now_s, view, (iid,))
        moved.append((request, now_s))
        return self._replace(moved, now_s, view)

    def queue_depths(self) -> dict[str, int]:
        q = self.queues
        return {
            "short": sum(len(x) for x in q.short.values()),
            "long": sum(len(x) for x in q.long.values()),
            "parked": len(self._parked),
        }

    def on_progress(self, instance_id: int, now_s: float, view: ClusterView) -> Decisions:
        queues = self.queues
        if instance_id not in queues.short:
            return NO_DECISIONS
        if self.split is not None:
            self.split.settle(now_s, view, queues.count)
        if not queues.count(instance_id):
            return NO_DECISIONS
        return self._release(now_s, view, (instance_id,))

    def on_timer(self, now_s: float, view: ClusterView) -> Decisions:
        if self._wake_s is not None and self._wake_s <= now_s:
            self._wake_s = None
        if not self._started:
            return NO_DECISIONS
        self._sync(view)
        if self.split is not None:
            self.split.settle(now_s, view, self.queues.count)
        moved = self._evacuate(view)
        if moved or self._parked:
            return self._replace(moved, now_s, view)
        holding = self.queues.holding()
        return self._release(now_s, view, holding) if holding else NO_DECISIONS

    def on_health(
        self, instance_id: int, healthy: bool, now_s: float, view: ClusterView
    ) -> Decisions:
        # The timer's checks are exactly what a health change calls for.
        return self.on_timer(now_s, view)

    # -- placement -----------------------------------------------------------------

    def _start(self, view: ClusterView) -> None:
        ids = [inst.instance_id for inst in view.pool("entry")]
        cfg = self.config
        self._spatial = cfg.mode == "spatial"
        for i in ids:
            self.queues.add_instance(i)
        if self._spatial:
            self.split = PoolSplit(
                ids,
                cfg.short_share,
                cfg.rebalance_period_s,
                cfg.rebalance_ratio,
                cfg.rebalance_min_requests,
            )
        self._entry_ids = tuple(ids)
        self._members = frozenset(ids)
        self._started = True

    def _sync(self, view: ClusterView) -> None:
        """Take in entry instances that joined; drop those that left (their held work moves).

        A view that hands out the same pool object while nothing changes
        (the simulator's) costs one identity check.
        """
        entry = view.pool("entry")
        if entry is self._entry_seen:
            return
        ids = tuple(inst.instance_id for inst in entry)
        if ids != self._entry_ids:
            known, now = set(self._entry_ids), set(ids)
            queues, split = self.queues, self.split
            for i in sorted(now - known):
                queues.add_instance(i)
                if split is not None:
                    split.add(i)
            for i in sorted(known - now):
                # Held work moves in _evacuate, which finds it by the missing id.
                if split is not None:
                    split.remove(i)
            self._entry_ids = ids
            self._members = frozenset(ids)
        self._entry_seen = entry

    def _evacuate(self, view: ClusterView) -> list[tuple[RequestLike, float]]:
        """Take back what is held for unhealthy or departed instances, oldest first."""
        queues = self.queues
        members = self._members
        short, long_ = queues.short, queues.long
        # One pass that changes nothing: on every arrival, usually nothing moves.
        bad = [
            i
            for i, q in short.items()
            if i not in members or ((q or long_[i]) and not view.instance(i).healthy)
        ]
        if not bad:
            return []
        moved: list[Held] = []
        for i in bad:
            moved.extend(queues.take_all(i))
            if i not in members:
                queues.remove_instance(i)
        moved.sort(key=lambda h: h.enqueued_s)
        return [(h.request, h.enqueued_s) for h in moved]

    def _replace(
        self, moved: list[tuple[RequestLike, float]], now_s: float, view: ClusterView
    ) -> Decisions:
        """Place parked and moved requests, oldest first; those finding no instance stay parked."""
        pending = sorted([*self._parked, *moved], key=lambda p: p[1])
        self._parked.clear()
        at_once: list[tuple[RequestLike, int]] = []
        touched: list[int] = []
        split = self.split
        for request, enqueued_s in pending:
            placed = None if self._parked else self._place(request, view)
            if placed is None:  # keep arrival order behind the first that found nothing
                self._parked.append((request, enqueued_s))
                continue
            iid, short, uncached, cached = placed
            if split is not None and not short:
                at_once.append((request, iid))
                continue
            self._hold(request, enqueued_s, iid, short, uncached, cached)
            if iid not in touched:
                touched.append(iid)
        return self._release(now_s, view, touched, at_once)

    def _place(self, request: RequestLike, view: ClusterView) -> Placement | None:
        split = self.split
        if split is not None:
            return split.place(request, view, self.classifier, self._backlog)
        return self._place_temporal(request, view)

    def _hold(
        self, request: RequestLike, enqueued_s: float, iid: int, short: bool, unc: int, cached: int
    ) -> None:
        deadline = math.inf
        if short:
            deadline = slack_deadline_s(request, self._slo_s, self._estimate_s(unc, cached))
        self.queues.hold(iid, Held(request, enqueued_s, unc, cached, deadline), short)

    def _backlog(self, inst: InstanceView) -> int:
        """Prefill tokens the instance owes (``backlog``), plus those held for it."""
        owed = inst.pending_prompt_tokens if self._pending else inst.waiting_tokens
        return owed + self.queues.tokens(inst.instance_id)

    def _outstanding(self, inst: InstanceView) -> int:
        """Requests waiting or running on the instance plus those held for it."""
        return inst.outstanding + self.queues.count(inst.instance_id)

    def _place_temporal(self, request: RequestLike, view: ClusterView) -> Placement | None:
        classify, count = self.classifier.classify, self.queues.count
        # (cached, key, placement) per healthy instance; key = (backlog after
        # this request, outstanding sent and held, id).
        cands = []
        for inst in view.pool("entry"):
            if inst.healthy:
                iid = inst.instance_id
                short, unc, cached = classify(request, inst)
                key = (self._backlog(inst) + unc, inst.outstanding + count(iid), iid)
                cands.append((cached, key, (iid, short, unc, cached)))
        if not cands:
            return None
        if len(cands) == 1 or self.config.placement == "backlog":
            return min(cands, key=lambda c: c[1])[2]
        # Only instances within a bound of the least loaded, so no instance runs
        # away with the work on a backlog or cache edge.
        bound = min(c[1][1] for c in cands) + self.config.max_skew_requests
        near = [c for c in cands if c[1][1] <= bound]
        if self.config.placement == "affinity":
            best = min(near, key=lambda c: (-c[0], c[1]))
            if best[0] > self.config.affinity_threshold * request.prompt_tokens:
                return best[2]
        return min(near, key=lambda c: c[1])[2]

    def _estimate_s(self, uncached: int, cached: int) -> float:
        cost = self.cost
        return 0.0 if cost is None else float(cost.prefill_time_s([uncached], [cached]))

    def _release(
        self,
        now_s: float,
        view: ClusterView,
        ids: Iterable[int],
        at_once: Sequence[tuple[RequestLike, int]] = (),
    ) -> Decisions:
        """Release what is due on ``ids``, after ``at_once``; ask for the next look."""
        dispatches, hints, wake = self.queues.release(now_s, view, ids)
        if self._parked:  # retry like the routing policies
            wake = min(wake, now_s + HOLD_RETRY_S)
        if at_once:
            shift = len(at_once)
            dispatches = [*at_once, *dispatches]
            hints = [replace(h, start=h.start + shift) for h in hints]
        wake_at = None
        pending = self._wake_s
        if wake < math.inf and (pending is None or wake < pending or pending <= now_s):
            self._wake_s = wake_at = wake
        if not dispatches and wake_at is None:
            return NO_DECISIONS
        return Decisions(tuple(dispatches), wake_at, tuple(hints))
