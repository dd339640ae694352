"""The traces that ship inside the package (see ``traces/data/README.md``)."""

from __future__ import annotations

from pathlib import Path

from traces.errors import TraceError

__all__ = ["BUNDLED", "BUNDLED_PREFIX", "DATA_DIR", "bundled_path"]

DATA_DIR = Path(__file__).resolve().parent / "data"

#: How a bundled trace is named wherever a trace path is taken: ``bundled:ragpulse``.
BUNDLED_PREFIX = "bundled:"

#: Short name -> path relative to :data:`DATA_DIR`.
BUNDLED: dict[str, str] = {
    "azure-code": "azure-llm-2023/AzureLLMInferenceTrace_code.csv.gz",
    "azure-conv": "azure-llm-2023/AzureLLMInferenceTrace_conv.csv.gz",
    "mooncake-conversation": "mooncake-fast25/conversation_trace.jsonl.gz",
    "mooncake-synthetic": "mooncake-fast25/synthetic_trace.jsonl.gz",
    "ragpulse": "ragpulse/0_trace.jsonl.gz",
    "burstgpt-synthetic": "synthetic/burstgpt_sample.csv",
}


def bundled_path(name: str) -> Path:
    """Path of a bundled trace by its short name (``azure-code``, ``ragpulse``, ...)."""
    try:
        return DATA_DIR / BUNDLED[name]
    except KeyError:
        known = ", ".join(sorted(BUNDLED))
        raise TraceError(f"no bundled trace named {name!r}; known: {known}") from None
