"""Sweeps: every (policy, load, seed) point of a scenario, run in parallel and cached.

Layout of a sweep's output folder::

    OUT/sweep.json                 scenario (resolved), versions, code version
    OUT/scenario.toml              the scenario file as given (.yaml for YAML)
    OUT/points/<id>/results.parquet, summary.json, queue.parquet   (result records)
    OUT/points/<id>/point.json     the point's spec, cache key and timing

**Cache.** A point is skipped when its folder holds a ``point.json`` whose
key matches: the SHA-256 of the point's resolved spec, of the trace file's
bytes, and of the source code a simulation runs (:func:`code_version`:
exactly the modules :mod:`sim.runner` imports, transitively, so editing the
command line, the reports or a server module keeps finished points). A point
with a band runs three times (step costs as given, scaled down, scaled up,
:mod:`sim.band`); the band's relative error is part of its spec, so of its key. A point is written to a temporary folder and renamed when complete,
so an interrupted sweep resumes where it stopped.

**Executors.** :class:`LocalExecutor` runs points on local processes
(inline with one job); :class:`RayExecutor` runs them as Ray tasks (the
``llmsched[ray]`` extra), shipping each workload through Ray's object store
so workers need no access to the trace file. Both call :func:`execute`, so
they give identical results.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

from sim.runner import load_workload, prepare
from sim.scenario import Scenario
from sim.specs import RunSpec
from traces.errors import ConfigError, LlmschedError
from traces.trace import Trace

__all__ = [
    "RAY_LOOPBACK_ENV",
    "Executor",
    "LocalExecutor",
    "Point",
    "PointOutput",
    "RayExecutor",
    "SweepResult",
    "code_version",
    "execute",
    "git_commit",
    "make_executor",
    "points_of",
    "run_sweep",
    "simulation_modules",
    "versions",
]

_ROOT = Path(__file__).resolve().parent.parent
#: Where a simulation's code starts: every point is run by this module.
_SIMULATION_ROOT = "sim.runner"
_PACKAGES = ("traces", "scheduler", "sim")


def _module_files(root: Path) -> dict[str, Path]:
    """Module name -> source file, for the project's packages under ``root``."""
    out = {}
    for package in _PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _imported(tree: ast.Module, module: str, is_package: bool, known: dict[str, Path]) -> set[str]:
    """The project modules ``module`` imports anywhere in its code (not under ``TYPE_CHECKING``).

    Imports inside functions count (they run when the function does), and
    so does ``importlib.import_module("name")`` with a literal name (how the
    registry loads the built-in policies).
    """

    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    found: set[str | None] = set()
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(resolve(a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    parent = parent.rpartition(".")[0]
                base = f"{parent}.{base}" if base else parent
            found.update(
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else resolve(base)
                for a in node.names
            )
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.add(resolve(node.args[0].value))
    found.discard(None)
    found.discard(module)
    return found  # type: ignore[return-value]


def simulation_modules(root: Path = _ROOT) -> dict[str, Path]:
    """The project modules a simulation runs: :mod:`sim.runner` and what it imports, transitively.

    Read from the source (``ast``), not from ``sys.modules``, so the answer
    does not depend on what else a process loaded. A package's
    ``__init__`` counts only when it is imported by name (``scheduler.policies``
    registers the built-in policies; the lazy top-level ``__init__`` files
    decide nothing).
    """
    known = _module_files(root)
    seen: dict[str, Path] = {}
    todo = [_SIMULATION_ROOT]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = seen[name] = known[name]
        tree = ast.parse(path.read_bytes(), filename=str(path))
        todo.extend(_imported(tree, name, path.name == "__init__.py", known) - seen.keys())
    return dict(sorted(seen.items()))


@cache
def code_version(root: Path = _ROOT) -> str:
    """SHA-256 (16 hex digits) of the source files a simulation runs (:func:`simulation_modules`)."""
    h = hashlib.sha256()
    for path in simulation_modules(root).values():
        rel = path.relative_to(root).as_posix()
        h.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@cache
def git_commit(root: Path = _ROOT) -> str | None:
    """The checkout's commit (12 hex digits), ``-dirty`` with uncommitted edits; None outside git.

    None too when ``root`` is not the top of its checkout (an installed copy
    inside some other repository is not that repository's code).
    """
    import subprocess

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != root.resolve():
        return None
    commit = git("rev-parse", "--short=12", "HEAD")
    if commit is None:
        return None
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return commit + ("-dirty" if dirty else "")


def versions() -> dict[str, str]:
    """Versions of llmsched, Python and the libraries a result depends on."""
    out = {"llmsched": _version("llmsched"), "python": platform.python_version()}
    for name in ("numpy", "pandas", "simpy", "pyarrow", "pydantic"):
        out[name] = _version(name)
    return out


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


@cache
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _trace_digest(spec: RunSpec) -> str:
    path = spec.trace.file
    if path is None:
        return ""  # generated: the spec's parameters define it
    st = path.stat()
    return _file_digest(str(path), st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class Point:
    """One point of a sweep: its spec, folder name and cache key."""

    spec: RunSpec
    id: str
    key: str


def points_of(scenario: Scenario) -> list[Point]:
    """The scenario's points with their ids (``label__load1.5__seed0``) and cache keys."""
    code = code_version()
    out: list[Point] = []
    taken: set[str] = set()
    for spec in scenario.runs():
        payload = {"spec": spec.model_dump(mode="json"), "trace": _trace_digest(spec), "code": code}
        key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
        name = f"{spec.policy.display}__load{spec.load:g}__seed{spec.seed}"
        point_id = re.sub(r"[^A-Za-z0-9._+-]+", "-", name)
        if point_id in taken:  # labels that differ only in characters a file name drops
            label_hash = hashlib.sha256(spec.policy.display.encode()).hexdigest()[:8]
            point_id = f"{point_id}-{label_hash}"
        taken.add(point_id)
        out.append(Point(spec, point_id, key))
    return out


@dataclass
class PointOutput:
    """What one point produced: its record files' bytes and its summary."""

    files: dict[str, bytes]
    summary: dict[str, Any]
    timing: dict[str, float] = field(default_factory=dict)


def execute(spec: RunSpec, trace: Trace | None = None) -> PointOutput:
    """Run one point and return its result records as file bytes (for any executor)."""
    prepared = prepare(spec, trace=trace)
    result = prepared.run()
    slo = spec.slo
    with tempfile.TemporaryDirectory(prefix="llmsched-point-") as tmp:
        result.write(tmp, slo_ttft_s=slo.ttft_s, slo_tpot_s=slo.tpot_s, config=prepared.config())
        batches = getattr(result, "batches_frame", None)
        if batches is not None and not (Path(tmp) / "batches.parquet").exists():
            frame = batches()
            if frame is not None and len(frame):
                frame.to_parquet(Path(tmp) / "batches.parquet", index=False)
        files = {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir())}
    summary = json.loads(files["summary.json"])
    return PointOutput(files, summary, dict(prepared.timing))


# -- executors ---------------------------------------------------------------------

OnDone = Callable[[Point, PointOutput], None]


class Executor(Protocol):
    """Runs points and hands each finished one to ``on_done`` (in the calling process)."""

    def run(self, points: list[Point], on_done: OnDone) -> None: ...


class LocalExecutor:
    """Points on ``jobs`` local processes (default: one per core); inline when ``jobs`` is 1."""

    def __init__(self, jobs: int | None = None) -> None:
        if jobs is not None and jobs < 1:
            raise ConfigError(f"jobs: expected an integer >= 1; got {jobs}")
        self.jobs = jobs or os.cpu_count() or 1

    def run(self, points: list[Point], on_done: OnDone) -> None:
        jobs = min(self.jobs, len(points))
        if jobs <= 1:
            for p in points:
                on_done(p, _checked(p, execute, p.spec))
            return
        import multiprocessing

        # spawn: a forked child would inherit the parent's threads' locks (progress bar).
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            # Each worker keeps the workloads it loaded last (sim.runner), one per seed.
            pending = {pool.submit(execute, p.spec): p for p in points}
            try:
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        point = pending.pop(fut)
                        on_done(point, _checked(point, fut.result))
            except BaseException:
                for fut in pending:
                    fut.cancel()
                raise


class RayExecutor:
    """Points as Ray tasks, one CPU each, on the cluster at ``address``.

    Uses a Ray already initialised in this process; otherwise connects to
    ``address`` (``"auto"``, ``"ray://host:10001"``, ...) or, when None,
    starts a local Ray instance for the sweep and stops it afterwards.
    Workers need llmsched installed; workloads travel in the object store.
    """

    def __init__(self, address: str | None = None) -> None:
        self.address = address

    def run(self, points: list[Point], on_done: OnDone) -> None:
        ray = _import_ray(local=self.address is None)
        started = False
        if not ray.is_initialized():
            options: dict[str, Any] = {"log_to_driver": False}
            if self.address is None:
                options["include_dashboard"] = False  # a private instance for this sweep
            try:
                ray.init(address=self.address, **options)
            except ConnectionError as exc:
                raise ConfigError(
                    f"--address {self.address}: found no running Ray cluster there; start one "
                    "(ray start --head) or leave --address out for a private local Ray"
                ) from exc
            started = True
        try:
            task = ray.remote(num_cpus=1)(execute)
            workloads: dict[tuple[str, int], Any] = {}
            refs = {}
            for p in points:
                key = (p.spec.trace.model_dump_json(), p.spec.seed)
                if key not in workloads:
                    workloads[key] = ray.put(load_workload(p.spec.trace, p.spec.seed))
                refs[task.remote(p.spec, workloads[key])] = p
            pending = list(refs)
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    on_done(refs[ref], _checked(refs[ref], _ray_get, ray, ref))
        finally:
            if started:
                ray.shutdown()


def _checked(point: Point, fn: Callable[..., PointOutput], *args: Any) -> PointOutput:
    """``fn(*args)``; an unexpected error names the point it came from."""
    try:
        return fn(*args)
    except LlmschedError:
        raise  # already says what was wrong
    except Exception as exc:
        raise RuntimeError(f"point {point.id} failed: {type(exc).__name__}: {exc}") from exc


#: Read by Ray when first imported: "0" keeps a single-machine instance on loopback
#: (as Ray does on macOS and Windows) instead of the host's network address.
RAY_LOOPBACK_ENV = ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def _import_ray(*, local: bool) -> Any:
    """Import Ray; for a private local instance, first ask it to stay on loopback."""
    if local and "ray" not in sys.modules:
        os.environ.setdefault(*RAY_LOOPBACK_ENV)
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "the Ray executor needs Ray: pip install 'llmsched[ray]' (or pip install ray)"
        ) from None
    return ray


def _ray_get(ray: Any, ref: Any) -> Any:
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, Exception):
            raise cause from None
        raise


def make_executor(kind: str, *, jobs: int | None = None, address: str | None = None) -> Executor:
    """``"local"`` or ``"ray"``."""
    if kind == "local":
        if address is not None:
            raise ConfigError("--address applies to --executor ray only")
        return LocalExecutor(jobs)
    if kind == "ray":
        _import_ray(local=address is None)
        return RayExecutor(address)
    raise ConfigError(f"executor: expected 'local' or 'ray'; got {kind!r}")


# -- the sweep -----------------------------------------------------------------------


@dataclass
class SweepResult:
    """Where a sweep wrote its points, and how many ran or came from the cache."""

    out_dir: Path
    point_dirs: list[Path]
    ran: int
    cached: int


def _cached(point_dir: Path, key: str) -> bool:
    meta = point_dir / "point.json"
    if not (meta.is_file() and (point_dir / "results.parquet").is_file()):
        return False
    try:
        return json.loads(meta.read_text()).get("key") == key
    except (OSError, json.JSONDecodeError):
        return False


def _store(points_dir: Path, point: Point, out: PointOutput) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{point.id}.", dir=points_dir))
    tmp.chmod(0o755)  # mkdtemp makes it private
    for name, data in out.files.items():
        (tmp / name).write_bytes(data)
    meta = {
        "id": point.id,
        "key": point.key,
        "label": point.spec.policy.display,
        "load": point.spec.load,
        "seed": point.spec.seed,
        "code_version": code_version(),
        "spec": point.spec.model_dump(mode="json"),
        "timing": out.timing,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (tmp / "point.json").write_text(json.dumps(meta, indent=2) + "\n")
    final = points_dir / point.id
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def run_sweep(
    scenario: Scenario,
    out_dir: str | Path,
    executor: Executor,
    *,
    scenario_file: str | Path | None = None,
    force: bool = False,
    on_point: Callable[[Point, bool], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
) -> SweepResult:
    """Run every point of ``scenario`` not already in ``out_dir`` (all of them with ``force``).

    ``on_start(total, cached)`` is called once the cache is checked;
    ``on_point(point, from_cache)`` after each point is stored or skipped.

    Raises:
        ScenarioError: a policy name that is not registered, before anything runs.
    """
    scenario.check_policies()
    out = Path(out_dir)
    points_dir = out / "points"
    points_dir.mkdir(parents=True, exist_ok=True)
    points = points_of(scenario)
    meta = {
        "scenario": scenario.model_dump(mode="json"),
        "points": [p.id for p in points],
        "versions": versions(),
        "code_version": code_version(),
        "git_commit": git_commit(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (out / "sweep.json").write_text(json.dumps(meta, indent=2) + "\n")
    if scenario_file is not None:
        src, dest = Path(scenario_file), out / f"scenario{Path(scenario_file).suffix}"
        if src.resolve() != dest.resolve():
            shutil.copyfile(src, dest)
    todo = [p for p in points if force or not _cached(points_dir / p.id, p.key)]
    if on_start is not None:
        on_start(len(points), len(points) - len(todo))
    if on_point is not None:
        for p in points:
            if p not in todo:
                on_point(p, True)

    def done(point: Point, output: PointOutput) -> None:
        _store(points_dir, point, output)
        if on_point is not None:
            on_point(point, False)

    if todo:
        executor.run(todo, done)
    return SweepResult(out, [points_dir / p.id for p in points], len(todo), len(points) - len(todo))
