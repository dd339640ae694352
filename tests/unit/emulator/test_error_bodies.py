"""The emulator's error bodies are the real servers' for each status, fault or validation alike."""

from __future__ import annotations

import pytest

from sim.emulator.faults import error_body


@pytest.mark.parametrize(
    ("status", "vllm_type", "sglang_type"),
    [
        (400, "BadRequestError", "BadRequest"),
        (404, "NotFoundError", "NotFound"),
        (500, "InternalServerError", "InternalServerError"),
        (503, "ServiceUnavailableError", "ServiceUnavailable"),
    ],
)
def test_openai_endpoints_type_an_error_as_each_server_does(
    status: int, vllm_type: str, sglang_type: str
) -> None:
    vllm = error_body("vllm", "/v1/completions", status, "boom", "max_tokens")
    assert vllm == {
        "error": {"message": "boom", "type": vllm_type, "param": "max_tokens", "code": status}
    }
    sglang = error_body("sglang", "/v1/chat/completions", status, "boom")
    assert sglang == {
        "object": "error", "message": "boom", "type": sglang_type, "param": None, "code": status
    }  # fmt: skip


def test_sglang_generate_sends_only_the_message() -> None:
    assert error_body("sglang", "/generate", 503, "busy") == {"error": {"message": "busy"}}
