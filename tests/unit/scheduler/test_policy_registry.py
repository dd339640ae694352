"""The policy registry: names, creation, duplicate and unknown names."""

from __future__ import annotations

import pytest

from scheduler import registry
from scheduler.policy import NO_DECISIONS, Policy


def test_every_registered_name_builds_a_policy_carrying_that_name():
    names = registry.names()
    assert {"fcfs", "round_robin"} <= set(names)
    for name in names:
        policy = registry.create(name)
        assert isinstance(policy, Policy)
        assert policy.name == name


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown policy 'lifo'; known policies: .*fcfs"):
        registry.create("lifo")


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="'fcfs' is already registered"):

        @registry.register("fcfs")
        class Again(Policy):
            def on_arrival(self, request, now_s, view):
                return NO_DECISIONS


def test_only_policy_classes_register():
    with pytest.raises(ValueError, match="needs a Policy subclass"):
        registry.register("not_a_policy")(object)  # type: ignore[arg-type]


def test_unknown_parameters_name_the_accepted_ones():
    with pytest.raises(ValueError, match="takes no parameter 'window_ms'"):
        registry.create("round_robin", window_ms=5)


def test_a_registered_policy_is_created_with_its_parameters(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @registry.register("test_windowed")
    class Windowed(Policy):
        def __init__(self, window_ms: float = 1.0) -> None:
            self.window_ms = window_ms

        def on_arrival(self, request, now_s, view):
            return NO_DECISIONS

    made = registry.create("test_windowed", window_ms=4.0)
    assert isinstance(made, Windowed) and made.window_ms == 4.0
    assert registry.policy_class("test_windowed") is Windowed
