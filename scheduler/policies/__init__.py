"""Built-in policies; importing this package registers them.

One policy per module, each with its config class beside it:

* ``fcfs`` (:mod:`.fcfs`), ``round_robin`` (:mod:`.round_robin`),
  ``random`` (:mod:`.random_choice`), ``least_load`` (:mod:`.least_load`),
  ``power_of_two`` (:mod:`.power_of_two`), ``cache_aware``
  (:mod:`.cache_aware`), ``bucket`` (:mod:`.bucket`): routing policies;
* :class:`PDPolicy` (:mod:`.pd`): a prefill policy and a decode routing
  policy paired for prefill/decode disaggregation (not a registered name;
  see :func:`scheduler.registry.create_pd`).
"""

from __future__ import annotations

from scheduler.policies.bucket import BucketConfig, BucketPolicy
from scheduler.policies.cache_aware import CacheAwareConfig, CacheAwarePolicy
from scheduler.policies.fcfs import FcfsPolicy
from scheduler.policies.laps import LapsConfig, LapsPolicy
from scheduler.policies.least_load import LeastLoadConfig, LeastLoadPolicy
from scheduler.policies.pd import PDPolicy
from scheduler.policies.power_of_two import PowerOfTwoConfig, PowerOfTwoPolicy
from scheduler.policies.random_choice import RandomConfig, RandomPolicy
from scheduler.policies.round_robin import RoundRobinPolicy

__all__ = [
    "BucketConfig",
    "BucketPolicy",
    "CacheAwareConfig",
    "CacheAwarePolicy",
    "FcfsPolicy",
    "LapsConfig",
    "LapsPolicy",
    "LeastLoadConfig",
    "LeastLoadPolicy",
    "PDPolicy",
    "PowerOfTwoConfig",
    "PowerOfTwoPolicy",
    "RandomConfig",
    "RandomPolicy",
    "RoundRobinPolicy",
]
