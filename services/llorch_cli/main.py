"""`llorch`: start the services (each its own process) or the whole stack, watch and use a running stack
(`status`, `submit`, `tasks`), operate it (`down`, `models`, `pools`), and check configuration."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import disable_created_metrics
from pydantic import ValidationError

from llorch import config_rules as rules
from llorch.config import ConfigError, LlorchConfig, load_config
from llorch.logs import setup_logging

from . import config_cmd, down, gpus_cmd, models_cmd, ops, pools_cmd, status_cmd, submit_cmd, tasks_cmd

Serve = Callable[[LlorchConfig, asyncio.Event], Coroutine[Any, Any, None]]


def _load(path: str | None) -> LlorchConfig:
    try:
        return load_config(path)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        raise SystemExit(2) from None


def run_service(name: str, cfg: LlorchConfig, serve: Serve) -> None:
    """Composition-root plumbing shared by the services: logging, uvloop, signals → stop event."""
    from llorch.policy import PolicyLoadError  # here: the client commands need not import aiohttp

    setup_logging(name, cfg.telemetry.log_level, cfg.telemetry.log_file)
    disable_created_metrics()  # type: ignore[no-untyped-call]

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(cfg, stop)

    try:
        try:
            import uvloop
        except ImportError:
            asyncio.run(main())
        else:
            uvloop.run(main())
    except PolicyLoadError as exc:  # a configured policy plugin that cannot load: a config error
        print(f"llorch {name}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _checked(check: Callable[[str], str]) -> Callable[[str], str]:
    """An argparse type from a config rule, so a bad value exits 2 with the rule's own message."""

    def parse(value: str) -> str:
        try:
            return check(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _pool_manager_options(cmd: argparse.ArgumentParser) -> None:
    """Where a pool manager registers, binds and is dialled, and which host's pools it serves."""
    cmd.add_argument(
        "--scheduler",
        type=_checked(rules.check_host_port),
        default=None,
        metavar="HOST:PORT",
        help="where to register: overrides grpc.scheduler for this process",
    )
    cmd.add_argument(
        "--listen",
        type=_checked(rules.check_bind_host),
        default=None,
        metavar="HOST",
        help="the host the gRPC and metrics servers bind (default: grpc.scheduler's host)",
    )
    cmd.add_argument(
        "--advertise",
        type=_checked(rules.check_bind_host),
        default=None,
        metavar="HOST",
        help="the host the scheduler dials (default: the --listen host; required with 0.0.0.0 or ::)",
    )
    cmd.add_argument(
        "--host",
        type=_checked(rules.check_pool_host),
        default=rules.LOCAL_HOST,
        metavar="NAME",
        help="serve the pools whose `host` is NAME (default: local)",
    )
    for flag, key, what in (
        ("--tls-ca", "ca_file", "PEM roots that signed the scheduler's certificate (and mTLS clients')"),
        ("--tls-cert", "cert_file", "PEM certificate chain this pool manager presents"),
        ("--tls-key", "key_file", "the private key of --tls-cert"),
    ):
        text = f"{what}: overrides grpc.tls.{key}"
        cmd.add_argument(flag, type=Path, default=None, metavar="FILE", help=text)


def _with_tls_flags(cfg: LlorchConfig, args: argparse.Namespace) -> LlorchConfig:
    """``cfg`` with ``--tls-ca/--tls-cert/--tls-key`` applied to grpc.tls; exit 2 when incomplete."""
    from llorch.grpc_tls import with_overrides

    try:
        tls = with_overrides(cfg.grpc.tls, args.tls_ca, args.tls_cert, args.tls_key)
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"])
            path = f"grpc.tls.{where}" if where else "grpc.tls"
            print(f"llorch pool-manager: {path}: {error['msg']}", file=sys.stderr)
        raise SystemExit(2) from None
    return cfg.model_copy(update={"grpc": cfg.grpc.model_copy(update={"tls": tls})})


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llorch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("up", "start the whole stack (embedded Redis when redis.url is null)"),
        ("gateway", "run the HTTP gateway"),
        ("scheduler", "run the queue-scheduler"),
        ("pool-manager", "run a pool manager"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument(
            "--config",
            default=None,
            help="YAML config (default $LLORCH_CONFIG or ~/.config/llorch/config.yaml)",
        )
        if name == "scheduler":
            cmd.add_argument(
                "--listen",
                type=_checked(rules.check_host_port),
                default=None,
                metavar="HOST:PORT",
                help="the address gRPC binds, e.g. 0.0.0.0:50051 in a container; metrics bind its host "
                "(default: grpc.scheduler, which stays the address the others dial)",
            )
        if name == "pool-manager":
            _pool_manager_options(cmd)
            cmd.add_argument("--index", type=int, default=0, help="n: gRPC on base_port+n, metrics on 9111+n")
            cmd.add_argument("--pools", default=None, help="comma-separated pool ids (default: --host's)")
            cmd.add_argument(
                "--assign",
                action="append",
                default=[],
                metavar="POOL=GPU",
                help="the GPU chosen for a `devices: auto` pool (-1: none fits); repeatable",
            )
    gpus_cmd.add_parser(sub)
    sub.add_parser("mock-engine", help="run the mock engine (llama-server protocol)", add_help=False)
    config = sub.add_parser("config", help="validate a config or print its JSON Schema")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    validate = config_sub.add_parser("validate", help="validate FILE; exit 2 on errors")
    validate.add_argument("file", nargs="?", default=None)
    config_sub.add_parser("schema", help="print the JSON Schema")
    status_cmd.add_parser(sub)
    submit_cmd.add_parser(sub)
    tasks_cmd.add_parser(sub)
    down.add_parser(sub)
    models_cmd.add_parser(sub)
    pools_cmd.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["mock-engine"]:
        from llorch_mockengine.__main__ import main as mock_main

        mock_main(args_list[1:])
        return
    args = _parser().parse_args(args_list)
    if getattr(args, "run", None) is not None:  # the client commands: status, submit, tasks, down, ...
        raise SystemExit(ops.run(args.prog, args.run, args))
    if args.command == "config":
        code = config_cmd.validate(args.file) if args.config_command == "validate" else config_cmd.schema()
        raise SystemExit(code)
    if args.command == "up":
        from .up import up

        raise SystemExit(up(Path(args.config) if args.config else None))
    cfg = _load(args.config)
    if args.command == "gateway":
        from llorch_gateway.__main__ import serve as gateway

        run_service("gateway", cfg, gateway)
    elif args.command == "scheduler":
        from llorch_scheduler.__main__ import serve as scheduler

        async def serve_scheduler(c: LlorchConfig, stop: asyncio.Event) -> None:
            await scheduler(c, stop, args.listen)

        run_service("scheduler", cfg, serve_scheduler)
    else:
        from llorch_poolmgr.__main__ import ServeOptionError, advertised_host, select_pools
        from llorch_poolmgr.__main__ import serve as pool_manager

        pools = args.pools.split(",") if args.pools else None
        assign = {pool: int(gpu) for pool, _, gpu in (a.partition("=") for a in args.assign)}
        if args.scheduler is not None:
            cfg = cfg.model_copy(update={"grpc": cfg.grpc.model_copy(update={"scheduler": args.scheduler})})
        cfg = _with_tls_flags(cfg, args)
        try:  # refused here, before logging starts, so the reason is the one line on stderr
            select_pools(cfg, args.host, pools)
            advertised_host(args.listen, args.advertise)
        except ServeOptionError as exc:
            print(f"llorch pool-manager: {exc}", file=sys.stderr)
            raise SystemExit(2) from None

        async def serve_pm(c: LlorchConfig, stop: asyncio.Event) -> None:
            where = {"host": args.host, "listen": args.listen, "advertise": args.advertise}
            await pool_manager(c, stop, args.index, pools, assign, **where)

        run_service("pool-manager", cfg, serve_pm)


if __name__ == "__main__":
    main()
