"""Light imports and no import cycles: what each entry point loads, and the module graph.

The policy core is what the live router imports, so building every policy
must not load the simulator (simpy), the reports (plotly) or the data
libraries (pandas). The checks run in a fresh interpreter: this test
process has long since loaded everything.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("scheduler", "traces", "sim")


def _loaded_after(code: str, watch: tuple[str, ...]) -> list[str]:
    """Which of ``watch`` are in ``sys.modules`` after running ``code`` in a fresh interpreter."""
    probe = (
        f"{code}\nimport json, sys\nprint(json.dumps([m for m in {watch!r} if m in sys.modules]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_building_every_policy_loads_no_simulator_report_or_dataframe_library():
    code = (
        "import scheduler, scheduler.policy, scheduler.registry as r\n"
        "built = [r.create(name) for name in r.names()]\n"
        "assert len(built) >= 8, r.names()\n"
    )
    assert _loaded_after(code, ("simpy", "plotly", "pandas")) == []


def test_the_registry_loads_the_built_in_policies_on_first_use():
    # Importing the registry (or the parameter helpers policies use) loads no policy...
    watch = ("scheduler.policies", "scheduler.routing", "scheduler.registry")
    assert _loaded_after("import scheduler.registry", watch) == ["scheduler.registry"]
    assert _loaded_after("import scheduler.params", watch) == []
    # ...the first look-up loads them all.
    code = "import scheduler.registry as r\nassert 'laps' in r.names()\n"
    assert _loaded_after(code, watch) == list(watch)


def test_reading_a_cost_profile_needs_neither_numpy_nor_pandas():
    example = ROOT / "examples" / "profiles" / "qwen2.5-32b-h200-tp1.json"
    code = (
        "from scheduler.cost_model import CostModel\n"
        f"CostModel.from_names('qwen2.5-32b', 'h200', 1, {str(example)!r})\n"
    )
    assert _loaded_after(code, ("numpy", "pandas", "scheduler.calibration")) == []


def test_the_command_line_loads_only_what_the_command_uses():
    code = (
        "from typer.testing import CliRunner\n"
        "from sim.cli import app\n"
        "for args in (['--help'], ['policies'], ['simulate', '--help']):\n"
        "    result = CliRunner().invoke(app, args)\n"
        "    assert result.exit_code == 0, result.output\n"
    )
    assert _loaded_after(code, ("plotly", "ray", "simpy", "sim.report", "sim.sweep")) == []


def test_traces_loads_its_names_on_first_use():
    assert _loaded_after("import traces.errors, traces.request", ("pandas", "pyarrow")) == []
    # The lazy names still resolve, to the submodules' own objects.
    code = "import traces, traces.loaders\nassert traces.load is traces.loaders.load\n"
    assert "pandas" in _loaded_after(code, ("pandas",))


# -- the import graph ----------------------------------------------------------------------


def _module_level_imports() -> dict[str, set[str]]:
    """Project module -> the project modules it imports when it is imported.

    Module-level statements, including those under ``if``/``try`` (so
    ``if TYPE_CHECKING:`` imports count: a type checker follows them, and a
    cycle through them is one refactoring away from a real one). Imports
    inside functions run later and are left out.
    """
    files: dict[str, Path] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def known(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    def statements(body: list[ast.stmt]):
        for node in body:
            yield node
            for block in ("body", "orelse", "finalbody"):
                if isinstance(node, ast.If | ast.Try) and hasattr(node, block):
                    yield from statements(getattr(node, block))
            for handler in getattr(node, "handlers", []):
                yield from statements(handler.body)

    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        deps: set[str | None] = set()
        for node in statements(ast.parse(path.read_bytes()).body):
            if isinstance(node, ast.Import):
                deps.update(known(a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package
                    for _ in range(node.level - 1):
                        parent = parent.rpartition(".")[0]
                    base = f"{parent}.{base}" if base else parent
                deps.update(
                    f"{base}.{a.name}" if f"{base}.{a.name}" in files else known(base)
                    for a in node.names
                )
        graph[module] = {d for d in deps if d is not None and d != module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_graph_sees_the_layering():
    graph = _module_level_imports()
    assert "scheduler.policy" in graph["scheduler.registry"]
    assert "scheduler.profile" in graph["scheduler.cost_model"]
    assert "sim.loop" in graph["sim.runner"]
    # The bottom layer imports nothing above it; the policy core nothing of the simulator.
    for module, deps in graph.items():
        if module.startswith("traces"):
            assert not {d for d in deps if d.startswith(("scheduler", "sim"))}, module
        if module.startswith("scheduler"):
            assert not {d for d in deps if d.startswith("sim")}, module


def test_no_module_of_scheduler_traces_or_sim_is_in_an_import_cycle():
    cycles = _cycles(_module_level_imports())
    assert cycles == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize(
    "module",
    ["scheduler.registry", "scheduler.cost_model", "scheduler.profile", "scheduler.params"],
)
def test_the_core_modules_import_neither_calibration_nor_the_policies_at_import_time(module):
    # The registry loads the built-in policies on first use, the cost model
    # reads profiles without the fitter: each is importable on its own.
    graph = _module_level_imports()
    assert not graph[module] & {"scheduler.calibration", "scheduler.policies", "scheduler.routing"}
