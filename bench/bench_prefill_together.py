"""Several prompts at once on the real vLLM engine, against the simulator given the same arrivals.

Starts the real server of ``tests/integration/real_vllm.py``, calibrates it
as the fidelity test does (lone TTFTs and decode steps only), then sends
``k`` prompts of ``L`` fresh random tokens at the same instant (one output
token each), three times for every ``L`` in 128, 256, 512 and ``k`` in 1, 2,
4, 8, and prints the median of the first and the last first token beside
what the simulator gives the same ``k`` arrivals (vLLM's engine model, the
profile, the server's limits). This is the measurement behind the README's
"several prompts together": whether a step that holds several prompts
costs what the lone-prompt calibration extrapolates.

    .venv/bin/python bench/bench_prefill_together.py            # about 3 minutes

The server's engine spins on one core while it lives; it is stopped at the end.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sim
from tests.integration import real_vllm
from tests.integration.fidelity_support import CPU_DEVICE, SERVED, calibrate_real, stream_completion
from traces.tokenizer import load_tokenizer

LENGTHS = (128, 256, 512)
TOGETHER = (1, 2, 4, 8)
REPEATS = 3


async def _measure(url: str, tokenizer: Path) -> dict[tuple[int, int], tuple[float, float]]:
    """(L, k) -> median (first, last) first-token time after the send, wall seconds."""
    tok = load_tokenizer(tokenizer)
    seeds = iter(range(10_000, 1 << 30))
    out = {}
    async with httpx.AsyncClient(base_url=url, timeout=300.0) as client:
        for _ in range(3):  # warm-up
            await stream_completion(client, SERVED, tok.ids_of_length(64, next(seeds)), 2)
        for length in LENGTHS:
            for k in TOGETHER:
                firsts, lasts = [], []
                for _ in range(REPEATS):
                    prompts = [tok.ids_of_length(length, next(seeds)) for _ in range(k)]
                    runs = await asyncio.gather(
                        *(stream_completion(client, SERVED, p, 1) for p in prompts)
                    )
                    sent = min(r[0] for r in runs)
                    firsts.append(min(r[1] for r in runs) - sent)
                    lasts.append(max(r[1] for r in runs) - sent)
                out[length, k] = statistics.median(firsts), statistics.median(lasts)
    return out


def _simulated(
    profile: Path, limits: dict, model: Path, length: int, k: int
) -> tuple[float, float]:
    """The simulator's first and last TTFT for ``k`` prompts of ``length`` arriving 1 ms apart."""
    trace = pd.DataFrame(
        {
            "arrival_s": [i * 0.001 for i in range(k)],
            "prompt_tokens": [length] * k,
            "output_tokens": [1] * k,
        }
    )
    result = sim.run(
        trace, "fcfs", engine="vllm", model=str(model), gpu=CPU_DEVICE, profile=profile, **limits
    )
    first = result.records["first_token_s"]  # from the first arrival, at 0
    return float(first.min()), float(first.max())


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="llmsched-prefill-"))
    model = real_vllm.model_dir()
    t0 = time.monotonic()
    with real_vllm.real_vllm_server(SERVED, work / "vllm-server.log") as url:
        profile = work / "profile.json"
        _, limits = calibrate_real(url, model, profile, real_vllm.VLLM_VERSION)
        measured = asyncio.run(_measure(url, model / "tokenizer.json"))
    print(f"\nk prompts of L tokens sent at once; medians of {REPEATS}, ms; error = sim / real - 1")
    print(f"{'L':>5} {'k':>3} {'real first':>11} {'sim first':>10} {'real last':>10} "
          f"{'sim last':>9} {'error last':>11}")  # fmt: skip
    for (length, k), (first, last) in measured.items():
        s_first, s_last = _simulated(profile, limits, model, length, k)
        print(
            f"{length:>5} {k:>3} {first * 1e3:>11.0f} {s_first * 1e3:>10.0f} {last * 1e3:>10.0f} "
            f"{s_last * 1e3:>9.0f} {s_last / last - 1:>+11.0%}"
        )
    print(f"\n{time.monotonic() - t0:.0f} s in all; profile and server log in {work}")


if __name__ == "__main__":
    main()
