"""The artifact store (SPEC §5.8): content-addressed files plus an SQLite index, owned by the gateway.

Identity. ``id = "sha256:" + hex(sha256(canonical({"kind": kind, "content": content})))`` where canonical
JSON is sorted keys, separators ``,``/``:``, UTF-8, ``ensure_ascii=False`` and no NaN/Infinity. Only
``kind`` and ``content`` are hashed: tags, parent and metadata describe an artifact, they are not it, so
posting the same document with other tags finds the same artifact (its tags are merged; the first
POST's parent and metadata are kept).

Layout under ``artifacts.dir`` (default ``<state_dir>/artifacts``):

- ``sha256/<2 hex>/<hex>.json``: the canonical content bytes, written to a temp file in the same folder,
  fsynced, then renamed, so a reader never sees half a file. The file is written before its index row,
  so the index never names a missing file.
- ``index.sqlite``: ``artifacts(id, kind, parent, metadata, created_ms, size_bytes)`` and
  ``artifact_tags(id, tag)``. Back it up with ``sqlite3 index.sqlite .backup``.

Retention. With ``artifacts.retention_days`` set, :meth:`ArtifactStore.sweep` removes artifacts created
more than that many days before the clock's now (rows, then files); it runs at :meth:`ArtifactStore.start`
and every :data:`SWEEP_INTERVAL_S`. A swept parent leaves its children's ``parent`` naming an id that no
longer resolves (lineage is history, not ownership).

One sqlite3 connection, used from worker threads (``asyncio.to_thread``) under one lock.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from llorch.errors import Code, JsonValue, OrchestratorError, invalid

log = logging.getLogger(__name__)

ID_RE: Final = re.compile(r"sha256:[0-9a-f]{64}")
SWEEP_INTERVAL_S: Final = 3600.0
DAY_MS: Final = 86_400_000
_CURSOR_RE: Final = re.compile(r"([0-9]{1,16})-([0-9a-f]{64})")

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS artifacts (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, parent TEXT, metadata TEXT,
    created_ms INTEGER NOT NULL, size_bytes INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS artifacts_newest ON artifacts (created_ms DESC, id DESC);
CREATE TABLE IF NOT EXISTS artifact_tags (
    id TEXT NOT NULL REFERENCES artifacts (id) ON DELETE CASCADE, tag TEXT NOT NULL,
    PRIMARY KEY (id, tag));
CREATE INDEX IF NOT EXISTS artifact_tags_tag ON artifact_tags (tag, id);
"""


def canonical(value: JsonValue | Mapping[str, object] | Sequence[str], field: str = "content") -> bytes:
    """SPEC §5.8 canonical JSON; a value JSON cannot carry (NaN, a lone surrogate) is INVALID_PARAMS
    naming ``field``."""
    try:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        return text.encode("utf-8")
    except ValueError:  # NaN/Infinity; UnicodeEncodeError (a lone surrogate) is a ValueError too
        raise invalid(field, f"{field} must be JSON without NaN, Infinity or lone surrogates") from None
    except RecursionError:
        raise invalid(field, f"{field} is nested too deeply") from None


def artifact_id(kind: str, content: Mapping[str, object]) -> str:
    """The id of the artifact ``{kind, content}``."""
    return "sha256:" + hashlib.sha256(canonical({"kind": kind, "content": content})).hexdigest()


@dataclass(frozen=True)
class NewArtifact:
    """What a POST asks to store (validated by the route)."""

    kind: str
    content: Mapping[str, object]
    tags: Sequence[str] = ()
    parent: str | None = None
    metadata: Mapping[str, object] | None = None


@dataclass(frozen=True)
class Record:
    """One index row, with its tags (sorted)."""

    id: str
    kind: str
    parent: str | None
    metadata: dict[str, JsonValue] | None
    created_ms: int
    size_bytes: int
    tags: list[str] = field(default_factory=list)

    @property
    def cursor(self) -> str:
        """The list cursor that continues after this record."""
        return f"{self.created_ms}-{self.id.removeprefix('sha256:')}"


@dataclass(frozen=True)
class Page:
    items: list[Record]
    next_cursor: str | None


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class ArtifactStore:
    """Artifacts on disk and in SQLite. ``start()`` opens the index and runs the first sweep;
    ``aclose()`` (idempotent) stops the sweeper and closes the index."""

    def __init__(
        self,
        root: Path,
        max_bytes: int,
        retention_days: int | None = None,
        clock_ms: Callable[[], int] = _now_ms,
        sweep_interval_s: float = SWEEP_INTERVAL_S,
    ) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.retention_days = retention_days
        self._clock_ms = clock_ms
        self._sweep_interval_s = sweep_interval_s
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._sweeper: asyncio.Task[None] | None = None

    # ---- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self._open)
        await self.sweep()
        if self.retention_days is not None:
            self._sweeper = asyncio.create_task(self._sweep_forever(self._sweep_interval_s))

    async def aclose(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _open(self) -> None:
        (self.root / "sha256").mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.root / "index.sqlite", check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA foreign_keys = ON")
        db.execute("PRAGMA journal_mode = WAL")
        db.executescript(_SCHEMA)
        with self._lock:
            self._db = db

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise OrchestratorError(Code.INTERNAL, "the artifact store is not open")
        return self._db

    # ---- API ---------------------------------------------------------------------------------------

    async def put(self, new: NewArtifact) -> tuple[Record, bool]:
        """Store ``new``; returns its record and whether it was created (False: it existed; its tags
        are merged). 413 over ``max_bytes``; 400 for an unknown parent."""
        body = canonical(new.content)
        if len(body) > self.max_bytes:
            raise OrchestratorError(
                Code.PAYLOAD_TOO_LARGE,
                f"the artifact's canonical content is {len(body)} bytes, over the limit of {self.max_bytes}",
                limit_bytes=self.max_bytes,
            )
        metadata = canonical(new.metadata, "metadata").decode() if new.metadata is not None else None
        canonical(list(new.tags), "tags")  # SQLite cannot store a lone surrogate either
        aid = artifact_id(new.kind, new.content)
        return await asyncio.to_thread(self._put, aid, new, body, metadata)

    async def get(self, aid: str) -> tuple[Record, bytes]:
        """The record and the canonical content bytes of ``aid``; 404 when unknown."""
        record = await asyncio.to_thread(self._record, aid)
        if record is None:
            raise OrchestratorError(Code.NOT_FOUND, f"artifact {aid} is unknown")
        try:
            content = await asyncio.to_thread(self._path(aid).read_bytes)
        except FileNotFoundError:  # swept between the two reads
            raise OrchestratorError(Code.NOT_FOUND, f"artifact {aid} is unknown") from None
        return record, content

    async def list(
        self, tag: str = "", kind: str = "", parent: str = "", limit: int = 100, cursor: str = ""
    ) -> Page:
        """Newest first; ``cursor`` is a previous page's ``next_cursor``."""
        after: tuple[int, str] | None = None
        if cursor:
            match = _CURSOR_RE.fullmatch(cursor)
            if match is None:
                raise invalid("cursor", "cursor must be a next_cursor this API returned")
            after = (int(match[1]), "sha256:" + match[2])
        return await asyncio.to_thread(self._list, tag, kind, parent, limit, after)

    async def sweep(self) -> int:
        """Remove the artifacts older than the retention; returns how many (0 without retention)."""
        if self.retention_days is None:
            return 0
        cutoff = self._clock_ms() - self.retention_days * DAY_MS
        removed = await asyncio.to_thread(self._sweep, cutoff)
        if removed:
            log.info(
                "artifacts swept",
                extra={"event": "artifacts_swept", "removed": removed, "retention_days": self.retention_days},
            )
        return removed

    async def _sweep_forever(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)  # a period, not synchronisation
            try:
                await self.sweep()
            except (OSError, sqlite3.Error) as exc:  # try again next period
                log.warning(
                    "artifact sweep failed", extra={"event": "artifacts_sweep_failed", "error": str(exc)}
                )

    # ---- worker-thread parts ------------------------------------------------------------------------

    def _path(self, aid: str) -> Path:
        digest = aid.removeprefix("sha256:")
        return self.root / "sha256" / digest[:2] / f"{digest}.json"

    def _write_file(self, aid: str, body: bytes) -> None:
        path = self._path(aid)
        if path.exists():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(body)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _put(self, aid: str, new: NewArtifact, body: bytes, metadata: str | None) -> tuple[Record, bool]:
        with self._lock:
            db = self._conn()
            if new.parent is not None and self._row(db, new.parent) is None:
                raise invalid("parent", f"parent {new.parent} is not a stored artifact")
            # The file is written under SQLite's write lock, which other processes (api.workers) share:
            # a sweep in another worker cannot unlink it between this write and the row's commit.
            db.execute("BEGIN IMMEDIATE")
            try:
                self._write_file(aid, body)
                created = (
                    db.execute(
                        "INSERT OR IGNORE INTO artifacts VALUES (?, ?, ?, ?, ?, ?)",
                        (aid, new.kind, new.parent, metadata, self._clock_ms(), len(body)),
                    ).rowcount
                    == 1
                )
                db.executemany(
                    "INSERT OR IGNORE INTO artifact_tags VALUES (?, ?)", [(aid, tag) for tag in set(new.tags)]
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            record = self._row(db, aid)
        assert record is not None
        if created:
            log.info(
                "artifact created",
                extra={
                    "event": "artifact_created",
                    "artifact_id": aid,
                    "kind": new.kind,
                    "size_bytes": len(body),
                },
            )
        return record, created

    def _record(self, aid: str) -> Record | None:
        with self._lock:
            return self._row(self._conn(), aid)

    @staticmethod
    def _row(db: sqlite3.Connection, aid: str) -> Record | None:
        row = db.execute(
            "SELECT id, kind, parent, metadata, created_ms, size_bytes FROM artifacts WHERE id = ?", (aid,)
        ).fetchone()
        if row is None:
            return None
        tags = [t for (t,) in db.execute("SELECT tag FROM artifact_tags WHERE id = ? ORDER BY tag", (aid,))]
        return Record(row[0], row[1], row[2], json.loads(row[3]) if row[3] else None, row[4], row[5], tags)

    def _list(self, tag: str, kind: str, parent: str, limit: int, after: tuple[int, str] | None) -> Page:
        where, args = ["1 = 1"], list[object]()
        if tag:
            where.append("id IN (SELECT id FROM artifact_tags WHERE tag = ?)")
            args.append(tag)
        if kind:
            where.append("kind = ?")
            args.append(kind)
        if parent:
            where.append("parent = ?")
            args.append(parent)
        if after is not None:
            where.append("(created_ms < ? OR (created_ms = ? AND id < ?))")
            args.extend([after[0], after[0], after[1]])
        # ``where`` holds only the fixed clauses above; every value is a bound parameter.
        clauses = " AND ".join(where)
        sql = f"SELECT id FROM artifacts WHERE {clauses} ORDER BY created_ms DESC, id DESC LIMIT ?"
        with self._lock:
            db = self._conn()
            ids = [aid for (aid,) in db.execute(sql, [*args, limit + 1])]
            records = [r for aid in ids[:limit] if (r := self._row(db, aid)) is not None]
        more = len(ids) > limit and records
        return Page(records, records[-1].cursor if more else None)

    def _sweep(self, cutoff_ms: int) -> int:
        with self._lock:
            db = self._conn()
            old = [
                aid for (aid,) in db.execute("SELECT id FROM artifacts WHERE created_ms < ?", (cutoff_ms,))
            ]
            db.execute("BEGIN IMMEDIATE")
            db.executemany("DELETE FROM artifacts WHERE id = ?", [(aid,) for aid in old])
            db.execute("COMMIT")
            # The files go after the rows (the index never names a missing file), under the write lock
            # again (shared with the other gateway workers' puts) and only where no put has stored the
            # same content again since.
            db.execute("BEGIN IMMEDIATE")
            try:
                for aid in old:
                    if self._row(db, aid) is None:
                        self._path(aid).unlink(missing_ok=True)
            finally:
                db.execute("COMMIT")
        return len(old)
