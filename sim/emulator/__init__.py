"""The emulated backend: the simulator's engine model served over SGLang's and vLLM's HTTP APIs.

``llmsched emulate`` runs one or more :class:`EmulatedInstance` (the very
engine and instance driver the simulator runs, on the asyncio clock) behind
the real servers' wire protocols (:mod:`sim.emulator.app`), so a replay
client, a router or an off-the-shelf load generator can be tested against a
"GPU" that is the simulator on the wall clock. See
:mod:`sim.emulator.instance` for what is emulated and what is not.
"""

from sim.emulator.instance import EmulatedInstance, Rejected, TokenStream
from sim.emulator.server import EmulatorConfig, EmulatorServer, build_instances, running_in_thread

__all__ = [
    "EmulatedInstance",
    "EmulatorConfig",
    "EmulatorServer",
    "Rejected",
    "TokenStream",
    "build_instances",
    "running_in_thread",
]
