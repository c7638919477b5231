"""The artifact routes (SPEC §2.3, §5.8); the store is :mod:`.artifacts`, owned by this gateway.

- ``POST /v1/artifacts`` ``{kind, content, tags?, parent?, metadata?}`` → 201 ArtifactRef (new) or 200
  (the same ``{kind, content}`` already stored: same id, tags merged). 400 for bad input or an unknown
  ``parent``; 413 ``PAYLOAD_TOO_LARGE`` when the canonical content is over ``artifacts.max_bytes``.
- ``GET /v1/artifacts/{id}`` → 200 Artifact (ArtifactRef + ``content`` + ``metadata``); 404 when unknown,
  400 when ``id`` is not ``sha256:<64 hex>``. Content is at most ``artifacts.max_bytes``, so the
  document always carries it inline.
- ``GET /v1/artifacts/{id}/content`` → 200, the stored canonical content bytes themselves
  (``application/json``, ``ETag`` = the digest): the download, for a client that wants the document's
  content as a file rather than inside the Artifact.
- ``GET /v1/artifacts?tag=&kind=&parent=&limit=&cursor=`` → ``{items: [ArtifactRef], next_cursor}``,
  newest first; an unknown query parameter is 400.

ArtifactRef is ``{id, kind, digest (= id), created_ms, tags, parent, size_bytes, url}``; ``url`` is
``{api.public_base_url}/v1/artifacts/{id}`` (default ``http://<api.bind>``), the address a dev box uses.
"""

from __future__ import annotations

import json
from typing import Annotated, Final, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from llorch.config import LlorchConfig
from llorch.errors import JsonValue, invalid

from .artifacts import ID_RE, ArtifactStore, NewArtifact, Record
from .edge import LARGE_BODIES
from .models import parse_json_object, parse_model

KINDS: Final = ("plan", "summary", "diff", "trace", "other")
Kind = Literal["plan", "summary", "diff", "trace", "other"]
Tag = Annotated[str, StringConstraints(max_length=64)]
ArtifactIdStr = Annotated[str, StringConstraints(pattern=r"^sha256:[0-9a-f]{64}$")]
STORE: Final = web.AppKey("artifact_store", ArtifactStore)
ENVELOPE_BYTES: Final = 65_536
"""SPEC §5.8: an upload's body may exceed ``artifacts.max_bytes`` by this much (its JSON envelope)."""


class CreateArtifact(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    kind: Kind
    content: dict[str, object]
    tags: Annotated[list[Tag], Field(max_length=32)] = []
    parent: ArtifactIdStr | None = None
    metadata: dict[str, object] | None = None


def _json(payload: object, status: int = 200) -> web.Response:
    return web.Response(
        status=status,
        text=json.dumps(payload, separators=(",", ":"), ensure_ascii=False),
        content_type="application/json",
    )


def _id(request: web.Request) -> str:
    value = request.match_info["artifact_id"]
    if not ID_RE.fullmatch(value):
        raise invalid("id", "an artifact id must match ^sha256:[0-9a-f]{64}$")
    return value


def _limit(request: web.Request) -> int:
    raw = request.query.get("limit", "100")
    if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= 1000:
        raise invalid("limit", "limit must be an integer in 1..1000")
    return int(raw)


class ArtifactsApi:
    def __init__(self, store: ArtifactStore, base_url: str) -> None:
        self.store = store
        self.base_url = base_url.rstrip("/")

    def ref(self, record: Record) -> dict[str, JsonValue]:
        """The ArtifactRef of ``record``."""
        return {
            "id": record.id,
            "kind": record.kind,
            "digest": record.id,
            "created_ms": record.created_ms,
            "tags": list(record.tags),
            "parent": record.parent,
            "size_bytes": record.size_bytes,
            "url": f"{self.base_url}/v1/artifacts/{record.id}",
        }

    async def create(self, request: web.Request) -> web.Response:
        body = parse_model(CreateArtifact, parse_json_object(await request.read()))
        new = NewArtifact(body.kind, body.content, body.tags, body.parent, body.metadata)
        record, created = await self.store.put(new)
        return _json(self.ref(record), 201 if created else 200)

    async def get(self, request: web.Request) -> web.Response:
        record, content = await self.store.get(_id(request))
        document = self.ref(record)
        document["metadata"] = record.metadata
        # The stored bytes are canonical JSON already: splice them in rather than parse and re-encode.
        head = json.dumps(document, separators=(",", ":"), ensure_ascii=False)[:-1]
        return web.Response(
            status=200,
            body=head.encode() + b',"content":' + content + b"}",
            content_type="application/json",
        )

    async def content(self, request: web.Request) -> web.Response:
        aid = _id(request)
        _, content = await self.store.get(aid)
        return web.Response(
            body=content,
            content_type="application/json",
            charset="utf-8",
            headers={"ETag": f'"{aid.removeprefix("sha256:")}"'},
        )

    async def list(self, request: web.Request) -> web.Response:
        query = request.query
        for name in query:
            if name not in ("tag", "kind", "parent", "limit", "cursor"):
                raise invalid(name, f"unknown query parameter {name!r}")
        tag, kind, parent = query.get("tag", ""), query.get("kind", ""), query.get("parent", "")
        if len(tag) > 64:
            raise invalid("tag", "tag must be at most 64 characters")
        if kind and kind not in KINDS:
            raise invalid("kind", f"kind must be one of {', '.join(KINDS)}")
        if parent and not ID_RE.fullmatch(parent):
            raise invalid("parent", "parent must match ^sha256:[0-9a-f]{64}$")
        page = await self.store.list(tag, kind, parent, _limit(request), query.get("cursor", ""))
        return _json({"items": [self.ref(r) for r in page.items], "next_cursor": page.next_cursor})


def add_routes(app: web.Application, cfg: LlorchConfig) -> None:
    """Serve the artifact routes on ``app``; the store opens on the app's startup (with a first
    retention sweep) and closes on its cleanup."""
    store = ArtifactStore(cfg.effective_artifacts_dir, cfg.artifacts.max_bytes, cfg.artifacts.retention_days)
    api = ArtifactsApi(store, cfg.api.effective_public_base_url)
    app[STORE] = store
    app.setdefault(LARGE_BODIES, {})["/v1/artifacts"] = cfg.artifacts.max_bytes + ENVELOPE_BYTES

    async def open_store(_: web.Application) -> None:
        await store.start()

    async def close_store(_: web.Application) -> None:
        await store.aclose()

    app.on_startup.append(open_store)
    app.on_cleanup.append(close_store)
    app.router.add_post("/v1/artifacts", api.create)
    app.router.add_get("/v1/artifacts", api.list)
    app.router.add_get("/v1/artifacts/{artifact_id}", api.get)
    app.router.add_get("/v1/artifacts/{artifact_id}/content", api.content)
