"""Shared test fixtures and paths."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
#: The public traces beside the repository (present on developer machines and CI).
SHARED_TRACES = REPO_ROOT.parent / "shared" / "traces-real"


@pytest.fixture
def shared_traces() -> Path:
    """The folder of real public traces; tests using it are skipped where it is absent."""
    if not SHARED_TRACES.is_dir():
        pytest.skip(f"{SHARED_TRACES} not present (bundled copies are tested instead)")
    return SHARED_TRACES
