"""Every route of the router, against a live gateway: each /v1 route refuses a missing token with 401
UNAUTHENTICATED (and ``WWW-Authenticate``) and a wrong one with 403 FORBIDDEN (SPEC §2.5), in the route's
error dialect; the routes open without a token are exactly the documented ones."""

from __future__ import annotations

import re
from typing import Any

import aiohttp

from llorch_gateway.dialects import Dialect, dialect_of
from tests.integration.test_openapi import router_app, router_routes
from tests.support.stack import mock_pool

OPEN = {("GET", "/"), ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics"), ("GET", "/openapi.json")}
"""SPEC §2.5: the probes and /metrics; plus the status page shell and the API document (no data)."""
SAMPLE = {"model_id": "mock-tiny", "artifact_id": "sha256:" + "0" * 64}


def concrete(path: str) -> str:
    """The route's path with each parameter filled in with a valid value."""
    return re.sub(r"\{(\w+)\}", lambda m: SAMPLE.get(m.group(1), "x1"), path)


def code_of(body: dict[str, Any], path: str) -> str:
    if dialect_of(path) == Dialect.NATIVE:
        return str(body["code"])
    return str(body["error"]["code"])


async def test_every_v1_route_refuses_missing_and_wrong_tokens(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    routes = router_routes(router_app())
    protected = sorted((m, p) for m, p in routes if p.startswith("/v1/"))
    assert len(protected) > 30
    stack = stack_factory(pools=[mock_pool()])
    await stack.start()
    wrong = stack.token[::-1] + "x"
    cases = [
        ({}, 401, "UNAUTHENTICATED"),
        ({"Authorization": "Bearer "}, 401, "UNAUTHENTICATED"),
        ({"Authorization": f"Bearer {wrong}"}, 403, "FORBIDDEN"),
        ({"X-API-Key": wrong}, 403, "FORBIDDEN"),
        # Authorization wins over a valid X-API-Key.
        ({"Authorization": f"Bearer {wrong}", "X-API-Key": stack.token}, 403, "FORBIDDEN"),
    ]
    refused = 0
    for method, path in protected:
        for headers, status, code in cases:
            async with http.request(method, stack.url + concrete(path), headers=headers, json={}) as r:
                body = await r.json()
                assert (r.status, code_of(body, path)) == (status, code), (method, path, headers.keys(), body)
                assert r.headers.get("X-Correlation-Id")
                if status == 401:
                    assert r.headers["WWW-Authenticate"] == 'Bearer realm="llorch"'
                refused += 1
    assert refused == len(protected) * len(cases)


async def test_open_routes_are_exactly_the_documented_ones(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    routes = router_routes(router_app())
    assert {route for route in routes if not route[1].startswith("/v1/")} == OPEN
    stack = stack_factory(pools=[mock_pool()])
    await stack.start()
    for method, path in sorted(OPEN):
        async with http.request(method, stack.url + path) as r:
            assert r.status == 200, (path, r.status, await r.text())
