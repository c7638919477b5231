"""The artifact store's pieces (SPEC §5.8): canonical ids, files, dedup, lineage, limits, listing and the
retention sweep, driven by a fake clock (no sleeps)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from llorch.config import LlorchConfig
from llorch.errors import Code, OrchestratorError
from llorch_gateway.artifacts import DAY_MS, ArtifactStore, NewArtifact, artifact_id, canonical
from llorch_gateway.artifacts_api import STORE, CreateArtifact, add_routes
from llorch_gateway.models import parse_model
from tests.support.procs import wait_until


class Clock:
    def __init__(self, now_ms: int = 1_700_000_000_000) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def store(tmp_path: Path, clock: Clock) -> AsyncIterator[ArtifactStore]:
    s = ArtifactStore(tmp_path / "artifacts", max_bytes=1000, retention_days=2, clock_ms=clock)
    await s.start()
    yield s
    await s.aclose()


def test_canonical_json_and_id_follow_spec() -> None:
    content = {"b": [1, 2.5, None], "a": "é", "c": {"z": True, "y": False}}
    assert canonical(content) == '{"a":"é","b":[1,2.5,null],"c":{"y":false,"z":true}}'.encode()
    expected = hashlib.sha256(
        '{"content":{"a":"é","b":[1,2.5,null],"c":{"y":false,"z":true}},"kind":"plan"}'.encode()
    ).hexdigest()
    assert artifact_id("plan", content) == "sha256:" + expected
    # Key order and kind matter as SPEC says: same content reordered → same id; another kind → another id.
    assert artifact_id("plan", dict(reversed(list(content.items())))) == artifact_id("plan", content)
    assert artifact_id("diff", content) != artifact_id("plan", content)


@pytest.mark.parametrize("bad", [{"x": float("nan")}, {"x": float("inf")}, {"\ud800": 1}, {"x": "\udfff"}])
def test_canonical_rejects_what_json_cannot_carry(bad: dict[str, object]) -> None:
    with pytest.raises(OrchestratorError) as err:
        canonical(bad)
    assert err.value.code == Code.INVALID_PARAMS and err.value.context["field"] == "content"


async def test_put_get_dedup_merges_tags_and_keeps_first_metadata(
    store: ArtifactStore, clock: Clock, tmp_path: Path
) -> None:
    first, created = await store.put(NewArtifact("plan", {"steps": [1]}, ["a", "b"], None, {"by": "one"}))
    assert created and first.tags == ["a", "b"] and first.metadata == {"by": "one"}
    assert first.created_ms == clock.now_ms and first.size_bytes == len(b'{"steps":[1]}')
    digest = first.id.removeprefix("sha256:")
    path = tmp_path / "artifacts" / "sha256" / digest[:2] / f"{digest}.json"
    assert path.read_bytes() == b'{"steps":[1]}'
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp-")]  # temp file renamed

    clock.now_ms += 5
    again, created = await store.put(NewArtifact("plan", {"steps": [1]}, ["c", "a"], None, {"by": "two"}))
    assert not created and again.id == first.id
    assert again.tags == ["a", "b", "c"] and again.metadata == {"by": "one"}
    assert again.created_ms == first.created_ms

    record, content = await store.get(first.id)
    assert record == again and json.loads(content) == {"steps": [1]}


async def test_lineage_needs_an_existing_parent(store: ArtifactStore) -> None:
    parent, _ = await store.put(NewArtifact("plan", {"n": 1}))
    child, _ = await store.put(NewArtifact("diff", {"n": 2}, parent=parent.id))
    assert child.parent == parent.id
    unknown = "sha256:" + "0" * 64
    with pytest.raises(OrchestratorError) as err:
        await store.put(NewArtifact("diff", {"n": 3}, parent=unknown))
    assert err.value.code == Code.INVALID_PARAMS and err.value.context["field"] == "parent"
    page = await store.list(parent=parent.id)
    assert [r.id for r in page.items] == [child.id]


async def test_over_max_bytes_is_413_and_stores_nothing(store: ArtifactStore, tmp_path: Path) -> None:
    exact = {"t": "x" * (1000 - len('{"t":""}'))}
    assert len(canonical(exact)) == 1000
    await store.put(NewArtifact("other", exact))  # at the limit: fine
    with pytest.raises(OrchestratorError) as err:
        await store.put(NewArtifact("other", {"t": "x" * 1000}))
    assert err.value.code == Code.PAYLOAD_TOO_LARGE and err.value.context["limit_bytes"] == 1000
    assert len(list((tmp_path / "artifacts" / "sha256").rglob("*.json"))) == 1


async def test_unknown_id_is_404(store: ArtifactStore) -> None:
    with pytest.raises(OrchestratorError) as err:
        await store.get("sha256:" + "f" * 64)
    assert err.value.code == Code.NOT_FOUND


async def test_list_filters_newest_first_and_pages(store: ArtifactStore, clock: Clock) -> None:
    ids = []
    for n in range(5):
        clock.now_ms += 1
        kind = "trace" if n % 2 else "plan"
        record, _ = await store.put(NewArtifact(kind, {"n": n}, ["even" if n % 2 == 0 else "odd", "all"]))
        ids.append(record.id)
    everything = await store.list()
    assert [r.id for r in everything.items] == ids[::-1] and everything.next_cursor is None
    assert [r.id for r in (await store.list(tag="odd")).items] == [ids[3], ids[1]]
    assert [r.id for r in (await store.list(kind="plan")).items] == [ids[4], ids[2], ids[0]]
    assert [r.id for r in (await store.list(kind="plan", tag="odd")).items] == []
    seen: list[str] = []
    cursor = ""
    while True:
        page = await store.list(tag="all", limit=2, cursor=cursor)
        seen += [r.id for r in page.items]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == ids[::-1]
    with pytest.raises(OrchestratorError) as err:
        await store.list(cursor="../../etc")
    assert err.value.context["field"] == "cursor"


async def test_sweep_removes_only_what_retention_expired(
    store: ArtifactStore, clock: Clock, tmp_path: Path
) -> None:
    old, _ = await store.put(NewArtifact("plan", {"age": "old"}, ["t"]))
    clock.now_ms += DAY_MS
    young, _ = await store.put(NewArtifact("plan", {"age": "young"}, ["t"]))
    assert await store.sweep() == 0  # old is one day old: kept for two
    clock.now_ms += DAY_MS + 1
    assert await store.sweep() == 1
    with pytest.raises(OrchestratorError):
        await store.get(old.id)
    assert (await store.get(young.id))[0].id == young.id
    assert [r.id for r in (await store.list(tag="t")).items] == [young.id]
    assert len(list((tmp_path / "artifacts" / "sha256").rglob("*.json"))) == 1
    # Posting the swept content again creates it anew.
    again, created = await store.put(NewArtifact("plan", {"age": "old"}))
    assert created and again.id == old.id and again.created_ms == clock.now_ms


async def test_sweep_at_start_and_persistence_across_reopen(tmp_path: Path, clock: Clock) -> None:
    root = tmp_path / "artifacts"
    first = ArtifactStore(root, max_bytes=1000, retention_days=None, clock_ms=clock)
    await first.start()
    kept, _ = await first.put(NewArtifact("summary", {"k": 1}, ["x"], None, {"m": 1}))
    await first.aclose()
    await first.aclose()  # idempotent

    clock.now_ms += 10 * DAY_MS
    forever = ArtifactStore(root, max_bytes=1000, retention_days=None, clock_ms=clock)
    await forever.start()  # no retention: nothing goes
    assert (await forever.get(kept.id))[0] == kept
    await forever.aclose()

    expiring = ArtifactStore(root, max_bytes=1000, retention_days=3, clock_ms=clock)
    await expiring.start()  # the sweep at start removes it
    try:
        with pytest.raises(OrchestratorError):
            await expiring.get(kept.id)
    finally:
        await expiring.aclose()


def test_request_model_rejects_bad_input() -> None:
    good: dict[str, object] = {"kind": "trace", "content": {"a": 1}}
    assert parse_model(CreateArtifact, good).tags == []
    bad_cases: list[tuple[dict[str, object], str]] = [
        ({**good, "kind": "haiku"}, "kind"),
        ({**good, "content": [1]}, "content"),
        ({**good, "content": "text"}, "content"),
        ({**good, "tags": "a"}, "tags"),
        ({**good, "tags": ["x" * 65]}, "tags.0"),
        ({**good, "tags": [str(n) for n in range(33)]}, "tags"),
        ({**good, "parent": "../../etc/passwd"}, "parent"),
        ({**good, "metadata": 3}, "metadata"),
        ({**good, "extra": 1}, "extra"),
        ({"content": {}}, "kind"),
    ]
    for body, field in bad_cases:
        with pytest.raises(OrchestratorError) as err:
            parse_model(CreateArtifact, body)
        assert err.value.code == Code.INVALID_PARAMS and err.value.context["field"] == field, body


@pytest.mark.parametrize(("retention_days", "kept"), [(None, True), (1, False)])
async def test_config_keys_reach_the_gateway_store(
    tmp_path: Path, retention_days: int | None, kept: bool
) -> None:
    """``artifacts.dir``, ``max_bytes`` and ``retention_days`` from the config are what the routes' store
    uses: an artifact from long ago goes at startup only when retention is set."""
    root = tmp_path / "elsewhere"
    past = ArtifactStore(root, max_bytes=10, clock_ms=lambda: 1_000)  # created at 1 s after the epoch
    await past.start()
    old, _ = await past.put(NewArtifact("plan", {"a": 1}))
    await past.aclose()

    cfg = LlorchConfig.model_validate(
        {
            "version": 1,
            "pools": [{"id": "p0", "engine": "mock", "model": "m"}],
            "state_dir": str(tmp_path / "state"),
            "artifacts": {"dir": str(root), "max_bytes": 10, "retention_days": retention_days},
        }
    )
    app = web.Application()
    add_routes(app, cfg)
    app.freeze()  # what a runner does before startup
    await app.startup()
    try:
        store = app[STORE]
        assert (store.root, store.max_bytes, store.retention_days) == (root, 10, retention_days)
        if kept:
            assert (await store.get(old.id))[0] == old
        else:
            with pytest.raises(OrchestratorError):
                await store.get(old.id)
    finally:
        await app.cleanup()


async def test_the_periodic_sweep_runs_while_the_store_is_open(tmp_path: Path, clock: Clock) -> None:
    """The sweeper task repeats the sweep; the clock moves, not time (the period only paces the loop)."""
    s = ArtifactStore(tmp_path / "a", max_bytes=100, retention_days=1, clock_ms=clock, sweep_interval_s=0.01)
    await s.start()
    try:
        await s.put(NewArtifact("plan", {"a": 1}))
        assert (await s.list()).items  # the sweeps so far left it: it is not expired yet
        clock.now_ms += DAY_MS + 1

        async def gone() -> bool:
            return not (await s.list()).items

        await wait_until(gone, 30, "the periodic sweep to remove the expired artifact")
    finally:
        await s.aclose()
    await s.aclose()
