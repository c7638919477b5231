"""Identifiers: client-chosen id rule, generated ids, default seeds and replica-set ids."""

from __future__ import annotations

import functools
import hashlib
import json
import re
import uuid
from collections.abc import Sequence
from typing import Final

ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
_ID_RE: Final = re.compile(ID_PATTERN)
_CORRELATION_RE: Final = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
SEED_MAX: Final = 2**31 - 1


def is_valid_id(value: str) -> bool:
    return _ID_RE.fullmatch(value) is not None


def new_task_id() -> str:
    return str(uuid.uuid4())


def correlation_id(offered: str | None) -> str:
    """Echo the client's correlation id when it is well formed, else mint a UUID4 (SPEC §2.1)."""
    if offered is not None and _CORRELATION_RE.fullmatch(offered):
        return offered
    return str(uuid.uuid4())


def default_seed(task_id: str) -> int:
    """SPEC §5.5: the first 4 bytes of sha256(task_id), big-endian, masked to 31 bits."""
    return int.from_bytes(hashlib.sha256(task_id.encode()).digest()[:4], "big") & SEED_MAX


@functools.lru_cache(maxsize=4096)  # on the admission and dispatch paths; the inputs rarely change
def replica_set_id(
    engine: str,
    model_digest: str,
    ctx: int,
    engine_version: str,
    sampler_profile_version: str,
    workloads: Sequence[str] = (),
) -> str:
    """``rs-`` + 12 hex of sha256 over the canonical JSON of the set's identity tuple (SPEC §1).

    ``workloads`` joins the tuple only for pools that do not complete text (embedding, rerank): an
    embedding pool is not interchangeable with a chat pool of the same file, so it forms its own set;
    text pools keep SPEC's ids."""
    identity: list[object] = [engine, model_digest, ctx, engine_version, sampler_profile_version]
    if workloads:
        identity.append(sorted(workloads))
    canonical = json.dumps(
        identity,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return "rs-" + hashlib.sha256(canonical.encode()).hexdigest()[:12]
