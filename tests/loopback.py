"""Loopback helpers for tests that start real servers: free ports, waiting for ``/health``,
running the ``llmsched`` console script, stopping."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import httpx

__all__ = ["LLMSCHED", "free_port", "run_llmsched", "stop_process", "wait_healthy"]

#: The ``llmsched`` console script of the running interpreter's environment.
LLMSCHED = os.path.join(os.path.dirname(sys.executable), "llmsched")


def free_port(consecutive: int = 1) -> int:
    """A port ``p`` on 127.0.0.1 with ``p .. p + consecutive - 1`` free."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            p = a.getsockname()[1]
        try:
            for k in range(1, consecutive):
                with socket.socket() as b:
                    b.bind(("127.0.0.1", p + k))
        except OSError:
            continue
        return p
    raise RuntimeError("no free ports")


def wait_healthy(
    urls: Sequence[str],
    check: Callable[[], None],
    timeout_s: float = 30.0,
    *,
    interval_s: float = 0.1,
    request_timeout_s: float = 1.0,
) -> bool:
    """Poll every url's ``/health`` until all answer 200: True, or False after ``timeout_s``.

    ``check`` runs before each poll and raises if the server's process died.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        check()
        try:
            if all(
                httpx.get(u + "/health", timeout=request_timeout_s).status_code == 200 for u in urls
            ):
                return True
        except httpx.TransportError:
            pass
        time.sleep(interval_s)
    return False


def stop_process(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``; returns once the process is gone."""
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_llmsched(*args: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    """Run ``llmsched ARGS`` to its end, output captured, at the default terminal width."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    return subprocess.run(
        [LLMSCHED, *args], capture_output=True, text=True, timeout=timeout_s, env=env
    )
