"""Workloads: the Request record, trace loaders, transforms, generator and statistics.

from traces import load, trace_stats
trace = load("BurstGPT_1.csv")          # format detected from the file
print(trace_stats(trace).rate_peak_60s_rps)
"""

from __future__ import annotations

from traces.bundled import BUNDLED, bundled_path
from traces.errors import ConfigError, LlmschedError, TraceError, TraceFormatError
from traces.generator import PRESETS, SyntheticConfig, generate, preset
from traces.loaders import FORMATS, detect_format, load, save
from traces.request import Request
from traces.stats import TraceStats, trace_stats
from traces.trace import Trace
from traces.transforms import TraceTransforms

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
