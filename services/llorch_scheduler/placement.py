"""Which replica gets the next task of a set (ORCH-3010..3012, OC-CORE-1010..1013).

Only Ready, connected replicas with a free slot are options. They are ranked deterministically —
equal inputs give the same choice: (1) the session's previous replica while its KV is warm; (2) most
free slots; (3) most free VRAM (the minimum over the pool's devices; 0 for CPU pools); (4) lowest
pool_id; (5) lowest replica_id. Affinity is a preference: when the warm replica has no free slot or is
gone, the task goes to the best other option and runs with `kv_warmth: false` (KV is never migrated).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Option:
    pool_id: str
    replica_id: str
    slots_free: int
    vram_free_bytes: int = 0


def rank(options: Iterable[Option], warm_replica: str | None = None) -> list[Option]:
    """Options best first; only those with a free slot."""
    usable = [o for o in options if o.slots_free > 0]
    return sorted(
        usable,
        key=lambda o: (
            o.replica_id != warm_replica,
            -o.slots_free,
            -o.vram_free_bytes,
            o.pool_id,
            o.replica_id,
        ),
    )


def choose(options: Iterable[Option], warm_replica: str | None = None) -> Option | None:
    ranked = rank(options, warm_replica)
    return ranked[0] if ranked else None
