"""``llmsched emulate`` as a process: several instances on consecutive ports, a clean stop on a signal."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.loopback import free_port, wait_healthy

LLMSCHED = Path(sys.executable).with_name("llmsched")


def _wait_up(urls: list[str], proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    def alive() -> None:
        if proc.poll() is not None:
            raise AssertionError(f"emulate exited early: {proc.communicate()[1]}")

    if not wait_healthy(urls, alive, timeout_s):
        raise AssertionError(f"emulate did not come up on {urls}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_two_instances_on_two_ports_and_a_clean_stop(sig: signal.Signals) -> None:
    port = free_port(consecutive=2)
    cmd = [str(LLMSCHED), "emulate", "--protocol", "sglang", "--port", str(port)]
    cmd += ["--instances", "2", "--time-scale", "10", "--max-running-requests", "32"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        urls = [f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}"]
        _wait_up(urls, proc)
        prompt = " ".join(["word"] * 50)
        for url in urls:
            r = httpx.post(
                url + "/generate",
                json={"text": prompt, "sampling_params": {"max_new_tokens": 3}},
                timeout=10.0,
            )
            assert r.json()["meta_info"]["completion_tokens"] == 3
            # The limit flag reached the engine, as it would reach simulate's.
            assert httpx.get(url + "/get_server_info").json()["max_running_requests"] == 32
        # Independent instances: a prompt cached on the first is not cached on the second.
        other = " ".join(["other"] * 80)

        def cached(url: str) -> int:
            body = {"text": other, "sampling_params": {"max_new_tokens": 1}}
            return httpx.post(url + "/generate", json=body).json()["meta_info"]["cached_tokens"]

        cached(urls[0])
        assert cached(urls[0]) > 0
        assert cached(urls[1]) == 0
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=15)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
        assert f"127.0.0.1:{port}-{port + 1}" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_unknown_model_is_a_one_line_error() -> None:
    result = subprocess.run(
        [str(LLMSCHED), "emulate", "--port", "1", "--model", "no-such-model"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "error:" in result.stderr and "Traceback" not in result.stderr
