"""`llorch up`: the whole stack on one machine — embedded Redis (when redis.url is null), the
scheduler, one pool manager per device mask (plus one for CPU pools, see
llorch_poolmgr.topology) and the gateway, each its own process. Ctrl-C (or SIGTERM) stops them
in reverse order; every child also has PR_SET_PDEATHSIG, so none outlives `llorch up`.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from llorch import gpu
from llorch.config import ConfigError, LlorchConfig, load_config, resolve_config_path
from llorch.rpc import load_internal_token
from llorch_gateway.auth import ensure_token_file
from llorch_poolmgr.topology import manager_args, plan_managers

from .embedded_redis import EmbeddedRedis

READY_TIMEOUT_S = 600.0


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)


def _spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "llorch_cli.main", *args]
    return subprocess.Popen(argv, env=env, preexec_fn=_die_with_parent)  # noqa: PLW1509 - prctl only


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


def _wait_ready(url: str, children: list[subprocess.Popen[bytes]]) -> bool:
    deadline = time.monotonic() + READY_TIMEOUT_S
    shown = ""
    while time.monotonic() < deadline:
        if any(child.poll() is not None for child in children):
            return False
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as resp:
                if resp.status == 200:
                    return True
        except urllib.error.HTTPError as exc:
            checks = json.loads(exc.read() or b"{}").get("checks", {})
            line = f"waiting for readiness: {checks}"
            if line != shown:
                print(line, flush=True)
                shown = line
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    return False


def _stop(children: list[subprocess.Popen[bytes]]) -> None:
    for child in reversed(children):
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for child in reversed(children):
        try:
            child.wait(15)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def up(config: Path | None) -> int:
    try:
        path = resolve_config_path(config)
        cfg = load_config(path)
    except ConfigError as exc:
        print("\n".join(exc.errors), file=sys.stderr)
        return 2
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    load_internal_token(cfg.state_dir, cfg.grpc.internal_token_file, create=True)
    where, token_expr = _token_hint(cfg)
    env = dict(os.environ)
    redis_server: EmbeddedRedis | None = None
    if cfg.redis.url is None:
        redis_server = EmbeddedRedis(cfg.state_dir)
        redis_server.start()
        env["LLORCH_REDIS_URL"] = redis_server.url
        print(f"embedded Redis on 127.0.0.1:{redis_server.port} (AOF under {redis_server.dir})", flush=True)
    config_arg = ["--config", str(path.resolve())]
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    probe = gpu.open_probe(cfg.telemetry, cfg.state_dir)
    plans = plan_managers(cfg, probe.devices())
    probe.close()
    children = [_spawn(["scheduler", *config_arg], env)]
    for plan in plans:
        args = [*manager_args(plan), *config_arg]
        print(f"pool manager {plan.index} ({plan.name}): {', '.join(plan.pools)}", flush=True)
        children.append(_spawn(args, env))
    children.append(_spawn(["gateway", *config_arg], env))
    url = f"http://{cfg.api.bind}"
    try:
        if not _wait_ready(url, children):
            print("the stack did not become ready; see the logs above", file=sys.stderr)
            return 1
        model = cfg.pools[0].model
        print(
            f"\nllama-orch is up: {url}\nAPI token: {where}\n\nTry:\n"
            f"  curl -s -H \"Authorization: Bearer {token_expr}\" -H 'Content-Type: application/json' \\\n"
            f'    -d \'{{"model_ref": "{model}", "prompt": "Hello", "max_tokens": 32}}\' {url}/v1/tasks\n'
            f'  curl -N -H "Authorization: Bearer {token_expr}" {url}/v1/tasks/<task_id>/stream\n\n'
            "Ctrl-C stops everything.",
            flush=True,
        )
        while not stopping and all(child.poll() is None for child in children):
            time.sleep(0.2)
        return 0 if stopping else 1
    finally:
        _stop(children)
        if redis_server is not None:
            redis_server.stop()
