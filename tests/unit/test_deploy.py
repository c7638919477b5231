"""deploy/: the compose file, the systemd units and the Kubernetes manifests start real entry points of
this project, agree with the config and with each other on names and ports, keep secrets out, and pass
the tools' own checks where the tools are installed (docker compose, systemd-analyze, kubectl)."""

from __future__ import annotations

import argparse
import asyncio
import configparser
import functools
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc.aio
import pytest
import yaml

from llorch.config import LlorchConfig, load_config, validate_config
from llorch.lifecycle import grpc_server
from llorch_cli.main import _parser
from llorch_cli.up import POOL_MANAGER_STOP_GRACE_S
from llorch_poolmgr.__main__ import addresses, advertised_host, select_pools
from tests.support.procs import free_port

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CONFIG = DEPLOY / "config" / "llorch.yaml"
COMPOSE = DEPLOY / "compose.yaml"
SYSTEMD = DEPLOY / "systemd"
K8S = DEPLOY / "k8s"
CONFIG_IN_CONTAINER = "/etc/llorch/llorch.yaml"
HEALTHCHECK_IN_IMAGE = "/opt/llorch/healthcheck.py"
SECRET_ENV = re.compile(r"TOKEN|PASSWORD|SECRET|KEY")
COMPOSE_SECRETS = {"LLORCH_API_TOKEN": "test-api", "LLORCH_INTERNAL_TOKEN": "test-internal"}
SERVICE_UNITS = ("llorch-redis.service", "llorch-scheduler.service", "llorch-gateway.service")
POOLMGR_UNIT = "llorch-poolmgr@.service"
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet")
POD_IP = "10.244.1.7"  # a sample of what the downward API gives


@dataclass(frozen=True)
class Ports:
    """Where each service listens according to a config (and to the pool manager's own address rule)."""

    gateway: int
    scheduler: int
    scheduler_metrics: int
    poolmgr: int
    poolmgr_metrics: int
    scheduler_host: str  # grpc.scheduler's host: the name the others dial the scheduler at
    redis_host: str
    redis_port: int


def _port(address: str) -> int:
    return int(address.rpartition(":")[2])


def ports_of(cfg: LlorchConfig) -> Ports:
    poolmgr, poolmgr_metrics = addresses(cfg, 0)
    redis = re.fullmatch(r"redis://([^:/]+):(\d+)/\d+", cfg.redis.url or "")
    assert redis is not None, cfg.redis.url
    return Ports(
        gateway=_port(cfg.api.bind),
        scheduler=_port(cfg.grpc.scheduler),
        scheduler_metrics=cfg.grpc.metrics_base_port,
        poolmgr=_port(poolmgr),
        poolmgr_metrics=_port(poolmgr_metrics),
        scheduler_host=cfg.grpc.scheduler.rpartition(":")[0],
        redis_host=redis.group(1),
        redis_port=int(redis.group(2)),
    )


@pytest.fixture(scope="module")
def cfg() -> LlorchConfig:
    return load_config(CONFIG, env={})


@pytest.fixture(scope="module")
def ports(cfg: LlorchConfig) -> Ports:
    return ports_of(cfg)


def cli_command(argv: list[str]) -> tuple[str, str]:
    """(subcommand, --config) of `llorch ARGV`, parsed by the real CLI parser (SystemExit if it refuses)."""
    args = _parser().parse_args(argv)
    assert args.command in ("gateway", "scheduler", "pool-manager"), argv
    return args.command, args.config


def parsed(argv: list[str]) -> argparse.Namespace:
    """`llorch ARGV` as the real CLI parser reads it (SystemExit if it refuses)."""
    return _parser().parse_args(argv)


def pool_manager_serves(cfg: LlorchConfig, args: argparse.Namespace) -> list[str]:
    """The pools a pool manager started with ``args`` serves, after the checks `llorch pool-manager`
    makes before it starts (a wildcard listen host needs --advertise; --host must match a pool)."""
    assert args.command == "pool-manager"
    advertised_host(args.listen, args.advertise)
    return [p.id for p in select_pools(cfg, args.host, args.pools.split(",") if args.pools else None)]


# ---- the config and the image -------------------------------------------------------------------------


@pytest.mark.parametrize("path", [CONFIG, SYSTEMD / "llorch.yaml"], ids=["containers", "systemd"])
def test_configs_validate_with_the_loader(path: Path) -> None:
    cfg = load_config(path, env={})
    assert cfg.redis.url is not None  # the services refuse a null redis.url outside `llorch up`
    assert not any(SECRET_ENV.search(key) for pool in cfg.pools for key in pool.engine_env)


def test_systemd_config_uses_the_same_ports(ports: Ports) -> None:
    host = ports_of(load_config(SYSTEMD / "llorch.yaml", env={}))
    assert (host.gateway, host.scheduler, host.scheduler_metrics, host.poolmgr, host.poolmgr_metrics) == (
        ports.gateway,
        ports.scheduler,
        ports.scheduler_metrics,
        ports.poolmgr,
        ports.poolmgr_metrics,
    )
    assert host.scheduler_host == "127.0.0.1"  # one host: everything on loopback


def test_dockerfile_builds_the_package_with_the_pinned_tools() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = [*pyproject["dependencies"], *pyproject["optional-dependencies"]["dev"]]
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in text
    for package in ("grpcio-tools", "protobuf"):  # the stubs are generated as `make proto` makes them
        pin = next(p for p in pins if p.startswith(f"{package}=="))
        assert pin in text, f"{pin} from pyproject.toml"
    assert "pip install --no-cache-dir /src" in text
    assert f"COPY deploy/healthcheck.py {HEALTHCHECK_IN_IMAGE}" in text
    assert re.search(r"^USER llorch$", text, re.M)
    assert 'ENTRYPOINT ["llorch"]' in text
    assert "llorch" in pyproject["scripts"]
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {"libs/llorch/v1", ".venv", ".git", "deploy/.env"} <= set(ignored)


# ---- compose ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def _healthcheck_target(service: dict[str, Any]) -> tuple[str, str]:
    test = service["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", HEALTHCHECK_IN_IMAGE], test
    return test[3], test[4]


def test_compose_has_redis_with_aof_and_a_volume(compose: dict[str, Any], ports: Ports) -> None:
    redis = compose["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert "--dir /data" in command
    volume, _, target = redis["volumes"][0].partition(":")
    assert target == "/data" and volume in compose["volumes"]
    assert ports.redis_host in redis["networks"]["backend"]["aliases"]
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])


def test_compose_services_run_the_project_entry_points(compose: dict[str, Any]) -> None:
    services = compose["services"]
    expected = {"scheduler": "scheduler", "pool-manager": "pool-manager", "gateway": "gateway"}
    for name, command in expected.items():
        service = services[name]
        assert service["image"].startswith("llama-orch:")
        assert service["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
        assert cli_command(service["command"]) == (command, CONFIG_IN_CONTAINER)
        config_mounts = [v for v in service["volumes"] if isinstance(v, dict)]
        assert config_mounts == [
            {
                "type": "bind",
                "source": "./config/llorch.yaml",
                "target": CONFIG_IN_CONTAINER,
                "read_only": True,
            }
        ]
        assert (COMPOSE.parent / config_mounts[0]["source"]).resolve() == CONFIG
        assert service["restart"] == "unless-stopped"
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"]


def test_compose_reserves_a_gpu_for_the_pool_manager(compose: dict[str, Any]) -> None:
    devices = compose["services"]["pool-manager"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert not any("deploy" in s for n, s in compose["services"].items() if n != "pool-manager")


def test_compose_names_and_ports_agree_with_the_config(
    compose: dict[str, Any], cfg: LlorchConfig, ports: Ports
) -> None:
    services = compose["services"]
    assert not any("network_mode" in s or "hostname" in s for s in services.values())  # no shared namespace
    scheduler = services["scheduler"]
    # It binds every address of its container and is dialled by the alias grpc.scheduler names.
    assert parsed(scheduler["command"]).listen == f"0.0.0.0:{ports.scheduler}"
    assert scheduler["networks"]["backend"]["aliases"] == [ports.scheduler_host]
    assert _healthcheck_target(scheduler) == ("grpc", f"{ports.scheduler_host}:{ports.scheduler}")
    manager = services["pool-manager"]
    args = parsed(manager["command"])
    # Every pool of the config is this pool manager's, bound on 0.0.0.0 and registered by its alias.
    assert pool_manager_serves(cfg, args) == [p.id for p in cfg.pools]
    assert (args.listen, args.index, args.scheduler) == ("0.0.0.0", 0, None)
    assert manager["networks"]["backend"]["aliases"] == [args.advertise]
    registered = addresses(cfg, args.index, args.advertise)[0]
    assert (
        _healthcheck_target(manager) == ("grpc", registered) == ("grpc", f"{args.advertise}:{ports.poolmgr}")
    )
    gateway = services["gateway"]
    assert _healthcheck_target(gateway) == ("http", f"http://127.0.0.1:{ports.gateway}/readyz")
    [published] = gateway["ports"]
    assert published.rpartition(":")[2] == str(ports.gateway)
    assert "127.0.0.1:" in published  # loopback unless the operator says otherwise
    assert all("healthcheck" in s for s in services.values())
    assert {n for n, s in services.items() if "backend" in s["networks"]} == set(services)


def test_compose_takes_secrets_from_the_environment_only(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if SECRET_ENV.search(key):
                assert re.fullmatch(r"\$\{" + key + r"(:\?[^}]*|:-)\}", value), (name, key, value)
    required = {k for k, v in compose["services"]["gateway"]["environment"].items() if ":?" in v}
    assert required == {"LLORCH_API_TOKEN", "LLORCH_INTERNAL_TOKEN"}
    # Only the gateway sees the API token.
    assert [
        n for n, s in compose["services"].items() if "LLORCH_API_TOKEN" in (s.get("environment") or {})
    ] == ["gateway"]
    assert (DEPLOY / ".gitignore").read_text().split()[-1] == ".env"


def _docker_compose() -> list[str]:
    if shutil.which("docker") is None:
        pytest.skip("docker is not installed")
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        pytest.skip("docker is installed without the compose plugin (`docker compose version` fails)")
    return ["docker", "compose", "--env-file", "/dev/null", "-f", str(COMPOSE)]


def test_docker_compose_config_validates() -> None:
    """`docker compose config` needs no daemon: it parses, interpolates and checks the file; without the
    API token it refuses (the `${VAR:?}` guard), so a stack never starts with an empty one."""
    base = _docker_compose()
    # The caller's own LLORCH_* and COMPOSE_* settings (and deploy/.env, by --env-file) stay out.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLORCH_", "COMPOSE_"))}
    ok = subprocess.run(
        [*base, "config", "--quiet"], env=env | COMPOSE_SECRETS, capture_output=True, text=True, check=False
    )
    assert ok.returncode == 0, ok.stderr
    internal_only = env | {"LLORCH_INTERNAL_TOKEN": COMPOSE_SECRETS["LLORCH_INTERNAL_TOKEN"]}
    missing = subprocess.run(
        [*base, "config", "--quiet"], env=internal_only, capture_output=True, text=True, check=False
    )
    assert missing.returncode != 0 and "LLORCH_API_TOKEN" in missing.stdout + missing.stderr


# ---- systemd ------------------------------------------------------------------------------------------


def read_unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read_string((SYSTEMD / name).read_text().replace("\\\n", " "))
    return parser


def unit_lines(name: str, key: str) -> list[str]:
    """Every value of ``key`` (configparser keeps only the last of a repeated key)."""
    return [
        line.partition("=")[2]
        for line in (SYSTEMD / name).read_text().splitlines()
        if line.startswith(f"{key}=")
    ]


def exec_start(name: str) -> list[str]:
    argv = shlex.split(read_unit(name)["Service"]["ExecStart"])
    # What systemd substitutes: the instance for %i, the (unset) environment for ${VAR}.
    return [re.sub(r"\$\{\w+\}", "", arg.replace("%i", "0")) for arg in argv]


@pytest.mark.parametrize(
    ("unit", "command"),
    [
        ("llorch-scheduler.service", "scheduler"),
        ("llorch-gateway.service", "gateway"),
        (POOLMGR_UNIT, "pool-manager"),
    ],
)
def test_units_start_the_project_entry_points(unit: str, command: str) -> None:
    argv = exec_start(unit)
    assert argv[0] == "/opt/llorch/bin/llorch"
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts[Path(argv[0]).name] == "llorch_cli.main:main"
    assert cli_command(argv[1:]) == (command, CONFIG_IN_CONTAINER)
    service = read_unit(unit)["Service"]
    assert service["Restart"] == "on-failure"
    assert service["User"] == "llorch" and service["Group"] == "llorch"
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
    assert service["ProtectHome"] == "yes"
    if command != "gateway":  # state_dir, shared like `llorch up` shares it
        assert service["StateDirectory"] == "llorch"
    assert unit_lines(unit, "EnvironmentFile")[0] == "/etc/llorch/internal.env"
    # The API token only reaches the gateway; no unit spells a secret out.
    assert ("/etc/llorch/gateway.env" in unit_lines(unit, "EnvironmentFile")) == (command == "gateway")
    assert not any(SECRET_ENV.search(value) for value in unit_lines(unit, "Environment"))


def test_poolmgr_template_serves_its_instance() -> None:
    args = _parser().parse_args(exec_start(POOLMGR_UNIT)[1:])
    assert args.index == 0 and not args.pools  # `--pools=` (no env file): every pool
    host_cfg = load_config(SYSTEMD / "llorch.yaml", env={})
    assert pool_manager_serves(host_cfg, args) == [p.id for p in host_cfg.pools]  # all `local`: one host
    assert "/etc/llorch/poolmgr-%i.env" in [
        v.lstrip("-") for v in unit_lines(POOLMGR_UNIT, "EnvironmentFile")
    ]
    assert read_unit(POOLMGR_UNIT)["Install"]["DefaultInstance"] == "0"


def test_redis_unit_keeps_aof_on_loopback() -> None:
    argv = exec_start("llorch-redis.service")
    assert argv[0] == "/usr/bin/redis-server"
    assert " ".join(argv).count("--appendonly yes") == 1 and "127.0.0.1" in argv
    assert read_unit("llorch-redis.service")["Service"]["Restart"] == "on-failure"


def test_target_lists_every_unit() -> None:
    target = read_unit("llorch.target")
    wants = set(target["Unit"]["Wants"].split())
    assert wants == {*SERVICE_UNITS, POOLMGR_UNIT.replace("@", "@0")}
    units = {p.name for p in SYSTEMD.iterdir() if p.suffix == ".service"}
    assert units == {*SERVICE_UNITS, POOLMGR_UNIT}
    for unit in units:
        parsed = read_unit(unit)
        assert parsed["Unit"]["PartOf"] == "llorch.target"
        assert parsed["Install"]["WantedBy"] == "llorch.target"


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """The units load in systemd's own parser without a warning, in a scratch root with stand-in
    binaries (the real ones are installed on the target host)."""
    analyze = shutil.which("systemd-analyze")
    system_units = Path("/usr/lib/systemd/system")
    if analyze is None or not (system_units / "sysinit.target").exists():
        pytest.skip("systemd-analyze or the system's unit files are not installed")
    root = tmp_path / "root"
    shutil.copytree(system_units, root / "usr/lib/systemd/system", symlinks=True)
    units = root / "etc/systemd/system"
    shutil.copytree(SYSTEMD, units, ignore=shutil.ignore_patterns("*.yaml", "*.conf"))
    for binary in ("opt/llorch/bin/llorch", "usr/bin/redis-server"):
        (root / binary).parent.mkdir(parents=True, exist_ok=True)
        (root / binary).write_text("#!/bin/sh\n")
        (root / binary).chmod(0o755)
    names = [*SERVICE_UNITS, POOLMGR_UNIT.replace("@", "@0"), "llorch.target"]
    result = subprocess.run(
        [analyze, "verify", "--man=no", f"--root={root}", *names], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and "llorch" not in result.stdout + result.stderr, result.stderr


# ---- Kubernetes ---------------------------------------------------------------------------------------


@functools.cache
def k8s_documents() -> tuple[tuple[str, dict[str, Any]], ...]:
    """(file, object) for every manifest; parsed once (the tests only read them)."""
    return tuple(
        (path.name, doc)
        for path in sorted(K8S.glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for doc in yaml.safe_load_all(path.read_text())
    )


def k8s_object(kind: str, name: str) -> dict[str, Any]:
    [found] = [d for _, d in k8s_documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def containers(workload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in workload["spec"]["template"]["spec"]["containers"]}


def expand(container: dict[str, Any], **values: str) -> list[str]:
    """The container's args as the kubelet hands them over: `$(VAR)` replaced for each VAR in its env
    (the downward API's from ``values``, or samples). A reference to an undefined VAR stays verbatim in
    Kubernetes, which is never what a manifest means, so it fails here."""
    defined = {e["name"]: e.get("value") for e in container.get("env", [])}
    samples = {"NODE_NAME": "gpu-node-1", "POD_IP": POD_IP, **values}

    def value_of(match: re.Match[str]) -> str:
        name = match.group(1)
        assert name in defined, f"$({name}) is not in the container's env"
        return defined[name] or samples[name]

    return [re.sub(r"\$\((\w+)\)", value_of, arg) for arg in container.get("args", [])]


def test_every_manifest_is_a_named_object() -> None:
    docs = list(k8s_documents())
    assert len(docs) >= 10
    for file, doc in docs:
        assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], file


def test_kustomization_lists_the_manifests_and_the_config() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    resources = kustomization["resources"]
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.yaml"}
    assert set(resources) == files | {"../config"}  # the Secret is created by hand, never applied from here
    generator = yaml.safe_load((DEPLOY / "config" / "kustomization.yaml").read_text())["configMapGenerator"]
    assert generator == [
        {"name": "llorch-config", "files": ["llorch.yaml"], "options": generator[0]["options"]}
    ]


def test_workloads_have_images_probes_and_resources(ports: Ports) -> None:
    workloads = [d for _, d in k8s_documents() if d["kind"] in WORKLOAD_KINDS]
    names = {w["metadata"]["name"] for w in workloads}
    assert names == {"llorch-gateway", "llorch-scheduler", "llorch-poolmgr", "llorch-redis"}
    for workload in workloads:
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        for name, container in containers(workload).items():
            assert container["image"], name
            assert container["resources"]["requests"] and container["resources"]["limits"]["memory"], name
            assert container["livenessProbe"], name
            assert container["securityContext"]["readOnlyRootFilesystem"] is True, name
            if container.get("args"):
                assert cli_command(expand(container))[1] == CONFIG_IN_CONTAINER


def test_gateway_probes_and_service_use_the_gateway_port(ports: Ports) -> None:
    gateway = containers(k8s_object("Deployment", "llorch-gateway"))["gateway"]
    assert cli_command(gateway["args"])[0] == "gateway"
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": ports.gateway}
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": ports.gateway}
    assert [p["containerPort"] for p in gateway["ports"]] == [ports.gateway]
    service = k8s_object("Service", "llorch-gateway")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == [ports.gateway]


def test_scheduler_binds_every_address_behind_its_service(ports: Ports) -> None:
    scheduler = k8s_object("Deployment", "llorch-scheduler")
    assert scheduler["spec"]["replicas"] == 1 and scheduler["spec"]["strategy"]["type"] == "Recreate"
    container = containers(scheduler)["scheduler"]
    args = parsed(expand(container))
    assert args.command == "scheduler" and args.listen == f"0.0.0.0:{ports.scheduler}"
    assert {p["containerPort"] for p in container["ports"]} == {ports.scheduler, ports.scheduler_metrics}
    assert container["readinessProbe"]["grpc"] == {"port": ports.scheduler}
    assert container["livenessProbe"]["grpc"] == {"port": ports.scheduler}
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    # grpc.scheduler's host is the Service the gateway and the pool managers dial (its metrics too).
    service = k8s_object("Service", ports.scheduler_host)
    assert service["spec"]["selector"] == {"app.kubernetes.io/name": "llorch-scheduler"}
    assert {(p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        (ports.scheduler, ports.scheduler),
        (ports.scheduler_metrics, ports.scheduler_metrics),
    }


def test_pool_managers_are_a_daemonset_on_gpu_nodes(cfg: LlorchConfig, ports: Ports) -> None:
    daemonset = k8s_object("DaemonSet", "llorch-poolmgr")
    pod = daemonset["spec"]["template"]["spec"]
    assert pod.get("nodeSelector") or pod.get("affinity")
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["terminationGracePeriodSeconds"] >= POOL_MANAGER_STOP_GRACE_S
    container = containers(daemonset)["pool-manager"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    # The node's name and the Pod's IP from the downward API, handed over as flags.
    fields = {
        e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"] if "fieldRef" in str(e)
    }
    assert fields == {"NODE_NAME": "spec.nodeName", "POD_IP": "status.podIP"}
    raw = container["args"]
    for flag, value in (("--host", "$(NODE_NAME)"), ("--listen", "0.0.0.0"), ("--advertise", "$(POD_IP)")):
        assert raw[raw.index(flag) + 1] == value, flag
    hosts = {pool.host for pool in cfg.pools}
    for node in hosts:  # each node's Pod serves that node's pools
        args = parsed(expand(container, NODE_NAME=node))
        assert pool_manager_serves(cfg, args) == [p.id for p in cfg.pools if p.host == node]
    args = parsed(expand(container, NODE_NAME=next(iter(hosts))))
    registered, metrics = addresses(cfg, args.index, args.advertise)
    assert (registered, metrics) == (f"{POD_IP}:{ports.poolmgr}", f"{POD_IP}:{ports.poolmgr_metrics}")
    assert {p["containerPort"] for p in container["ports"]} == {ports.poolmgr, ports.poolmgr_metrics}
    assert container["startupProbe"]["grpc"] == {"port": ports.poolmgr}
    assert container["livenessProbe"]["grpc"] == {"port": ports.poolmgr}


def test_every_pool_of_the_container_config_names_its_host(cfg: LlorchConfig) -> None:
    """In containers every pool manager runs with --host (compose: gpu-node-1; Kubernetes: its node), so
    a `local` pool would be served by none of them."""
    assert all(pool.host != "local" for pool in cfg.pools)


def test_network_policies_let_each_caller_reach_its_port(ports: Ports) -> None:
    def allowed(source: str, target: str, port: int) -> bool:
        for _, doc in k8s_documents():
            if doc["kind"] != "NetworkPolicy":
                continue
            spec = doc["spec"]
            if spec["podSelector"]["matchLabels"] != {"app.kubernetes.io/name": f"llorch-{target}"}:
                continue
            for rule in spec["ingress"]:
                if {"port": port} in rule["ports"] and any(
                    _selects(f["podSelector"], source) for f in rule["from"]
                ):
                    return True
        return False

    wanted = {
        ("scheduler", "poolmgr", ports.poolmgr),  # Start, Cancel, pool control: at the registered Pod IP
        ("gateway", "poolmgr", ports.poolmgr_metrics),  # the /metrics union
        ("poolmgr", "scheduler", ports.scheduler),  # registration
        ("gateway", "scheduler", ports.scheduler),
        ("gateway", "scheduler", ports.scheduler_metrics),
        *((source, "redis", ports.redis_port) for source in ("scheduler", "poolmgr", "gateway")),
    }
    for source, target, port in wanted:
        assert allowed(source, target, port), (source, target, port)
    for source, target, port in (
        ("gateway", "poolmgr", ports.poolmgr),
        ("poolmgr", "poolmgr", ports.poolmgr),
        ("poolmgr", "scheduler", ports.scheduler_metrics),
    ):
        assert not allowed(source, target, port), (source, target, port)


def _selects(selector: dict[str, Any], app: str) -> bool:
    name = f"llorch-{app}"
    if "matchLabels" in selector:
        return bool(selector["matchLabels"] == {"app.kubernetes.io/name": name})
    [expression] = selector["matchExpressions"]
    return expression["key"] == "app.kubernetes.io/name" and name in expression["values"]


def test_redis_statefulset_keeps_aof_on_a_volume(ports: Ports) -> None:
    redis = k8s_object("StatefulSet", "llorch-redis")
    container = containers(redis)["redis"]
    assert "--appendonly yes" in " ".join(container["command"])
    claim = redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
    assert {"name": claim, "mountPath": "/data"} in container["volumeMounts"]
    service = k8s_object("Service", ports.redis_host)
    assert [p["port"] for p in service["spec"]["ports"]] == [ports.redis_port]


def test_secret_is_a_placeholder_and_every_reference_resolves() -> None:
    secret = k8s_object("Secret", "llorch-secrets")
    assert set(secret["stringData"].values()) == {""}, "the template must not carry a token"
    assert "data" not in secret
    for file, doc in k8s_documents():
        if doc["kind"] not in WORKLOAD_KINDS:
            continue
        for container in containers(doc).values():
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if SECRET_ENV.search(env["name"]):
                    assert ref is not None and "value" not in env, (file, env["name"])
                if ref is not None:
                    assert ref["name"] == "llorch-secrets" and ref["key"] in secret["stringData"], file


def test_kustomize_renders_a_configmap_that_validates(tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    result = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    docs = list(yaml.safe_load_all(result.stdout))
    [configmap] = [d for d in docs if d["kind"] == "ConfigMap"]
    validate_config(yaml.safe_load(configmap["data"]["llorch.yaml"]))
    assert all(d["metadata"].get("namespace", "llorch") == "llorch" for d in docs)
    mounted = {
        v["configMap"]["name"]
        for d in docs
        if d["kind"] in ("Deployment", "DaemonSet")
        for v in d["spec"]["template"]["spec"]["volumes"]
        if "configMap" in v
    }
    assert mounted == {configmap["metadata"]["name"]}  # the hashed name, so a new config rolls the Pods


# ---- the healthcheck the compose file runs ------------------------------------------------------------


def load_healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("llorch_deploy_healthcheck", DEPLOY / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Probe(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/healthz" else 503)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def http_probe() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Probe)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def test_healthcheck_http(http_probe: str) -> None:
    check = load_healthcheck()
    assert check.main(["http", f"{http_probe}/healthz"]) == 0
    assert check.main(["http", f"{http_probe}/readyz"]) == 1
    assert check.main(["http", f"http://127.0.0.1:{free_port()}/healthz"]) == 1
    assert check.main(["tcp", "x"]) == 2


async def test_healthcheck_grpc() -> None:
    """Against the services' own gRPC server helper: SERVING without the internal token."""
    check = load_healthcheck()
    address = f"127.0.0.1:{free_port()}"

    def register(_server: grpc.aio.Server) -> None:
        pass

    async with grpc_server(address, "internal-token", register):
        assert await asyncio.to_thread(check.main, ["grpc", address]) == 0
    assert await asyncio.to_thread(check.main, ["grpc", address]) == 1
