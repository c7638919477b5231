"""`llorch up`: the whole stack on one machine, supervised — embedded Redis (when redis.url is null), the
scheduler, one pool manager per device mask (plus one for CPU pools, see llorch_poolmgr.topology) and the
gateway, each its own process. Only the `host: local` pools get pool managers here; pools of other hosts
are served by `llorch pool-manager --host NAME` there.

A child that dies is restarted with backoff, and `llorch up` gives up (exit 1) when one keeps dying; see
llorch_cli.supervise for the policy. Restarts are logged and counted in
``llorch_service_restarts_total{service}``, served on 127.0.0.1:<grpc.metrics_base_port + 1> (the
scheduler has +0, pool manager n has +10+n); the gateway learns that address from
``LLORCH_SUPERVISOR_METRICS`` and adds it to its /metrics union. Ctrl-C (or SIGTERM) stops the children in
reverse order, with no restarts meanwhile. Every child has its own process group and PR_SET_PDEATHSIG, so
none outlives `llorch up`, the embedded Redis included.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

from prometheus_client import CollectorRegistry, disable_created_metrics

from llorch import gpu
from llorch.config import ConfigError, LlorchConfig, load_config, resolve_config_path
from llorch.config_rules import LOCAL_HOST
from llorch.lifecycle import metrics_endpoint
from llorch.logs import setup_logging
from llorch.redis_auth import PASSWORD_ENV, read_password_file, redis_password
from llorch.rpc import load_internal_token
from llorch_gateway.auth import ensure_token_file
from llorch_poolmgr.executor import DRAIN_GRACE_S, DRAIN_WRITE_S
from llorch_poolmgr.process import STOP_TIMEOUT_S
from llorch_poolmgr.service import FINAL_REPORT_S
from llorch_poolmgr.topology import manager_args, plan_managers

from . import pidfile
from .api import Api, CliError, target_from_config
from .display import LiveBlock
from .drain import PoolRow, drain_all, rows_text
from .embedded_redis import EmbeddedRedis
from .supervise import (
    Child,
    GaveUp,
    RedisChild,
    ServiceChild,
    Supervisor,
    SupervisorMetrics,
)

READY_TIMEOUT_S: Final = 600.0
SUPERVISOR_METRICS_OFFSET: Final = 1  # from grpc.metrics_base_port: scheduler +0, pool managers +10+n
SUPERVISOR_METRICS_ENV: Final = "LLORCH_SUPERVISOR_METRICS"
REDIS_PASSWORD_FILE: Final = "redis.password"
TICK_S: Final = 0.1
STOP_DRAIN_S: Final = 30.0
"""On Ctrl-C or SIGTERM the pools are drained first (SPEC §5.6): running tasks get this long."""
STOP_DRAIN_REQUEST_S: Final = 2.0
POOL_MANAGER_STOP_GRACE_S: Final = DRAIN_GRACE_S + DRAIN_WRITE_S + FINAL_REPORT_S + STOP_TIMEOUT_S + 2.0
"""A pool manager's own shutdown drain, then its engines' SIGTERM with SIGKILL after STOP_TIMEOUT_S
(10 s), all before the supervisor SIGKILLs its group."""

log = logging.getLogger(__name__)


def _token_hint(cfg: LlorchConfig) -> tuple[str, str]:
    """(where the token is, a shell expression that yields it) — never the token itself."""
    if cfg.api.tokens:
        first = cfg.api.tokens[0]
        if first.token_env:
            return f"env var {first.token_env}", f"${first.token_env}"
        return f"file {first.token_file}", f"$(cat {first.token_file})"
    if os.environ.get("LLORCH_API_TOKEN"):
        return "env var LLORCH_API_TOKEN", "$LLORCH_API_TOKEN"
    path = cfg.state_dir / "api.token"
    ensure_token_file(path)
    return f"file {path}", f"$(cat {path})"


def _ready(url: str, shown: list[str]) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=1) as resp:
            return bool(resp.status == 200)
    except urllib.error.HTTPError as exc:
        checks = json.loads(exc.read() or b"{}").get("checks", {})
        line = f"waiting for readiness: {checks}"
        if line not in shown:
            print(line, flush=True)
            shown[:] = [line]
    except (urllib.error.URLError, OSError):
        pass
    return False


@contextlib.contextmanager
def _metrics_server(address: str, registry: CollectorRegistry) -> Iterator[bool]:
    """Serve the supervisor's metrics; a busy port costs the metrics, never the stack."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(metrics_endpoint(address, registry))
            serving = True
        except OSError as exc:
            log.warning(
                "supervisor metrics unavailable",
                extra={"event": "metrics_unavailable", "address": address, "error": str(exc)},
            )
            serving = False
        yield serving


def _banner(cfg: LlorchConfig, url: str, where: str, token_expr: str) -> str:
    model = cfg.pools[0].model
    return (
        f"\nllama-orch is up: {url}\nAPI token: {where}\n\nTry:\n"
        f"  curl -s -H \"Authorization: Bearer {token_expr}\" -H 'Content-Type: application/json' \\\n"
        f'    -d \'{{"model_ref": "{model}", "prompt": "Hello", "max_tokens": 32}}\' {url}/v1/tasks\n'
        f'  curl -N -H "Authorization: Bearer {token_expr}" {url}/v1/tasks/<task_id>/stream\n'
        f'  LLORCH_API_TOKEN={token_expr} llorch submit --url {url} {model} "Hello"\n'
        f"  LLORCH_API_TOKEN={token_expr} llorch status --url {url}\n\n"
        f"Status page: {url}/ (it asks for the API token)\n"
        "Ctrl-C stops everything."
    )


def _setup_logging(cfg: LlorchConfig) -> None:
    setup_logging("up", cfg.telemetry.log_level, cfg.telemetry.log_file)


def _local_config(cfg: LlorchConfig) -> LlorchConfig:
    """`cfg` narrowed to the pools of this machine (`host: local`); the others' pool managers run on
    their own hosts (`llorch pool-manager --host NAME`), so they are only named here."""
    remote: dict[str, list[str]] = {}
    for pool in cfg.pools:
        if pool.host != LOCAL_HOST:
            remote.setdefault(pool.host, []).append(pool.id)
    for host, ids in sorted(remote.items()):
        line = f"pools left to host {host} (its own `llorch pool-manager --host {host}`): {', '.join(ids)}"
        print(line, flush=True)
    return cfg.model_copy(update={"pools": [p for p in cfg.pools if p.host == LOCAL_HOST]})


def _children(cfg: LlorchConfig, path: Path, env: dict[str, str], metrics_address: str | None) -> list[Child]:
    config_arg = ["--config", str(path.resolve())]
    probe = gpu.open_probe(cfg.telemetry, cfg.state_dir)
    plans = plan_managers(_local_config(cfg), probe.devices())
    probe.close()
    children: list[Child] = [ServiceChild("scheduler", ["scheduler", *config_arg], env)]
    for plan in plans:
        print(f"pool manager {plan.index} ({plan.name}): {', '.join(plan.pools)}", flush=True)
        args = [*manager_args(plan), *config_arg]
        children.append(ServiceChild(f"pool-manager-{plan.name}", args, env, POOL_MANAGER_STOP_GRACE_S))
    gateway_env = dict(env)
    if metrics_address is not None:
        gateway_env[SUPERVISOR_METRICS_ENV] = metrics_address
    children.append(ServiceChild("gateway", ["gateway", *config_arg], gateway_env))
    return children


def embedded_redis_password(cfg: LlorchConfig) -> str:
    """The embedded Redis's password: the configured one, else ``<state_dir>/redis.password``
    (generated, mode 0600, on first use)."""
    configured = redis_password(cfg.redis)
    if configured is not None:
        return configured
    path = cfg.state_dir / REDIS_PASSWORD_FILE
    ensure_token_file(path)
    return read_password_file(path)


def up(config: Path | None) -> int:
    try:
        path = resolve_config_path(config)
        cfg = load_config(path)
    except ConfigError as exc:
        print("\n".join(exc.errors), file=sys.stderr)
        return 2
    _setup_logging(cfg)
    disable_created_metrics()  # type: ignore[no-untyped-call]
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    load_internal_token(cfg.state_dir, cfg.grpc.internal_token_file, create=True)
    where, token_expr = _token_hint(cfg)
    signals = 0  # the first stops the stack (after a drain), a second cuts the drain short
    supervisors: list[Supervisor] = []  # the one built below, once it exists

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal signals
        signals += 1
        for supervisor in supervisors:
            supervisor.stopping = True  # no restart from here on, even mid-step

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    env = dict(os.environ)
    redis_server: EmbeddedRedis | None = None
    if cfg.redis.url is None:
        password = embedded_redis_password(cfg)
        redis_server = EmbeddedRedis(cfg.state_dir, password=password)
        redis_server.lock()
        env["LLORCH_REDIS_URL"] = redis_server.url
        env[PASSWORD_ENV] = password  # the children's only source: never on a command line or in a log
    try:
        pid_path = pidfile.claim(cfg.state_dir)
    except pidfile.AlreadyRunning as exc:
        print(f"llorch up: {exc}", file=sys.stderr)
        return 1
    metrics = SupervisorMetrics(CollectorRegistry(auto_describe=True))
    address = f"127.0.0.1:{cfg.grpc.metrics_base_port + SUPERVISOR_METRICS_OFFSET}"
    with _metrics_server(address, metrics.registry) as serving:
        children = _children(cfg, path, env, address if serving else None)
        if redis_server is not None:
            children.insert(0, RedisChild(redis_server))
        supervisor = Supervisor(children, metrics)
        supervisors.append(supervisor)
        try:
            code = _supervise(supervisor, cfg, redis_server, where, token_expr, lambda: signals > 0)
            if code == 0:  # a signal: stop, pools drained first
                _drain_before_stop(cfg, lambda: signals > 1)
            return code
        finally:
            supervisor.stop()
            if redis_server is not None:
                redis_server.stop()
            pidfile.release(pid_path)


def _drain_before_stop(cfg: LlorchConfig, hurry: Callable[[], bool]) -> None:
    """Drain every pool through the gateway so running tasks can finish, for at most STOP_DRAIN_S (a
    second signal cuts it short); without a reachable gateway the stack just stops."""
    print(
        f"draining the pools before stopping (up to {STOP_DRAIN_S:g} s; Ctrl-C again to stop now)", flush=True
    )
    block = LiveBlock()

    def show(rows: list[PoolRow]) -> None:
        block.show(rows_text(rows))

    try:
        outcome = drain_all(Api(target_from_config(cfg), STOP_DRAIN_REQUEST_S), STOP_DRAIN_S, show, hurry)
    except CliError as exc:
        print(f"could not drain the pools ({exc}); stopping the services", flush=True)
        return
    busy = [p.pool_id for p in outcome.unsettled]
    log.info(
        "pools drained before stop",
        extra={"event": "stop_drained", "busy": busy, "refused": sorted(outcome.refused)},
    )
    print("stopping the services" + (f" ({', '.join(busy)} still busy)" if busy else ""), flush=True)


def _supervise(
    supervisor: Supervisor,
    cfg: LlorchConfig,
    redis_server: EmbeddedRedis | None,
    where: str,
    token_expr: str,
    stopping: Callable[[], bool],
) -> int:
    url = f"http://{cfg.api.bind}"
    try:
        supervisor.start()
        if redis_server is not None:
            print(
                f"embedded Redis on 127.0.0.1:{redis_server.port} (AOF under {redis_server.dir})",
                flush=True,
            )
        deadline = time.monotonic() + READY_TIMEOUT_S
        announced, shown, next_probe = False, [""], 0.0
        while not stopping():
            supervisor.step()
            now = time.monotonic()
            if not announced and now >= next_probe:
                if _ready(url, shown):
                    announced = True
                    print(_banner(cfg, url, where, token_expr), flush=True)
                elif now > deadline:
                    print("the stack did not become ready; see the logs above", file=sys.stderr)
                    return 1
                next_probe = time.monotonic() + 0.5
            time.sleep(TICK_S)
        return 0
    except GaveUp as exc:
        print(f"llorch up: {exc}", file=sys.stderr, flush=True)
        return 1
