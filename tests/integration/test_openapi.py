"""The OpenAPI document: committed copy = generator output; document and router agree route by route;
the live gateway serves it without a token."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from llorch.config import LlorchConfig
from llorch.throttle import BackoffClamp
from llorch_gateway.app import Deps, build_app
from llorch_gateway.auth import ApiToken, Authenticator
from llorch_gateway.metrics import GatewayMetrics
from llorch_gateway.openapi import build_document, render_document
from tests.support.stack import mock_pool

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "contracts" / "openapi.json"
METHODS = ("get", "post", "put", "patch", "delete")


def router_app() -> web.Application:
    """The gateway's real ``build_app``; the collaborators the route table never touches are inert."""
    cfg = LlorchConfig.model_validate({"version": 1, "pools": [mock_pool()]})
    auth = Authenticator([ApiToken("t", b"x")], False, BackoffClamp(250, 60000))
    inert = cast(Any, None)
    deps = Deps(cfg, inert, inert, auth, GatewayMetrics(CollectorRegistry()), inert, inert)
    return build_app(deps)


def router_routes(app: web.Application) -> set[tuple[str, str]]:
    """(METHOD, path) of every route; the HEAD aiohttp adds beside each GET is implied by it."""
    routes = set()
    for route in app.router.routes():
        info = route.resource
        assert info is not None
        routes.add((route.method, info.canonical))
    return {(m, p) for m, p in routes if not (m == "HEAD" and ("GET", p) in routes)}


def document_routes(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(m.upper(), path) for path, ops in doc["paths"].items() for m in ops if m in METHODS}


def test_committed_document_is_the_generators_output() -> None:
    assert COMMITTED.read_text(encoding="utf-8") == render_document(), (
        "contracts/openapi.json is stale: "
        "run .venv/bin/python -m llorch_gateway.openapi > contracts/openapi.json"
    )


def test_document_is_openapi_31_and_every_ref_resolves() -> None:
    doc = build_document()
    assert doc["openapi"] == "3.1.0"
    text = json.dumps(doc)
    schemas = cast(dict[str, Any], doc["components"])["schemas"]
    refs = {part.split('"')[0] for part in text.split('"$ref": "#/components/schemas/')[1:]}
    assert refs and refs <= set(schemas), refs - set(schemas)


def test_document_and_router_agree_route_by_route() -> None:
    in_router = router_routes(router_app())
    in_doc = document_routes(build_document())
    assert len(in_router) > 30  # the enumeration found the real table, not an empty one
    assert sorted(in_router - in_doc) == [], "routes without a document entry"
    assert sorted(in_doc - in_router) == [], "documented routes the router lacks"


def test_every_path_parameter_is_declared() -> None:
    for path, ops in build_document()["paths"].items():  # type: ignore[attr-defined]
        names = {part[1:-1] for part in path.split("/") if part.startswith("{")}
        for op in ops.values():
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == names, (path, declared)


async def test_gateway_serves_the_document_without_a_token(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack = stack_factory(pools=[mock_pool()])
    await stack.start()
    async with http.get(f"{stack.url}/openapi.json") as response:
        assert response.status == 200, await response.text()
        assert response.content_type == "application/json"
        assert await response.text() == render_document()
