"""The model catalog (SPEC §2.3, §5.7): every model the stack knows, its trust and its lifecycle state.

The scheduler owns it: SQLite at ``<state_dir>/catalog.sqlite``, so entries survive restarts. Models
listed in ``catalog.models`` are upserted at start, and the fields the config declares win. The
gateway only exposes it (``/v1/catalog/models``), through the scheduler's ``Catalog`` RPC.

- **Facts** from the file: a GGUF model's metadata (architecture, parameters, quantisation, trained
  context, layers, KV heads, head size) read with llama.cpp's own ``gguf`` reader
  (:mod:`llorch.gguf_meta`), shown as ``facts``. Directory models have none.
- **Verify** (:mod:`llorch.trust`): sha256 against the declared digest, signatures and SBOM, allowed
  registries; the result is stored, ``trusted`` is true when the last one passed, and every result
  counts in ``catalog_verifications_total{result, reason, engine}``.
- **Lifecycle**: ``Draft`` (the default of an API-created entry), ``Active``, ``Canary``,
  ``Deprecated``, ``Retired``. Entering Active or Canary needs ``trusted`` (an entry never verified is
  verified first). Admission asks :meth:`Catalog.state_of`; ``model_state{model_id, state}`` is 1 for
  the current state and 0 for the others.
- **Paths** must be absolute, without ``..`` segments: the catalog names files the operator placed, it
  is not a way to read arbitrary ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Final, Literal

from prometheus_client import Counter, Gauge
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from llorch import trust
from llorch.config import CatalogModelConfig, ModelState, TrustPolicy
from llorch.digest import DigestCache
from llorch.errors import Code, JsonValue, OrchestratorError, invalid
from llorch.gguf_meta import facts_json, facts_of

log = logging.getLogger(__name__)

STATES: Final[tuple[ModelState, ...]] = ("Draft", "Active", "Canary", "Deprecated", "Retired")
SERVING_STATES: Final = frozenset({"Active", "Canary"})
Digest = Annotated[str, StringConstraints(pattern=r"^sha256:[0-9a-f]{64}$")]
ModelId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}$")]
Tag = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Signature(_Strict):
    signer: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    algo: Annotated[str, StringConstraints(min_length=1, max_length=32)]
    sig: Annotated[str, StringConstraints(min_length=1, max_length=4096)]
    timestamp_ms: int | None = None


class Sbom(_Strict):
    uri: Annotated[str, StringConstraints(min_length=1, max_length=2048)]
    digest: Digest


class Policy(_Strict):
    mode: Literal["strict", "permissive"] = "permissive"
    allowed_registries: Annotated[list[str], Field(max_length=64)] = []
    require_signature: bool | None = None
    require_sbom: bool | None = None
    ca_roots: Annotated[list[str], Field(max_length=64)] = []


class CatalogCreate(_Strict):
    """What a client may set (SPEC §2.3 CatalogModel)."""

    id: ModelId
    path: Annotated[str, StringConstraints(min_length=1, max_length=4096)]
    digest: Digest | None = None
    source_url: Annotated[str, StringConstraints(max_length=2048)] | None = None
    tags: Annotated[list[Tag], Field(max_length=32)] = []
    signatures: Annotated[list[Signature], Field(max_length=16)] = []
    sbom: Sbom | None = None
    trust_policy: Policy | None = None
    state: ModelState = "Draft"

    @field_validator("path")
    @classmethod
    def _plain_path(cls, value: str) -> str:
        return _checked_path(value)


def _checked_path(value: str) -> str:
    if "\x00" in value:
        raise ValueError("path must not contain NUL")
    path = PurePosixPath(value)
    if not path.is_absolute():
        raise ValueError("path must be absolute")
    if ".." in path.parts:
        raise ValueError("path must not contain '..' segments")
    return str(path)


class Catalog:
    """The catalog over one SQLite file; ``engines`` maps a model id to the engine serving it (the
    ``engine`` label of ``catalog_verifications_total``)."""

    def __init__(
        self,
        path: Path,
        policy: TrustPolicy,
        engines: dict[str, str],
        verifications: Counter,
        model_state: Gauge,
    ) -> None:
        self.policy = policy
        self.engines = engines
        self.verifications = verifications
        self.model_state = model_state
        self.hasher = DigestCache(path.parent / "catalog-digests.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("CREATE TABLE IF NOT EXISTS models (id TEXT PRIMARY KEY, body TEXT NOT NULL)")
        self._entries: dict[str, dict[str, Any]] = {
            row[0]: json.loads(row[1]) for row in self._db.execute("SELECT id, body FROM models")
        }
        self._lock = asyncio.Lock()
        for entry in self._entries.values():
            self._gauge(entry)

    def close(self) -> None:
        self._db.close()

    def state_of(self, model_id: str) -> str | None:
        """The entry's lifecycle state; None for a model the catalog does not know."""
        entry = self._entries.get(model_id)
        return entry["state"] if entry is not None else None

    async def import_config(self, models: list[CatalogModelConfig]) -> None:
        """Upsert the configured entries; the fields the config declares win."""
        async with self._lock:
            for model in models:
                declared = model.model_dump(exclude_unset=True, mode="json")
                declared["path"] = str(model.path)
                declared.setdefault("state", model.state)
                entry = self._entries.get(model.id) or _new_entry(model.id, str(model.path))
                entry.update({k: v for k, v in declared.items() if k in _CLIENT_FIELDS})
                entry["updated_ms"] = _now_ms()
                await self._save(entry)

    def get(self, model_id: str) -> dict[str, Any]:
        entry = self._entries.get(model_id)
        if entry is None:
            raise OrchestratorError(Code.NOT_FOUND, f"model {model_id} is not in the catalog")
        return entry

    def entries(self, state: str = "", tag: str = "") -> list[dict[str, Any]]:
        if state and state not in STATES:
            raise invalid("state", f"state must be one of {', '.join(STATES)}")
        return [
            e
            for _, e in sorted(self._entries.items())
            if (not state or e["state"] == state) and (not tag or tag in e["tags"])
        ]

    async def create(self, body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """(the entry, True when new). The same content again is not an error; other content under a
        known id is MODEL_EXISTS; no signature under strict is UNTRUSTED_ARTIFACT."""
        req = _parse(body)
        policy = self._policy_of(req.trust_policy)
        if policy.effective_require_signature and not req.signatures:
            raise OrchestratorError(
                Code.UNTRUSTED_ARTIFACT,
                f"the trust policy is {policy.mode}: model {req.id} needs a signature",
                errors=["missing_signature"],
            )
        declared = req.model_dump(mode="json")
        async with self._lock:
            known = self._entries.get(req.id)
            if known is not None:
                if {k: known.get(k) for k in _CLIENT_FIELDS} == declared:
                    return known, False
                raise OrchestratorError(
                    Code.MODEL_EXISTS, f"model {req.id} exists with other content; choose another id"
                )
            entry = _new_entry(req.id, req.path)
            entry.update(declared)
            entry["facts"] = await _facts(Path(req.path))
            await self._save(entry)
        log.info("catalog entry created", extra={"event": "catalog_created", "model_id": req.id})
        return entry, True

    async def delete(self, model_id: str, served_by: list[str]) -> None:
        self.get(model_id)
        if served_by:
            # 409 as the issue asks; SPEC §4 has no code of its own for it, and MODEL_EXISTS (the model
            # is still there, in a pool) is the nearest.
            raise OrchestratorError(
                Code.MODEL_EXISTS,
                f"model {model_id} is served by {', '.join(sorted(served_by))}; reload or remove those "
                "pools first",
                served_by=list[JsonValue](sorted(served_by)),
            )
        async with self._lock:
            self._entries.pop(model_id, None)
            await asyncio.to_thread(self._db.execute, "DELETE FROM models WHERE id = ?", (model_id,))
        for state in STATES:
            self.model_state.remove(model_id, state)
        log.info("catalog entry deleted", extra={"event": "catalog_deleted", "model_id": model_id})

    async def verify(self, model_id: str) -> dict[str, Any]:
        entry = self.get(model_id)
        sbom = entry.get("sbom")
        claim = trust.ModelClaim(
            path=Path(entry["path"]),
            digest=entry.get("digest"),
            source_url=entry.get("source_url"),
            signatures=tuple(
                trust.Signature(s["signer"], s["algo"], s["sig"]) for s in entry.get("signatures") or []
            ),
            sbom=trust.Sbom(sbom["uri"], sbom["digest"]) if sbom else None,
        )
        own = entry.get("trust_policy")
        policy = self._policy_of(Policy.model_validate(own) if own else None)
        result = await trust.verify(claim, policy, self.hasher)
        engine = self.engines.get(model_id, "none")
        for reason in result.reasons:
            self.verifications.labels(result.status, reason, engine).inc()
        async with self._lock:
            entry = self.get(model_id)
            if result.pinned and result.digest:
                entry["digest"] = result.digest
            entry["verification"] = {
                "status": result.status,
                "checked_ms": result.checked_ms,
                "warnings": list(result.warnings),
                "errors": list(result.errors),
            }
            entry["trusted"] = result.status == "pass"
            if result.digest is not None:
                entry["manifests"] = [
                    {"path": entry["path"], "digest": result.digest, "size_bytes": _size(Path(entry["path"]))}
                ]
            entry["facts"] = entry.get("facts") or await _facts(Path(entry["path"]))
            entry["updated_ms"] = _now_ms()
            await self._save(entry)
        log.info(
            "catalog entry verified",
            extra={"event": "catalog_verified", "model_id": model_id, "result": result.status},
        )
        return entry

    async def verify_pending(self) -> None:
        """Verify every entry never verified (the configured ones, at start), one after another, so
        their facts show and a reload onto them does not wait for the hash."""
        for model_id in [m for m, e in list(self._entries.items()) if e["verification"]["status"] == "never"]:
            with contextlib.suppress(OrchestratorError):  # deleted meanwhile
                await self.verify(model_id)

    async def set_state(self, model_id: str, state: str) -> tuple[dict[str, Any], str]:
        """(the entry, its previous state). Entering Active or Canary needs ``trusted``."""
        if state not in STATES:
            raise invalid("state", f"state must be one of {', '.join(STATES)}")
        entry = self.get(model_id)
        if state in SERVING_STATES:
            if entry["verification"]["status"] == "never":
                entry = await self.verify(model_id)
            if not entry["trusted"]:
                raise OrchestratorError(
                    Code.UNTRUSTED_ARTIFACT,
                    f"model {model_id} failed verification; fix it and verify again before {state}",
                    errors=entry["verification"]["errors"],
                )
        async with self._lock:
            entry = self.get(model_id)
            previous = entry["state"]
            entry["state"] = state
            entry["updated_ms"] = _now_ms()
            await self._save(entry)
        log.info(
            "model lifecycle state changed",
            extra={"event": "lifecycle_state_change", "model_id": model_id, "from": previous, "to": state},
        )
        return entry, previous

    def _policy_of(self, own: Policy | None) -> TrustPolicy:
        """The entry's own policy wins over the catalog's, field by field."""
        entry = TrustPolicy.model_validate(own.model_dump(exclude_unset=True)) if own is not None else None
        return trust.policy_for(entry, self.policy)

    async def _save(self, entry: dict[str, Any]) -> None:
        body = json.dumps(entry, separators=(",", ":"), ensure_ascii=False)
        await asyncio.to_thread(
            self._db.execute, "INSERT OR REPLACE INTO models (id, body) VALUES (?, ?)", (entry["id"], body)
        )
        self._entries[entry["id"]] = entry
        self._gauge(entry)

    def _gauge(self, entry: dict[str, Any]) -> None:
        for state in STATES:
            self.model_state.labels(entry["id"], state).set(1 if entry["state"] == state else 0)


_CLIENT_FIELDS: Final = tuple(CatalogCreate.model_fields)


def _parse(body: dict[str, Any]) -> CatalogCreate:
    from pydantic import ValidationError

    try:
        return CatalogCreate.model_validate(body)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        field = ".".join(str(part) for part in first["loc"]) or "body"
        if first["type"] == "extra_forbidden":
            raise invalid(field, f"unknown field {field!r}") from None
        raise invalid(field, f"{field}: {str(first['msg']).removeprefix('Value error, ')}") from None


def _new_entry(model_id: str, path: str) -> dict[str, Any]:
    now = _now_ms()
    return {
        "id": model_id,
        "digest": None,
        "path": path,
        "source_url": None,
        "tags": [],
        "manifests": [],
        "signatures": [],
        "sbom": None,
        "trust_policy": None,
        "state": "Draft",
        "verification": {"status": "never", "checked_ms": None, "warnings": [], "errors": []},
        "trusted": False,
        "facts": None,
        "created_ms": now,
        "updated_ms": now,
    }


async def _facts(path: Path) -> dict[str, Any] | None:
    facts = await facts_of(path)
    return facts_json(facts) if facts is not None else None


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size if path.is_file() else None
    except OSError:
        return None


def _now_ms() -> int:
    return int(time.time() * 1000)
