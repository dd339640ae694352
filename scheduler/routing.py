"""Routing policies: each arrival goes at once to one instance picked by a rule.

A routing policy is a selection rule, :meth:`RoutingPolicy.choose`, over the
candidate instances (the ``"entry"`` pool for arrivals, the ``"decode"`` pool
when it picks decode instances inside :class:`scheduler.policies.pd.PDPolicy`),
plus the small state the rule keeps (a turn counter, a seeded generator, a
record of what was sent where). Rules skip unhealthy instances.

Holding: when no candidate is healthy, ``choose`` returns None and the
arrival is held, in arrival order; later arrivals queue behind it. The
policy asks to be woken :data:`HOLD_RETRY_S` later and then offers the held
requests to ``choose`` again, oldest first, until all are placed. The retry
is a timer rather than ``on_progress`` on purpose: an instance coming back
to health reports no progress (if every instance is down, nothing does), and
overriding ``on_progress`` would cost the simulator a call after every step
for a case it rarely has. A driver that reports health changes
(``on_health``) gets the held requests placed at once when an instance
comes back; the timer covers a driver that does not.
"""

from __future__ import annotations

import random
from abc import abstractmethod
from collections import deque
from collections.abc import Sequence
from typing import Any, ClassVar

from scheduler.params import PolicyConfig, make_config
from scheduler.policy import (
    NO_DECISIONS,
    ClusterView,
    Decisions,
    InstanceView,
    Policy,
    RequestLike,
)
from traces.errors import ConfigError

__all__ = ["HOLD_RETRY_S", "RoutingPolicy", "SeededRoutingPolicy", "healthy_instances"]

#: Seconds between retries while requests are held for want of a healthy instance.
HOLD_RETRY_S = 0.05


def healthy_instances(candidates: Sequence[InstanceView]) -> list[InstanceView]:
    """The healthy candidates, in their order."""
    return [inst for inst in candidates if inst.healthy]


class RoutingPolicy(Policy):
    """A policy that dispatches each arrival at once to the instance :meth:`choose` picks.

    Subclasses implement :meth:`choose` and, when they keep state, extend
    :meth:`reset` (calling ``super().reset()``). A subclass with a
    ``config_class`` is built from a config object or keyword parameters
    (checked, see :func:`scheduler.registry.make_config`) and reads them as
    ``self.config``.

    Raises:
        ConfigError: bad parameters (from the constructor).
    """

    #: The pool arrivals are routed over.
    pool_name: ClassVar[str] = "entry"

    def __init__(self, config: PolicyConfig | None = None, /, **params: Any) -> None:
        cls = type(self)
        if cls.config_class is None:
            if config is not None or params:
                given = ", ".join(map(repr, params)) or repr(config)
                raise ConfigError(f"policy {cls.name!r} takes no parameters; got {given}")
            self.config: Any = None
        else:
            self.config = make_config(cls, config, params)
        self._held: deque[RequestLike] = deque()
        self._retry_at_s: float | None = None

    @abstractmethod
    def choose(
        self,
        request: RequestLike,
        candidates: Sequence[InstanceView],
        view: ClusterView,
        now_s: float,
    ) -> InstanceView | None:
        """The instance among ``candidates`` to send ``request`` to; None if none is healthy.

        Called once per placement: a rule that keeps a record of what it sent
        where updates it here. Returning None must leave the state unchanged.
        """

    @property
    def n_held(self) -> int:
        """Requests waiting for a healthy instance."""
        return len(self._held)

    def on_arrival(self, request: RequestLike, now_s: float, view: ClusterView) -> Decisions:
        if self._held:  # keep arrival order behind the held ones
            self._held.append(request)
            return self._release(now_s, view)
        inst = self.choose(request, view.pool(self.pool_name), view, now_s)
        if inst is None:
            self._held.append(request)
            return Decisions(wake_at_s=self._retry(now_s))
        return Decisions(((request, inst.instance_id),))

    def on_timer(self, now_s: float, view: ClusterView) -> Decisions:
        self._retry_at_s = None
        return self._release(now_s, view) if self._held else NO_DECISIONS

    def on_health(
        self, instance_id: int, healthy: bool, now_s: float, view: ClusterView
    ) -> Decisions:
        return self._release(now_s, view) if healthy and self._held else NO_DECISIONS

    def reset(self) -> None:
        self._held.clear()
        self._retry_at_s = None

    def _release(self, now_s: float, view: ClusterView) -> Decisions:
        """Dispatch held requests, oldest first, while ``choose`` finds an instance."""
        pool = view.pool(self.pool_name)
        out = []
        while self._held:
            inst = self.choose(self._held[0], pool, view, now_s)
            if inst is None:
                break
            out.append((self._held.popleft(), inst.instance_id))
        wake = self._retry(now_s) if self._held else None
        if not out and wake is None:
            return NO_DECISIONS
        return Decisions(tuple(out), wake)

    def _retry(self, now_s: float) -> float | None:
        """The retry time to ask for, or None when one is already due later."""
        if self._retry_at_s is not None and self._retry_at_s > now_s:
            return None
        self._retry_at_s = now_s + HOLD_RETRY_S
        return self._retry_at_s


class SeededRoutingPolicy(RoutingPolicy):
    """A routing policy that draws from ``random.Random(config.seed)``.

    ``reset`` restarts the generator, so a reset policy replays its choices.
    The config class must have a ``seed`` field.
    """

    def __init__(self, config: PolicyConfig | None = None, /, **params: Any) -> None:
        super().__init__(config, **params)
        self._rng = random.Random(self.config.seed)

    def reset(self) -> None:
        super().reset()
        self._rng = random.Random(self.config.seed)
