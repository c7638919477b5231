"""The OpenAPI 3.1 document of the gateway's HTTP API, built from the request models the handlers use.

``python -m llorch_gateway.openapi > contracts/openapi.json`` writes the committed copy; a test checks
the two are equal and that the document and :func:`~llorch_gateway.app.build_app`'s router agree route
by route. :func:`add_routes` serves it at ``GET /openapi.json`` (open, like the probes: it holds no
secret and a client needs it before it has a token).

Request bodies come from the pydantic models (``model_json_schema``), so the document cannot drift from
what the handlers accept. Response bodies are described as far as SPEC §2 fixes them; error bodies
are the dialect of the route (:mod:`.dialects`): the native envelope, OpenAI's or Anthropic's.
"""

from __future__ import annotations

import json
import sys
from typing import Final

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from llorch.errors import Code
from llorch.ids import ID_PATTERN
from llorch_scheduler.catalog import CatalogCreate
from llorch_scheduler.inventory import API_VERSION

from .anthropic_api import CountTokensRequest, MessagesRequest
from .catalog_api import StateRequest
from .dialects import Dialect, dialect_of
from .models import DrainRequest, ReloadRequest, TaskRequest
from .openai_api import ChatRequest, CompletionRequest, EmbeddingRequest
from .responses_api import ResponsesRequest
from .status_api import TASKS_LIMIT_MAX

Schema = dict[str, object]

_MODELS: Final[tuple[type[BaseModel], ...]] = (
    TaskRequest,
    DrainRequest,
    ReloadRequest,
    StateRequest,
    CatalogCreate,
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    MessagesRequest,
    CountTokensRequest,
    ResponsesRequest,
)
JSON: Final = "application/json"
SSE: Final = "text/event-stream"
MODEL_ID: Final = r"^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}$"
OPEN_ROUTES: Final = frozenset({("GET", "/"), ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics")})
"""Routes that need no token (``/openapi.json`` is added by :func:`add_routes`)."""


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(required: tuple[str, ...] = (), **props: Schema) -> Schema:
    return {"type": "object", "required": list(required), "properties": props}


_STR: Final[Schema] = {"type": "string"}
_INT: Final[Schema] = {"type": "integer"}
_BOOL: Final[Schema] = {"type": "boolean"}
_ANY_OBJ: Final[Schema] = {"type": "object"}
_NULL_STR: Final[Schema] = {"type": ["string", "null"]}


_RESIDENCY: Final[Schema] = {"enum": ["always", "on-demand"]}
_COUNT: Final[Schema] = {"type": "integer", "minimum": 0}
_NULL_MS: Final[Schema] = {"type": ["integer", "null"], "minimum": 1}


def _response_schemas() -> dict[str, Schema]:
    codes = [code.value for code in Code]
    return {
        "Error": {
            **_obj(("code", "message", "retriable"), code={"enum": codes}, message=_STR, retriable=_BOOL),
            "description": "The native error envelope (SPEC §2.1); further fields by code.",
        },
        "OpenAIError": _obj(
            ("error",),
            error=_obj(("message", "type", "code"), message=_STR, type=_STR, code=_STR, param=_NULL_STR),
        ),
        "AnthropicError": _obj(
            ("type", "error"),
            type={"const": "error"},
            error=_obj(("type", "message"), type=_STR, message=_STR),
        ),
        "AdmissionResponse": _obj(
            (
                "task_id",
                "session_id",
                "queue_position",
                "predicted_start_ms",
                "backoff_ms",
                "on_time_probability",
                "stream_url",
            ),
            task_id=_STR,
            session_id=_NULL_STR,
            queue_position=_INT,
            predicted_start_ms=_INT,
            backoff_ms=_INT,
            on_time_probability={"type": "number"},
            stream_url=_STR,
        ),
        "TaskStatus": _obj(
            ("task_id", "state", "priority", "model_ref", "tokens_out"),
            task_id=_STR,
            session_id=_NULL_STR,
            state=_STR,
            priority=_STR,
            model_ref=_STR,
            tokens_out=_INT,
            error={"type": ["object", "null"]},
        ),
        "SessionInfo": _obj(("session_id", "turns", "model_ref"), session_id=_STR, turns=_INT),
        "PoolHealth": _obj(("pool_id", "state", "engine"), pool_id=_STR, state=_STR, engine=_STR),
        "ReplicaSet": _obj(
            ("id", "engine"),
            id=_STR,
            engine=_STR,
            residency=_RESIDENCY,
            status={
                "enum": ["loaded", "loading", "unloaded", None],
                "description": "Whether its model is in memory; null from a scheduler that does not say.",
            },
        ),
        "OpenAIModel": _obj(
            ("id", "object", "created", "owned_by", "status", "residency", "context_length", "replica_set"),
            id=_STR,
            object={"const": "model"},
            created=_INT,
            owned_by=_STR,
            status={
                "enum": ["ready", "loading", "unloaded", "unavailable"],
                "description": "unloaded: an on-demand model not in memory now; a request loads it.",
            },
            residency=_RESIDENCY,
            context_length=_INT,
            replica_set=_STR,
        ),
        **_ledger_schemas(),
        "Capabilities": _obj(("api_version", "engines"), api_version=_STR, engines={"type": "array"}),
        "CatalogModel": _obj(("id", "state"), id=_STR, state=_STR, digest=_STR, path=_STR),
        "Readiness": _obj(("status", "checks"), status={"enum": ["ready", "not_ready"]}, checks=_ANY_OBJ),
    }


def _ledger_schemas() -> dict[str, Schema]:
    """``GET /v1/gpus`` (issue 13): the scheduler's VRAM ledger."""
    resident_fields = (
        "pool_id",
        "model",
        "state",
        "idle_since_ms",
        "pinned",
        "residency",
        "used_bytes",
        "need_bytes",
        "running",
        "loaded_at_ms",
    )
    device_fields = (
        "device",
        "name",
        "total_bytes",
        "used_bytes",
        "reserved_bytes",
        "free_bytes",
        "residents",
    )
    return {
        "GpuResident": {
            **_obj(
                resident_fields,
                pool_id=_STR,
                model=_STR,
                state={
                    "enum": [
                        "unloaded",
                        "loading",
                        "ready",
                        "busy",
                        "idle",
                        "draining",
                        "unloading",
                        "failed",
                    ],
                    "description": "busy: running tasks; idle: loaded, none running; draining: finishing its "
                    "tasks; failed: not serving (its pool failed, or its manager is away).",
                },
                idle_since_ms={
                    **_NULL_MS,
                    "description": "Epoch ms of its last task's end; null when busy or unloaded.",
                },
                pinned=_BOOL,
                residency=_RESIDENCY,
                used_bytes={
                    **_COUNT,
                    "description": "Measured once loaded (else the estimate); 0 when unloaded.",
                },
                need_bytes={**_COUNT, "description": "The preload estimate on this device."},
                running=_COUNT,
                loaded_at_ms={**_NULL_MS, "description": "Epoch ms it became ready; null when not loaded."},
            ),
            "description": "A pool on a device, loaded or not, as the ledger counts it.",
        },
        "GpuLedger": {
            **_obj(
                device_fields,
                device={**_STR, "description": '"0", "1", ... or "cpu"'},
                name=_STR,
                total_bytes=_COUNT,
                used_bytes={**_COUNT, "description": "What the loaded residents use."},
                reserved_bytes={**_COUNT, "description": "What the loads under way will take."},
                free_bytes={**_COUNT, "description": "total - used - reserved, never negative."},
                residents=_array("GpuResident"),
            ),
            "description": "One device of the scheduler's VRAM ledger.",
        },
        "Gpus": _obj(
            ("devices", "max_swap_wait_ms", "min_residency_ms"),
            devices=_array("GpuLedger"),
            max_swap_wait_ms={**_COUNT, "description": "How long a resident model's queued work goes first."},
            min_residency_ms={**_COUNT, "description": "How long a loaded model stays at least."},
        ),
    }


_ERROR_SCHEMA: Final = {
    Dialect.NATIVE: "Error",
    Dialect.OPENAI: "OpenAIError",
    Dialect.ANTHROPIC: "AnthropicError",
}


def _json_body(schema: Schema, description: str = "OK") -> Schema:
    return {"description": description, "content": {JSON: {"schema": schema}}}


_SSE_EVENT: Final[Schema] = {
    **_obj(("data",), data=_STR, event=_STR, id=_STR),
    "description": "One server-sent event; for the compatible APIs `data` is a JSON chunk or [DONE].",
}


def _json_or_sse(schema: Schema) -> Schema:
    """A compatible route: JSON, or with ``stream: true`` a ``text/event-stream``."""
    return {"description": "OK", "content": {JSON: {"schema": schema}, SSE: {"schema": _SSE_EVENT}}}


_NO_CONTENT: Final[Schema] = {"description": "No content"}
_EVENTS: Final[Schema] = {"description": "Server-sent events", "content": {SSE: {"schema": _SSE_EVENT}}}


def _path_param(name: str, pattern: str) -> Schema:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string", "pattern": pattern}}


def _query(name: str, schema: Schema) -> Schema:
    return {"name": name, "in": "query", "required": False, "schema": schema}


_WAIT: Final = _query("wait", {"enum": ["true", "false", "1", "0"]})


def _op(
    summary: str, ok: dict[str, Schema], body: str | Schema | None = None, params: tuple[Schema, ...] = ()
) -> Schema:
    """One operation with ``ok`` its success responses (:func:`_finish` adds errors and security)."""
    op: Schema = {"summary": summary, "responses": ok}
    if params:
        op["parameters"] = list(params)
    if body is not None:
        schema = _ref(body) if isinstance(body, str) else body
        op["requestBody"] = {"required": True, "content": {JSON: {"schema": schema}}}
    return op


def _finish(paths: dict[str, dict[str, Schema]]) -> dict[str, dict[str, Schema]]:
    """Every error (4XX, 5XX) in the route's dialect; no token on the open routes."""
    for path, ops in paths.items():
        error = {"description": "Error", "content": {JSON: {"schema": _ref(_ERROR_SCHEMA[dialect_of(path)])}}}
        for method, op in ops.items():
            responses = op["responses"]
            assert isinstance(responses, dict)
            responses.update({"4XX": error, "5XX": error})
            if (method.upper(), path) in OPEN_ROUTES or path == "/openapi.json":
                op["security"] = []
    return dict(sorted(paths.items()))


def _native_paths() -> dict[str, dict[str, Schema]]:
    task = _path_param("task_id", ID_PATTERN)
    session = _path_param("session_id", ID_PATTERN)
    pool = _path_param("pool_id", r"^.{1,128}$")
    model = _path_param("model_id", MODEL_ID)
    catalog = "/v1/catalog/models/{model_id}"
    return {
        "/v1/tasks": {
            "post": _op("Admit a task", {"202": _json_body(_ref("AdmissionResponse"))}, "TaskRequest"),
            "get": _op(
                "Recent tasks, newest first",
                {"200": _json_body(_obj(("tasks",), tasks={"type": "array"}))},
                params=(_query("limit", {"type": "integer", "minimum": 1, "maximum": TASKS_LIMIT_MAX}),),
            ),
        },
        "/v1/tasks/{task_id}": {
            "get": _op("A task's status", {"200": _json_body(_ref("TaskStatus"))}, None, (task,))
        },
        "/v1/tasks/{task_id}/stream": {
            "get": _op(
                "A task's events (SPEC §3)",
                {"200": _EVENTS},
                params=(task, _query("last_event_id", {"type": "integer", "minimum": -1})),
            )
        },
        "/v1/tasks/{task_id}/cancel": {"post": _op("Cancel a task", {"204": _NO_CONTENT}, params=(task,))},
        "/v1/sessions/{session_id}": {
            "get": _op("A session", {"200": _json_body(_ref("SessionInfo"))}, params=(session,)),
            "delete": _op("End a session", {"204": _NO_CONTENT}, params=(session,)),
        },
        "/v1/pools": {"get": _op("Every pool's health", {"200": _json_body(_array("PoolHealth"))})},
        "/v1/pools/{pool_id}/health": {
            "get": _op("A pool's health", {"200": _json_body(_ref("PoolHealth"))}, params=(pool,))
        },
        "/v1/pools/{pool_id}/drain": {
            "post": _op("Drain a pool", {"202": _json_body(_ANY_OBJ)}, "DrainRequest", (pool,))
        },
        "/v1/pools/{pool_id}/reload": {
            "post": _op(
                "Reload a pool with another model",
                {"200": _json_body(_ANY_OBJ), "202": _json_body(_ANY_OBJ)},
                "ReloadRequest",
                (pool, _WAIT),
            )
        },
        "/v1/pools/{pool_id}/resume": {
            "post": _op("Resume a drained pool", {"202": _json_body(_ANY_OBJ)}, params=(pool,))
        },
        "/v1/replicasets": {"get": _op("Replica sets", {"200": _json_body(_array("ReplicaSet"))})},
        "/v1/gpus": {
            "get": _op("The VRAM ledger per device, with its residents", {"200": _json_body(_ref("Gpus"))})
        },
        "/v1/capabilities": {
            "get": _op("What this deployment serves", {"200": _json_body(_ref("Capabilities"))})
        },
        "/v1/catalog/models": {
            "post": _op(
                "Register a model",
                {"200": _json_body(_ref("CatalogModel")), "201": _json_body(_ref("CatalogModel"))},
                "CatalogCreate",
            ),
            "get": _op(
                "List models",
                {"200": _json_body(_obj(("items",), items=_array("CatalogModel")))},
                params=(_query("state", _STR), _query("tag", _STR)),
            ),
        },
        catalog: {
            "get": _op("A model", {"200": _json_body(_ref("CatalogModel"))}, params=(model,)),
            "delete": _op("Remove a model", {"204": _NO_CONTENT}, params=(model,)),
        },
        f"{catalog}/verify": {
            "post": _op(
                "Verify a model",
                {"200": _json_body(_ref("CatalogModel")), "202": _json_body(_ANY_OBJ)},
                params=(model, _WAIT),
            )
        },
        f"{catalog}/state": {
            "post": _op("Change a model's state", {"202": _json_body(_ANY_OBJ)}, "StateRequest", (model,))
        },
        "/v1/status": {"get": _op("The status snapshot", {"200": _json_body(_ANY_OBJ)})},
        "/v1/status/stream": {"get": _op("Status snapshots as SSE", {"200": _EVENTS})},
    }


def _array(name: str) -> Schema:
    return {"type": "array", "items": _ref(name)}


def _compat_paths() -> dict[str, dict[str, Schema]]:
    def post(path: str, summary: str, body: str, ok: Schema) -> dict[str, Schema]:
        return {"post": _op(summary, {"200": ok}, body)}

    completion = _obj(("id", "object", "choices"), id=_STR, object=_STR, choices={"type": "array"})
    return {
        "/v1/chat/completions": post(
            "/v1/chat/completions", "OpenAI chat completions", "ChatRequest", _json_or_sse(completion)
        ),
        "/v1/completions": post(
            "/v1/completions", "OpenAI completions", "CompletionRequest", _json_or_sse(completion)
        ),
        "/v1/embeddings": post(
            "/v1/embeddings",
            "OpenAI embeddings",
            "EmbeddingRequest",
            _json_body(_obj(("object", "data"), object={"const": "list"}, data={"type": "array"})),
        ),
        "/v1/models": {
            "get": _op(
                "OpenAI model list",
                {
                    "200": _json_body(
                        _obj(("object", "data"), object={"const": "list"}, data=_array("OpenAIModel"))
                    )
                },
            )
        },
        "/v1/responses": post(
            "/v1/responses", "OpenAI Responses API", "ResponsesRequest", _json_or_sse(_obj(("id",), id=_STR))
        ),
        "/v1/messages": post(
            "/v1/messages",
            "Anthropic Messages API",
            "MessagesRequest",
            _json_or_sse(_obj(("id", "type", "content"), id=_STR, type=_STR, content={"type": "array"})),
        ),
        "/v1/messages/count_tokens": post(
            "/v1/messages/count_tokens",
            "Anthropic token count",
            "CountTokensRequest",
            _json_body(_obj(("input_tokens",), input_tokens=_INT)),
        ),
    }


def _open_paths() -> dict[str, dict[str, Schema]]:
    text: Schema = {"description": "OK", "content": {"text/plain": {"schema": _STR}}}
    return {
        "/": {
            "get": _op(
                "The status page", {"200": {"description": "OK", "content": {"text/html": {"schema": _STR}}}}
            )
        },
        "/healthz": {"get": _op("Liveness", {"200": _json_body(_obj(("status",), status={"const": "ok"}))})},
        "/readyz": {
            "get": _op(
                "Readiness",
                {"200": _json_body(_ref("Readiness")), "503": _json_body(_ref("Readiness"), "Not ready")},
            )
        },
        "/metrics": {"get": _op("Prometheus metrics of every service", {"200": text})},
        "/openapi.json": {"get": _op("This document", {"200": _json_body(_ANY_OBJ)})},
    }


# ---------------------------------------------------------------------------------------------------
# PENDING ROUTES (issue 15): policy, http-fetch and artifacts, written from SPEC §2.3 while their
# handlers are being built. Once they are wired, replace these hand-written bodies with their request
# models (add them to _MODELS) and adjust the responses to what the handlers answer.
# ---------------------------------------------------------------------------------------------------
PENDING_ROUTES: Final = frozenset(
    {
        ("POST", "/v1/policy/evaluate"),
        ("POST", "/v1/tools/http-fetch"),
        ("POST", "/v1/artifacts"),
        ("GET", "/v1/artifacts"),
        ("GET", "/v1/artifacts/{artifact_id}"),
        ("GET", "/v1/artifacts/{artifact_id}/content"),
    }
)


def _pending_paths() -> dict[str, dict[str, Schema]]:
    url: Schema = {"type": "string", "minLength": 1}
    method: Schema = {"enum": ["GET", "HEAD", "POST"]}
    artifact_id = _path_param("artifact_id", r"^sha256:[0-9a-f]{64}$")
    ref = _obj(("id", "kind", "digest", "created_ms", "tags", "size_bytes", "url"), id=_STR, kind=_STR)
    return {
        "/v1/policy/evaluate": {
            "post": _op(
                "Evaluate the outbound policy for a URL",
                {
                    "200": _json_body(
                        _obj(("decision", "rule", "decision_id"), decision={"enum": ["allow", "deny"]})
                    )
                },
                _obj(("url",), url=url, method=method, tool=_STR),
            )
        },
        "/v1/tools/http-fetch": {
            "post": _op(
                "Fetch a URL the policy allows",
                {"200": _json_body(_obj(("decision_id",), decision_id=_STR))},
                _obj(("url",), url=url, method=method, headers=_ANY_OBJ, body=_STR),
            )
        },
        "/v1/artifacts": {
            "post": _op(
                "Store an artifact",
                {"200": _json_body(ref), "201": _json_body(ref)},
                _obj(
                    ("kind", "content"),
                    kind={"enum": ["plan", "summary", "diff", "trace", "other"]},
                    content=_ANY_OBJ,
                    tags={"type": "array", "items": {"type": "string", "maxLength": 64}, "maxItems": 32},
                    parent=_STR,
                    metadata=_ANY_OBJ,
                ),
            ),
            "get": _op(
                "List artifacts, newest first",
                {"200": _json_body(_obj(("items", "next_cursor"), items={"type": "array"}))},
                params=(
                    _query("tag", _STR),
                    _query("kind", _STR),
                    _query("parent", _STR),
                    _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000}),
                    _query("cursor", _STR),
                ),
            ),
        },
        "/v1/artifacts/{artifact_id}": {
            "get": _op("An artifact", {"200": _json_body(_ANY_OBJ)}, params=(artifact_id,))
        },
        "/v1/artifacts/{artifact_id}/content": {
            "get": _op("An artifact's content", {"200": _json_body(_ANY_OBJ)}, params=(artifact_id,))
        },
    }


def build_document() -> dict[str, object]:
    """The whole document (deterministic: the same code gives the same bytes)."""
    _, defs = models_json_schema(
        [(model, "validation") for model in _MODELS], ref_template="#/components/schemas/{model}"
    )
    schemas = {**defs["$defs"], **_response_schemas()}
    paths = {**_native_paths(), **_compat_paths(), **_open_paths(), **_pending_paths()}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "llama-orch",
            "version": API_VERSION,
            "description": "The gateway's HTTP API (SPEC §2). Every /v1 route needs an API token.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}, {"apiKey": []}],
        "paths": _finish(paths),
        "components": {
            "schemas": dict(sorted(schemas.items())),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
        },
    }


def render_document() -> str:
    """The committed text of ``contracts/openapi.json``."""
    return json.dumps(build_document(), indent=2, ensure_ascii=False) + "\n"


def add_routes(app: web.Application) -> None:
    """``GET /openapi.json``: the document, rendered once here."""
    body = render_document().encode()

    async def document(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type=JSON)

    app.router.add_get("/openapi.json", document)


if __name__ == "__main__":
    sys.stdout.write(render_document())
