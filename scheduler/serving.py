"""Serving an ASGI app on uvicorn, as the router and the emulator both do.

Both own their shutdown: SIGINT and SIGTERM call the owner's ``stop`` (the
router drains first), so uvicorn's own signal capture is turned off. Both
can also serve from a background thread's event loop while a block runs
(tests, notebooks), which :func:`wait_started` makes fail fast and clearly.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

import uvicorn

__all__ = ["OwnedServer", "stop_on_signals", "wait_started"]

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class OwnedServer(uvicorn.Server):
    """A uvicorn server that leaves SIGINT and SIGTERM to its owner."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.contextmanager
def stop_on_signals(stop: Callable[[], None], enabled: bool = True) -> Iterator[None]:
    """While the block runs, SIGINT and SIGTERM call ``stop`` on the running loop."""
    if not enabled:
        yield
        return
    loop = asyncio.get_running_loop()
    for sig in _STOP_SIGNALS:
        loop.add_signal_handler(sig, stop)
    try:
        yield
    finally:
        for sig in _STOP_SIGNALS:
            loop.remove_signal_handler(sig)


def wait_started(
    thread: threading.Thread,
    started: Callable[[], bool],
    failed: list[BaseException],
    timeout_s: float,
) -> bool:
    """Wait until ``started()``, the serving ``thread`` died, or ``timeout_s`` passed.

    Returns whether the server started; when not, ``failed`` holds what the
    thread raised, if anything.
    """
    for _ in range(int(timeout_s / 0.01)):
        if started() or failed or not thread.is_alive():
            break
        threading.Event().wait(0.01)
    return started()
