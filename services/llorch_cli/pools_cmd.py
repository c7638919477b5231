"""``llorch pools list|drain|resume|reload``: pool operations (SPEC §5.6) through the HTTP API."""

from __future__ import annotations

import argparse
import time
from typing import Final

from . import ops
from .api import JsonObject, quoted
from .display import LiveBlock, spin, table
from .drain import CUT_MARGIN_S, PoolRow, follow, rows_text

DEFAULT_DEADLINE_S: Final = 30.0
RELOAD_TIMEOUT_S: Final = 600.0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    pools = sub.add_parser("pools", help="list, drain, resume and reload pools")
    verbs = pools.add_subparsers(dest="pools_command", required=True)

    listing = verbs.add_parser("list", help="every pool's health, as a table")
    listing.set_defaults(run=list_pools, prog="llorch pools list")

    drain = verbs.add_parser("drain", help="stop dispatch to a pool; running tasks finish until the deadline")
    drain.add_argument("pool_id")
    drain.add_argument("--deadline-s", type=ops.seconds, default=DEFAULT_DEADLINE_S)
    drain.add_argument("--no-wait", action="store_true", help="do not follow the drain to its end")
    drain.set_defaults(run=drain_pool, prog="llorch pools drain")

    resume = verbs.add_parser("resume", help="undo a drain, start a stopped pool or close an open circuit")
    resume.add_argument("pool_id")
    resume.set_defaults(run=resume_pool, prog="llorch pools resume")

    reload = verbs.add_parser("reload", help="swap a pool to another catalog model")
    reload.add_argument("pool_id")
    reload.add_argument("model_ref", help="the catalog id of the new model")
    reload.add_argument("--no-wait", action="store_true", help="return once the reload is accepted")
    reload.add_argument(
        "--timeout-s", type=ops.seconds, default=RELOAD_TIMEOUT_S, help="how long to wait for it"
    )
    reload.set_defaults(run=reload_pool, prog="llorch pools reload")

    for parser in (listing, drain, resume, reload):
        ops.add_target_options(parser)


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0


def _row(health: JsonObject) -> list[str]:
    listed = health.get("replicas")
    replicas = [r for r in listed if isinstance(r, dict)] if isinstance(listed, list) else []
    ready = sum(1 for r in replicas if r.get("state") == "Ready")
    metrics = health.get("metrics")
    metrics = metrics if isinstance(metrics, dict) else {}
    error = health.get("last_error")
    return [
        str(health.get("pool_id", "?")),
        str(health.get("state", "?")),
        str(health.get("model_ref") or "-"),
        f"{ready}/{len(replicas)}",
        str(_int(metrics.get("tasks_running"))),
        f"{_int(metrics.get('slots_free'))}/{_int(metrics.get('slots_total'))}",
        f"{error.get('code')}: {error.get('message')}" if isinstance(error, dict) else "-",
    ]


def list_pools(args: argparse.Namespace) -> int:
    pools = ops.api_of(args).objects("/v1/pools")
    headers = ["POOL", "STATE", "MODEL", "REPLICAS", "RUNNING", "SLOTS FREE", "LAST ERROR"]
    print(table(headers, [_row(h) for h in pools]))
    return 0


def drain_pool(args: argparse.Namespace) -> int:
    api = ops.api_of(args)
    body: JsonObject = {"deadline_ms": int(args.deadline_s * 1000)}
    api.call("POST", f"/v1/pools/{quoted(args.pool_id)}/drain", body)
    print(f"{args.pool_id}: draining (deadline {args.deadline_s:g} s)", flush=True)
    if args.no_wait:
        return 0
    block = LiveBlock()
    started = time.monotonic()

    def show(rows: list[PoolRow]) -> None:
        block.show(rows_text(rows))

    rows = follow(api, [args.pool_id], args.deadline_s + CUT_MARGIN_S, show)
    pool = rows[0]
    if not pool.settled:
        waited = time.monotonic() - started
        print(f"{pool.pool_id}: still {pool.state} with {pool.running} running after {waited:.0f} s")
        return 1
    print(f"{pool.pool_id}: {pool.state}, nothing running")
    return 0


def resume_pool(args: argparse.Namespace) -> int:
    answer = ops.api_of(args).obj("POST", f"/v1/pools/{quoted(args.pool_id)}/resume")
    print(f"{answer.get('pool_id', args.pool_id)}: resume accepted (state {answer.get('state', '?')})")
    return 0


def reload_pool(args: argparse.Namespace) -> int:
    api = ops.api_of(args, timeout_s=args.timeout_s)
    path = f"/v1/pools/{quoted(args.pool_id)}/reload"
    body: JsonObject = {"new_model_ref": args.model_ref}
    if args.no_wait:
        answer = api.obj("POST", path, body)
        print(
            f"{args.pool_id}: {answer.get('state', 'reloading')} (reload id {answer.get('reload_id', '?')})"
        )
        return 0
    label = f"reloading {args.pool_id} to {args.model_ref}"
    answer = spin(label, lambda: api.obj("POST", path, body, query={"wait": "true"}))
    print(
        f"{answer.get('pool_id', args.pool_id)}: {answer.get('state', '?')} on {answer.get('model_ref')} "
        f"(digest {answer.get('model_digest') or '-'}, engine {answer.get('engine_version') or '-'})"
    )
    return 0
