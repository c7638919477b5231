"""``llorch models list|add|verify|state``: the model catalog (SPEC §2.3, §5.7) through the HTTP API."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Final

from . import ops
from .api import Api, CliError, JsonObject, quoted
from .display import table

STATES: Final = ("Draft", "Active", "Canary", "Deprecated", "Retired")
DIGEST_SHOWN: Final = 19  # "sha256:" and 12 hex


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    models = sub.add_parser("models", help="list, add, verify and change the state of catalog models")
    verbs = models.add_subparsers(dest="models_command", required=True)

    listing = verbs.add_parser("list", help="the catalog, as a table")
    listing.add_argument("--state", choices=STATES, default=None)
    listing.add_argument("--tag", default=None)
    listing.set_defaults(run=list_models, prog="llorch models list")

    add = verbs.add_parser("add", help="create a catalog entry (Draft unless --state)")
    add.add_argument("id")
    add.add_argument("path", help="the model file or directory (made absolute)")
    add.add_argument("--digest", default=None, help="sha256:<hex>; pinned at the first verify when absent")
    add.add_argument("--tag", action="append", default=[], dest="tags", help="repeatable")
    add.add_argument("--source-url", default=None)
    add.add_argument("--signature", action="append", default=[], metavar="SIGNER:ALGO:SIG", help="repeatable")
    add.add_argument("--sbom-uri", default=None)
    add.add_argument("--sbom-digest", default=None)
    add.add_argument("--trust-mode", choices=("permissive", "strict"), default=None)
    add.add_argument("--state", choices=STATES, default=None)
    add.set_defaults(run=add_model, prog="llorch models add")

    verify = verbs.add_parser("verify", help="verify an entry now (digest, signatures, SBOM)")
    verify.add_argument("id")
    verify.set_defaults(run=verify_model, prog="llorch models verify")

    state = verbs.add_parser("state", help="move an entry to a lifecycle state")
    state.add_argument("id")
    state.add_argument("state", choices=STATES)
    state.add_argument(
        "--deadline-s", type=ops.seconds, default=None, help="for Retired: how long its pools may drain"
    )
    state.set_defaults(run=set_state, prog="llorch models state")

    for parser in (listing, add, verify, state):
        ops.add_target_options(parser)


def _text(value: object, empty: str = "-") -> str:
    if value is None or value in ("", []):
        return empty
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def _verification(entry: JsonObject) -> JsonObject:
    found = entry.get("verification")
    return found if isinstance(found, dict) else {}


def list_models(args: argparse.Namespace) -> int:
    query = {k: v for k, v in (("state", args.state), ("tag", args.tag)) if v}
    api = ops.api_of(args)
    items = api.objects("/v1/catalog/models", key="items", query=query or None)
    rows = [
        [
            _text(e.get("id")),
            _text(e.get("state")),
            "yes" if e.get("trusted") is True else "no",
            _text(_verification(e).get("status")),
            _text(e.get("digest"))[:DIGEST_SHOWN],
            _text(e.get("tags")),
            _text(e.get("path")),
        ]
        for e in items
    ]
    print(table(["ID", "STATE", "TRUSTED", "VERIFIED", "DIGEST", "TAGS", "PATH"], rows))
    return 0


def _signature(text: str) -> JsonObject:
    signer, _, rest = text.partition(":")
    algo, _, sig = rest.partition(":")
    if not (signer and algo and sig):
        raise CliError("INVALID_ARGS", f"--signature {text!r}: expected SIGNER:ALGO:SIG")
    return {"signer": signer, "algo": algo, "sig": sig}


def _create_body(args: argparse.Namespace) -> JsonObject:
    body: JsonObject = {"id": args.id, "path": str(Path(args.path).expanduser().absolute())}
    if (args.sbom_uri is None) != (args.sbom_digest is None):
        raise CliError("INVALID_ARGS", "--sbom-uri and --sbom-digest go together")
    optional: JsonObject = {
        "digest": args.digest,
        "tags": args.tags or None,
        "source_url": args.source_url,
        "signatures": [_signature(s) for s in args.signature] or None,
        "sbom": {"uri": args.sbom_uri, "digest": args.sbom_digest} if args.sbom_uri else None,
        "trust_policy": {"mode": args.trust_mode} if args.trust_mode else None,
        "state": args.state,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    return body


def add_model(args: argparse.Namespace) -> int:
    body = _create_body(args)
    entry = ops.api_of(args).obj("POST", "/v1/catalog/models", body)
    verified = _text(_verification(entry).get("status"))
    print(f"{entry.get('id')}: {entry.get('state')}, verification {verified}, path {entry.get('path')}")
    return 0


def verify_model(args: argparse.Namespace) -> int:
    api: Api = ops.api_of(args, timeout_s=600.0)  # hashing a large file takes a while
    entry = api.obj("POST", f"/v1/catalog/models/{quoted(args.id)}/verify", query={"wait": "true"})
    verification = _verification(entry)
    status = _text(verification.get("status"))
    print(
        f"{entry.get('id')}: {status}, trusted {'yes' if entry.get('trusted') is True else 'no'}, "
        f"digest {_text(entry.get('digest'))}"
    )
    for kind in ("warnings", "errors"):
        found = verification.get(kind)
        for line in found if isinstance(found, list) else []:
            print(f"  {kind[:-1]}: {line}")
    return 0 if status == "pass" else 1


def set_state(args: argparse.Namespace) -> int:
    body: JsonObject = {"state": args.state}
    if args.deadline_s is not None:
        body["deadline_ms"] = int(args.deadline_s * 1000)
    answer = ops.api_of(args).obj("POST", f"/v1/catalog/models/{quoted(args.id)}/state", body)
    print(f"{answer.get('id')}: {answer.get('previous_state')} -> {answer.get('state')}")
    return 0
