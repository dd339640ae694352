"""An established load generator, guidellm, against the emulated vLLM: its TTFT is our replay's.

guidellm (``guidellm==0.8.1`` from the package registry) runs at a constant
4 requests/s, 40 requests of 1,024 prompt and 32 output tokens, against
``llmsched emulate --protocol vllm`` (llama-3.1-8b on an A100, real time);
then ``traces.replay`` plays 40 requests of the same lengths at the same
rate against the same emulator. The medians of the two TTFTs agree within
10% (measured: guidellm 87.8 ms, replay 90.0 ms, 2.5% apart; the replay
counts from the scheduled instant, guidellm from its send).

Why this one: ``inference-perf`` needs Python 3.12 and the project runs on
3.11, so it does not install here; guidellm does. It lives in its own
virtual environment, cached at ``~/.cache/llmsched/guidellm-0.8.1``
(``LLMSCHED_GUIDELLM_VENV`` overrides), which this test creates when it is
missing (measured: 64 s, 1.5 GB). It is kept out of the project's
environment: it pins ``click~=8.4`` and pulls ``torch`` and
``transformers``; the CPU build of torch (``torch==2.13.0+cpu``) is named so
that pip does not fetch the CUDA one (several GB). No model hub is reached:
guidellm's synthetic prompts are faker text cut to length by a tokenizer,
so the test makes a word-level one from faker's own word list (every word
known, so the cut text re-encodes to the same count) and gives the emulator
the same ``tokenizer.json``. If guidellm cannot be installed or does not
run, the test fails and says why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.loopback import free_port, stop_process, wait_healthy
from traces.replay import Replay, ReplayConfig, run_replay
from traces.trace import Trace

LLMSCHED = Path(sys.executable).with_name("llmsched")
GUIDELLM = "guidellm==0.8.1"
TORCH_CPU = "torch==2.13.0+cpu"
RATE_RPS, N_REQUESTS, PROMPT_TOKENS, OUTPUT_TOKENS = 4.0, 40, 1024, 32
ENGINE = ["--protocol", "vllm", "--model", "llama-3.1-8b", "--gpu", "a100"]

_MAKE_TOKENIZER = """
import sys
from pathlib import Path

from faker import Faker
from faker.providers.lorem.en_US import Provider
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

out = Path(sys.argv[1])
fake = Faker()
fake.seed_instance(0)
words = list(Provider.word_list)
corpus = [" ".join(words), " ".join(w.capitalize() for w in words), ". , ; : ! ? ' \\" ( ) -"]
corpus += [fake.text(max_nb_chars=2000) for _ in range(50)]
tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
tok.pre_tokenizer = pre_tokenizers.Whitespace()
tok.train_from_iterator(corpus, trainer=trainers.WordLevelTrainer(special_tokens=["[UNK]", "[EOS]"]))
fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")
fast.save_pretrained(out)
"""


def _alive(proc: subprocess.Popen) -> None:
    assert proc.poll() is None, f"emulate exited: {proc.communicate()[1]}"


@pytest.fixture(scope="module")
def guidellm_venv() -> Path:
    """guidellm's own environment, installed from the registry once and cached."""
    default = Path.home() / ".cache" / "llmsched" / GUIDELLM.replace("==", "-")
    venv = Path(os.environ.get("LLMSCHED_GUIDELLM_VENV", default))
    exe = venv / "bin" / "guidellm"
    if not exe.is_file():
        base = Path(sys.base_prefix) / "bin" / "python3"
        steps = [
            [str(base), "-m", "venv", str(venv)],
            [str(venv / "bin" / "pip"), "install", "-q", GUIDELLM, TORCH_CPU],
        ]
        for cmd in steps:
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
            except subprocess.TimeoutExpired:
                pytest.fail(f"installing guidellm timed out: {' '.join(cmd)}")
            if done.returncode != 0:
                tail = "\n".join(done.stderr.strip().splitlines()[-15:])
                pytest.fail(f"guidellm could not be installed ({' '.join(cmd)}):\n{tail}")
    version = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=120)
    if version.returncode != 0 or "0.8.1" not in version.stdout:
        pytest.fail(f"guidellm does not run from {venv}: {version.stdout}{version.stderr}")
    return venv


@pytest.fixture
def emulator(tmp_path: Path, guidellm_venv: Path):  # type: ignore[no-untyped-def]
    """``llmsched emulate`` on a free port with the test's tokenizer; yields (url, tokenizer dir)."""
    tok_dir = tmp_path / "tokenizer"
    script = tmp_path / "make_tokenizer.py"
    script.write_text(_MAKE_TOKENIZER)
    made = subprocess.run(
        [str(guidellm_venv / "bin" / "python"), str(script), str(tok_dir)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if made.returncode != 0:
        pytest.fail(f"could not make the tokenizer in guidellm's environment: {made.stderr}")
    port = free_port()
    cmd = [str(LLMSCHED), "emulate", *ENGINE, "--port", str(port)]
    cmd += ["--tokenizer", str(tok_dir / "tokenizer.json")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_healthy([url], lambda: _alive(proc)), "emulate did not come up"
        yield url, tok_dir
    finally:
        stop_process(proc)


def _guidellm(venv: Path, url: str, tok_dir: Path, out: Path) -> dict:
    cmd = [
        str(venv / "bin" / "guidellm"), "run",
        "--backend", f"kind=openai_http,target={url},request_format=/v1/completions",
        "--profile", f"kind=constant,rate={RATE_RPS:g}",
        "--constraint", f"kind=max_requests,count={N_REQUESTS}",
        "--data", f"kind=synthetic_text,prompt_tokens={PROMPT_TOKENS},output_tokens={OUTPUT_TOKENS}",
        "--tokenizer", f"kind=huggingface_auto,model={tok_dir}",
        "--output", f"kind=json,path={out}",
        "--disable-console",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=out.parent)
    if done.returncode != 0 or not out.is_file():
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-20:])
        pytest.fail(f"guidellm run failed (status {done.returncode}):\n{tail}")
    return json.loads(out.read_text())["benchmarks"][0]


def test_guidellm_and_the_replay_see_the_same_ttft_at_a_constant_rate(
    tmp_path: Path, guidellm_venv: Path, emulator: tuple[str, Path]
) -> None:
    url, tok_dir = emulator
    bench = _guidellm(guidellm_venv, url, tok_dir, tmp_path / "guidellm.json")
    done = bench["requests"]["successful"]
    assert len(done) == N_REQUESTS and not bench["requests"]["errored"]
    assert bench["config"]["strategy"]["rate"] == RATE_RPS
    # The server's count of each prompt (usage); the cut text may lose a token or two.
    prompts = [r["prompt_tokens"] for r in done]
    assert all(PROMPT_TOKENS - 8 <= p <= PROMPT_TOKENS for p in prompts), prompts
    assert all(r["output_tokens"] == OUTPUT_TOKENS for r in done)
    theirs_s = bench["metrics"]["time_to_first_token_ms"]["successful"]["median"] / 1000

    n = N_REQUESTS
    frame = pd.DataFrame(
        {
            "arrival_s": np.arange(n) / RATE_RPS,
            "prompt_tokens": np.full(n, int(np.median(prompts))),
            "output_tokens": np.full(n, OUTPUT_TOKENS),
        }
    )
    run = run_replay(Replay(Trace(frame, name="constant"), ReplayConfig(target_url=url)))
    assert not run.errors, run.errors
    ours_s = float(np.median(run.m.first - run.plan.arrival_s))
    note = f"TTFT p50: guidellm {theirs_s * 1e3:.1f} ms, replay {ours_s * 1e3:.1f} ms"
    assert abs(ours_s / theirs_s - 1) <= 0.10, note
    print(note)
