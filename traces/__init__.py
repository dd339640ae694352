"""Workloads: the Request record, trace loaders, transforms, generator and statistics.

from traces import load, trace_stats
trace = load("BurstGPT_1.csv")          # format detected from the file
print(trace_stats(trace).rate_peak_60s_rps)

The names below load on first use (PEP 562 ``__getattr__``), so importing a
light submodule (``traces.errors``, ``traces.request``) does not pull in
pandas and pyarrow through the loaders: the router imports those alone.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from traces.bundled import BUNDLED, bundled_path
    from traces.errors import ConfigError, LlmschedError, TraceError, TraceFormatError
    from traces.generator import PRESETS, SyntheticConfig, generate, preset
    from traces.loaders import FORMATS, detect_format, load, save
    from traces.request import Request
    from traces.stats import TraceStats, trace_stats
    from traces.trace import Trace
    from traces.transforms import TraceTransforms

#: Public name -> the submodule defining it.
_SOURCES = {
    "BUNDLED": "traces.bundled",
    "bundled_path": "traces.bundled",
    "ConfigError": "traces.errors",
    "LlmschedError": "traces.errors",
    "TraceError": "traces.errors",
    "TraceFormatError": "traces.errors",
    "PRESETS": "traces.generator",
    "SyntheticConfig": "traces.generator",
    "generate": "traces.generator",
    "preset": "traces.generator",
    "FORMATS": "traces.loaders",
    "detect_format": "traces.loaders",
    "load": "traces.loaders",
    "save": "traces.loaders",
    "Request": "traces.request",
    "TraceStats": "traces.stats",
    "trace_stats": "traces.stats",
    "Trace": "traces.trace",
    "TraceTransforms": "traces.transforms",
}

__all__ = [
    "BUNDLED",
    "FORMATS",
    "PRESETS",
    "ConfigError",
    "LlmschedError",
    "Request",
    "SyntheticConfig",
    "Trace",
    "TraceError",
    "TraceFormatError",
    "TraceStats",
    "TraceTransforms",
    "bundled_path",
    "detect_format",
    "generate",
    "load",
    "preset",
    "save",
    "trace_stats",
]


def __getattr__(name: str) -> Any:
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module 'traces' has no attribute {name!r}")
    value = getattr(importlib.import_module(source), name)
    globals()[name] = value  # later look-ups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SOURCES))
