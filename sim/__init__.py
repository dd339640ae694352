"""The simulator, and its Python API for policy comparison scripts.

``sim.run``, ``sim.compare`` and ``sim.load`` (with their result types
``RunResult`` and ``Comparison``) are defined in :mod:`sim.api` and loaded on
first use, so ``import sim`` stays light: simpy, pandas and plotly load only
when a function of the API is called.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["Comparison", "RunResult", "compare", "load", "run"]

if TYPE_CHECKING:
    from sim.api import Comparison, RunResult, compare, load, run


def __getattr__(name: str) -> Any:
    # PEP 562: the API module loads when one of its names is first looked up.
    if name in __all__:
        value = getattr(importlib.import_module("sim.api"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
