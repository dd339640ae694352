"""deploy/: the files a user runs the router with agree with the code and with each other.

Nothing here builds an image or starts a container; the files are read as
the tools would read them (TOML by the router's own loader, YAML, JSON, the
Dockerfile's exec-form lines) and checked against the router's config
model, its command line and the metric names a scrape shows.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import typer
import yaml
from prometheus_client.parser import text_string_to_metric_families

from scheduler import registry
from scheduler.policies.laps import LapsConfig
from scheduler.router.config import BackendConfig, RouterConfig, load_config
from scheduler.router.health import BreakerSettings, HealthSettings
from scheduler.router.metrics import PREFIX, RouterMetrics
from sim.cli import app

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ROUTER_PORT = 8080
#: Labels Prometheus adds to every scraped series (the target's), beside the metric's own.
TARGET_LABELS = {"instance", "job"}


def yaml_docs(path: Path) -> list[dict[str, Any]]:
    """The YAML documents of ``path`` that are not empty (an all-comment file has none)."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def compose() -> dict[str, Any]:
    (doc,) = yaml_docs(DEPLOY / "compose.yaml")
    return doc


def k8s(kind: str) -> dict[str, Any]:
    """The one object of ``kind`` among deploy/k8s/*.yaml."""
    found = [
        d
        for p in sorted((DEPLOY / "k8s").glob("*.yaml"))
        for d in yaml_docs(p)
        if d["kind"] == kind
    ]
    assert len(found) == 1, f"expected one {kind} in deploy/k8s, found {len(found)}"
    return found[0]


def flag_value(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing from {args}"
    return args[args.index(flag) + 1]


def cli_flags(command: str) -> set[str]:
    """Every option name of ``llmsched COMMAND``."""
    click_cmd = typer.main.get_command(app).commands[command]  # type: ignore[attr-defined]
    return {name for p in click_cmd.params for name in (*p.opts, *p.secondary_opts)}


def assert_known_flags(command: str, args: list[str]) -> None:
    unknown = [a.split("=")[0] for a in args if a.startswith("--")]
    unknown = [a for a in unknown if a not in cli_flags(command)]
    assert not unknown, f"llmsched {command} has no flags {unknown}"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile line, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def exec_form(instructions: list[tuple[str, str]], name: str) -> list[str]:
    (args,) = [rest for word, rest in instructions if word == name]
    value = json.loads(args)  # exec form: signals reach the router, not a shell
    assert isinstance(value, list)
    return value


# -- router.toml ---------------------------------------------------------------------------


def test_router_toml_loads_and_its_laps_parameters_are_the_policys_own():
    cfg = load_config(DEPLOY / "router.toml")
    assert cfg.port == ROUTER_PORT
    assert cfg.policy == "laps"
    laps_params = {f.name for f in dataclasses.fields(LapsConfig)}
    assert set(cfg.policy_params) == laps_params
    defaults = LapsConfig()
    for name, value in cfg.policy_params.items():
        assert value == getattr(defaults, name), f"policy_params.{name}: not laps's default"
    assert registry.create(cfg.policy, **cfg.policy_params).name == "laps"
    assert [b.protocol for b in cfg.backends] == ["vllm", "vllm"]
    assert cfg.admin_key is None  # secrets come from the environment, not the example


@pytest.mark.parametrize(
    "model",
    [RouterConfig, BackendConfig, HealthSettings, BreakerSettings],
    ids=lambda m: m.__name__,
)
def test_router_toml_shows_every_config_key(model):
    text = (DEPLOY / "router.toml").read_text()
    missing = [
        key
        for key in model.model_fields
        if not re.search(rf"^(# )?{key} = ", text, re.MULTILINE)
        and not re.search(rf"^\[\[?{key}\]\]?$", text, re.MULTILINE)
    ]
    assert not missing, f"deploy/router.toml does not show {model.__name__} keys {missing}"


# -- Dockerfile ----------------------------------------------------------------------------


def test_dockerfile_runs_the_router_on_all_interfaces_as_a_non_root_user():
    ins = dockerfile_instructions()
    assert ins[0] == ("FROM", "python:3.11-slim")
    entrypoint, cmd = exec_form(ins, "ENTRYPOINT"), exec_form(ins, "CMD")
    assert entrypoint[:2] == ["llmsched", "router"]
    args = entrypoint[2:] + cmd
    assert_known_flags("router", args)
    assert flag_value(args, "--host") == "0.0.0.0"
    # The config CMD names is the example the image copies in.
    copies = [rest.split()[-2:] for word, rest in ins if word == "COPY"]
    assert ["deploy/router.toml", flag_value(args, "--config")] in copies
    assert ("EXPOSE", str(ROUTER_PORT)) in ins
    (user,) = [rest for word, rest in ins if word == "USER"]
    assert user.split(":")[0] not in ("root", "0")
    pip = [rest for word, rest in ins if word == "RUN" and "pip install" in rest]
    assert pip and all("dev" not in p for p in pip)
    (check,) = [rest for word, rest in ins if word == "HEALTHCHECK"]
    probe = json.loads(check[check.index("CMD") + 3 :].strip())
    assert probe[:2] == ["python", "-c"]
    assert f"http://127.0.0.1:{ROUTER_PORT}/health" in probe[2]
    compile(probe[2], "HEALTHCHECK", "exec")


# -- compose.yaml and prometheus.yml ---------------------------------------------------------


def test_compose_routes_to_its_emulated_vllm_servers():
    services = compose()["services"]
    router_toml = load_config(DEPLOY / "router.toml")
    for backend in router_toml.backends:
        url = urlsplit(backend.url)
        svc = services[url.hostname]
        assert svc["entrypoint"] == ["llmsched", "emulate"]
        assert_known_flags("emulate", svc["command"])
        assert flag_value(svc["command"], "--protocol") == backend.protocol == "vllm"
        assert flag_value(svc["command"], "--host") == "0.0.0.0"
        assert int(flag_value(svc["command"], "--port")) == url.port
        assert f"http://127.0.0.1:{url.port}/health" in " ".join(svc["healthcheck"]["test"])
    router = services["router"]
    assert "entrypoint" not in router  # the image's: llmsched router --host 0.0.0.0
    assert_known_flags("router", router["command"])
    config = flag_value(router["command"], "--config")
    assert f"./router.toml:{config}:ro" in router["volumes"]
    assert f"{ROUTER_PORT}:{ROUTER_PORT}" in router["ports"]
    assert set(router["depends_on"]) == {urlsplit(b.url).hostname for b in router_toml.backends}
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts {source}, not in deploy/"


def test_prometheus_scrapes_the_routers_metrics_path():
    services = compose()["services"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in services["prometheus"]["volumes"]
    (prom,) = yaml_docs(DEPLOY / "prometheus.yml")
    targets = {
        target: job.get("metrics_path", "/metrics")
        for job in prom["scrape_configs"]
        for sc in job["static_configs"]
        for target in sc["targets"]
    }
    assert targets[f"router:{ROUTER_PORT}"] == "/metrics"
    for target in targets:
        assert target.split(":")[0] in services


def test_grafana_provisioning_finds_the_dashboard_and_prometheus():
    services = compose()["services"]
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    dashboard_at = PurePosixPath(mounts["./grafana/llmsched-router.json"])
    (providers,) = yaml_docs(DEPLOY / "grafana/provisioning/dashboards/llmsched.yaml")
    assert [p["options"]["path"] for p in providers["providers"]] == [str(dashboard_at.parent)]
    (sources,) = yaml_docs(DEPLOY / "grafana/provisioning/datasources/prometheus.yaml")
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus"
    assert urlsplit(source["url"]).hostname in services


# -- the Grafana dashboard -----------------------------------------------------------------


def scraped_series() -> dict[str, set[str]]:
    """Sample name -> label names, from a RouterMetrics that every call has touched."""
    m = RouterMetrics("laps")
    a, b = "http://10.0.0.5:8000", "http://10.0.0.6:8000"
    m.request_done("completions", 200, a, ttft_s=0.1, tpot_s=0.02, e2e_s=1.0)
    m.request_done("chat", 503, "", ttft_s=None, tpot_s=None, e2e_s=0.001)
    m.queue_depth("short", 3)
    m.inflight(a, 2)
    m.batch_released(8)
    m.decision("dispatch")
    m.health(a, True, "closed")
    m.health(b, False, "open")
    m.retry(b)
    m.rejected("queue_full")
    body, _ = m.render()
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out.setdefault(s.name, set()).update(s.labels)
    return out


def dashboard() -> dict[str, Any]:
    return json.loads((DEPLOY / "grafana/llmsched-router.json").read_text())


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


METRIC = re.compile(rf"\b({PREFIX}[A-Za-z0-9_:]*)(\{{[^}}]*\}})?")
BY = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")


def test_every_series_the_dashboard_queries_is_one_the_router_exports():
    series = scraped_series()
    exprs = dashboard_exprs()
    assert exprs
    for expr in exprs:
        used = METRIC.findall(expr)
        assert used, f"no {PREFIX}* series in {expr!r}"
        labels: set[str] = set(TARGET_LABELS)
        for name, selector in used:
            assert name in series, f"{name} (in {expr!r}) is not in the router's /metrics"
            labels |= series[name]
            unknown = set(MATCHER.findall(selector)) - series[name] - TARGET_LABELS
            assert not unknown, f"{name} has no labels {unknown} (in {expr!r})"
        for group in BY.findall(expr):
            unknown = {g.strip() for g in group.split(",") if g.strip()} - labels
            assert not unknown, f"grouping by {unknown}, labels no series has, in {expr!r}"
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}")


def test_the_dashboard_shows_every_router_metric():
    def family(sample: str) -> str:
        return re.sub(r"_(total|created|bucket|count|sum)$", "", sample)

    exported = {family(s) for s in scraped_series()}
    shown = {family(name) for expr in dashboard_exprs() for name, _ in METRIC.findall(expr)}
    assert exported - shown == set(), "metrics with no panel on the dashboard"


def test_dashboard_panels_use_its_datasource_and_variables():
    d = dashboard()
    variables = {v["name"] for v in d["templating"]["list"]}
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for p in d["panels"]:
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}"
        for t in p["targets"]:
            for var in re.findall(r"\$(\w+)", t["expr"]):
                assert var.startswith("__") or var in variables, f"${var} is not defined"


# -- Kubernetes ----------------------------------------------------------------------------


def test_k8s_router_toml_loads_and_the_deployment_waits_out_its_shutdown_grace(tmp_path):
    config_map = k8s("ConfigMap")
    path = tmp_path / "router.toml"
    path.write_text(config_map["data"]["router.toml"])
    cfg = load_config(path)
    assert cfg.host == "0.0.0.0"
    assert cfg.port == ROUTER_PORT

    pod = k8s("Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == cfg.port
    for probe, path_ in (("readinessProbe", "/readiness"), ("livenessProbe", "/health")):
        get = container[probe]["httpGet"]
        assert get["path"] == path_
        assert ports.get(get["port"], get["port"]) == cfg.port
    # The pod is killed terminationGracePeriodSeconds after deletion begins: the preStop
    # sleep and the router's own grace must fit, and liveness must not fail first.
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] >= float(pre_stop[1]) + cfg.shutdown_grace_s + 5
    live = container["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > cfg.shutdown_grace_s
    assert container["resources"]["requests"] and container["resources"]["limits"]

    config_dir = str(PurePosixPath(flag_value(container["args"], "--config")).parent)
    assert_known_flags("router", container["args"])
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts[config_dir]]["configMap"]["name"] == config_map["metadata"]["name"]


def test_k8s_admin_key_comes_from_the_secret_and_the_service_reaches_the_pod():
    deployment = k8s("Deployment")
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    ref = env["LLMSCHED_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]
    secret = k8s("Secret")
    assert ref["name"] == secret["metadata"]["name"]
    assert ref["key"] in secret["stringData"]

    dockerfile_user = [rest for word, rest in dockerfile_instructions() if word == "USER"]
    assert str(pod["spec"]["securityContext"]["runAsUser"]) == dockerfile_user[0].split(":")[0]

    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = k8s("Service")
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container_ports.get(port["targetPort"], port["targetPort"]) == ROUTER_PORT
    assert port["port"] == ROUTER_PORT

    (kustomization,) = yaml_docs(DEPLOY / "k8s/kustomization.yaml")
    for resource in kustomization["resources"]:
        assert (DEPLOY / "k8s" / resource).is_file()


def test_readme_commands_name_files_that_exist():
    readme = (DEPLOY / "README.md").read_text()
    for path in set(re.findall(r"\bdeploy/[\w./-]+\w", readme)):
        assert (DEPLOY.parent / path).exists(), f"deploy/README.md names {path}"
    for line in readme.splitlines():
        if line.strip().startswith("llmsched router "):
            assert_known_flags("router", shlex.split(line.strip().rstrip("\\"))[2:])
