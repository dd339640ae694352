"""Test doubles for policies: a mutable instance view, a cluster with pools, request builders."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from scheduler.policy import ClusterView, Decisions, InstanceView

__all__ = ["FakeCluster", "FakeInstance", "FakeRequest", "make_view", "req", "targets"]


@dataclass(frozen=True, slots=True)
class FakeRequest:
    """Exactly the fields of :class:`scheduler.policy.RequestLike`, no output length.

    A policy that reads anything else (a future output length) fails on it.
    """

    request_id: int
    arrival_s: float
    prompt_tokens: int
    max_tokens: int
    session_id: str | None = None
    prefix_hashes: tuple[int, ...] | None = None
    block_tokens: int | None = None
    slo_ttft_s: float | None = None
    slo_tpot_s: float | None = None


class FakeInstance(InstanceView):
    """An instance whose numbers a test sets (and changes) directly."""

    def __init__(
        self,
        instance_id: int,
        role: str = "mixed",
        *,
        healthy: bool = True,
        waiting: int = 0,
        running: int = 0,
        tokens: int = 0,
    ) -> None:
        self._id = instance_id
        self._role = role
        self.is_healthy = healthy
        self.waiting = waiting
        self.running = running
        self.tokens = tokens

    instance_id = property(lambda self: self._id)
    role = property(lambda self: self._role)
    healthy = property(lambda self: self.is_healthy)
    n_waiting = property(lambda self: self.waiting)
    waiting_tokens = property(lambda self: 0)
    n_running = property(lambda self: self.running)
    inflight_tokens = property(lambda self: self.tokens)
    kv_used_tokens = property(lambda self: 0)
    kv_capacity_tokens = property(lambda self: 1_000_000)

    def cached_prefix_blocks(self, request) -> int:
        return 0


class FakeCluster(ClusterView):
    """Instances with the built-in pools: entry, all, and one per role."""

    def __init__(self, instances: Sequence[FakeInstance]) -> None:
        self._instances = list(instances)

    instances = property(lambda self: self._instances)
    pool_names = property(lambda self: ("entry", "all", "mixed", "prefill", "decode"))

    def pool(self, name: str) -> Sequence[InstanceView]:
        if name == "entry":
            return [i for i in self._instances if i.role != "decode"]
        if name == "all":
            return list(self._instances)
        if name in ("mixed", "prefill", "decode"):
            return [i for i in self._instances if i.role == name]
        raise ValueError(f"unknown pool {name!r}")

    def __getitem__(self, instance_id: int) -> FakeInstance:
        return self._instances[instance_id]


def make_view(*specs: dict) -> FakeCluster:
    """A cluster from one keyword dict per instance (``role``, ``healthy``, loads)."""
    return FakeCluster([FakeInstance(i, **spec) for i, spec in enumerate(specs)])


def req(
    i: int = 0,
    prompt: int | None = None,
    *,
    hashes: Sequence[int] | None = None,
    block: int | None = 16,
    arrival_s: float = 0.0,
) -> FakeRequest:
    """A request; its prompt defaults to ``len(hashes)`` blocks of ``block`` tokens, or 100."""
    if prompt is None:
        prompt = 100 if hashes is None else len(hashes) * (block or 16)
    return FakeRequest(
        request_id=i,
        arrival_s=arrival_s,
        prompt_tokens=prompt,
        max_tokens=10,
        prefix_hashes=None if hashes is None else tuple(hashes),
        block_tokens=None if hashes is None else block,
    )


def targets(decisions: Decisions) -> list[int | str]:
    """The dispatch targets of a Decisions, in order."""
    return [target for _, target in decisions.dispatches]
