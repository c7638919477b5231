"""Sessions with budgets and replica affinity (SPEC §5.4, ORCH-3021..3023, ORCH-3099).

The first task naming a `session_id` creates the session (with `sessions.budgets`, or the task's own
`budget`). Each admission counts a turn and reserves `prompt_est + max_tokens` tokens (and their cost
at the set's highest `cost_per_1k_tokens`) in one Redis script; the task's end refunds what it did not
use, exactly once, and charges its wall time from dispatch to the end. Admission and the end slide the
TTL. Cost is kept in integer micro-units, so refunds are exact.

Affinity: the scheduler remembers each session's last replica and that engine's pid. A later task of
the session is warm there while the same engine process still runs; `kv_hint: cold` skips affinity.
This memory is the scheduler's own, so a restarted scheduler starts every session cold, and a task
admitted before the restart has its reservation released only when its session expires.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

from llorch.config import SessionsConfig
from llorch.errors import Code, OrchestratorError, invalid
from llorch.store import SessionBudgets, SessionRecord, Store, TaskRecord, now_ms

from .registry import PoolRegistry, SetInfo
from .submission import Submission

log = logging.getLogger(__name__)

MICRO = 1_000_000


def cost_micro(tokens: int, cost_per_1k: float) -> int:
    """Cost of `tokens` in micro-units: tokens / 1000 x cost_per_1k x 1e6."""
    return round(tokens * cost_per_1k * 1000)


def cost_text(micro: int) -> str:
    return f"{micro / MICRO:.4f}"


def budget_view(budgets: SessionBudgets) -> dict[str, object]:
    """Remaining budgets as SessionInfo, SSE metrics and the X-Budget-* headers show them."""
    view: dict[str, object] = {}
    if budgets.tokens is not None:
        view["tokens_budget_remaining"] = budgets.tokens
    if budgets.time_ms is not None:
        view["time_budget_remaining_ms"] = budgets.time_ms
    if budgets.cost_micro is not None:
        view["cost_budget_remaining"] = round(budgets.cost_micro / MICRO, 4)
    return view


@dataclass
class _Held:
    session_id: str
    prompt_est: int
    cold: bool
    dispatched_at: float | None = None
    cost_per_1k: float = 0.0


class Sessions:
    def __init__(self, cfg: SessionsConfig, store: Store, registry: PoolRegistry) -> None:
        self.cfg = cfg
        self.store = store
        self.registry = registry
        self._held: dict[str, _Held] = {}  # task_id -> its session reservation

    async def admit(
        self,
        req: Submission,
        task_id: str,
        info: SetInfo,
        prompt_est: int,
        max_tokens: int,
    ) -> SessionBudgets | None:
        """SPEC §5.1 check 8: the turn and the budget reservation; 403 BUDGET_EXHAUSTED naming the budget."""
        if not req.session_id:
            return None
        per_1k = max(
            (p.cost_per_1k_tokens for _, p in self.registry.pools() if p.pool_id in info.pool_ids),
            default=0.0,
        )
        tokens = prompt_est + max_tokens
        result = await self.store.session_admit(
            req.session_id,
            req.model_ref,
            task_id,
            (tokens, cost_micro(tokens, per_1k)),
            self._initial(req),
            self.cfg.ttl_ms,
            self.cfg.max_turns,
        )
        if isinstance(result, tuple):
            raise _refusal(req.session_id, *result)
        self._held[task_id] = _Held(req.session_id, prompt_est, req.kv_hint == "cold")
        return result

    def _initial(self, req: Submission) -> tuple[int | None, int | None, int | None]:
        defaults = self.cfg.budgets
        tokens, time_ms, cost = defaults.tokens, defaults.time_ms, defaults.cost
        own = req.budget
        if own is not None:
            tokens = own.tokens if own.tokens is not None else tokens
            time_ms = own.time_ms if own.time_ms is not None else time_ms
            cost = own.cost if own.cost is not None else cost
        return tokens, time_ms, None if cost is None else round(cost * MICRO)

    async def undo(self, task_id: str) -> None:
        """The admission was refused after the reservation: give back the turn and the reservation."""
        held = self._held.pop(task_id, None)
        if held is not None:
            await self.store.session_settle(held.session_id, task_id, (0, 0), 0, self.cfg.ttl_ms, undo=True)

    async def warm_replica(self, task_id: str) -> tuple[str, int] | None:
        """(replica_id, engine pid) this task's session last ran on, unless it asked for a cold start.
        Kept in the session's record, so affinity survives a scheduler restart."""
        held = self._held.get(task_id)
        if held is None or held.cold:
            return None
        record = await self.store.session(held.session_id)
        if record is None or not record.replica_id:
            return None
        return record.replica_id, record.replica_pid

    async def dispatched(
        self, task_id: str, replica_id: str, pid: int, cost_per_1k: float
    ) -> dict[str, object]:
        """Remember where the session runs now; returns its remaining budgets for decode metrics."""
        held = self._held.get(task_id)
        if held is None:
            return {}
        held.dispatched_at = time.monotonic()
        held.cost_per_1k = cost_per_1k
        record = await self.store.session_ran_on(held.session_id, replica_id, pid)
        return budget_view(record.budgets) if record else {}

    async def settle(self, task_id: str, tokens_out: int) -> None:
        """The task ended: refund what it did not use, charge its time; a no-op for sessionless tasks."""
        held = self._held.pop(task_id, None)
        if held is None:
            return
        time_ms = 0 if held.dispatched_at is None else int((time.monotonic() - held.dispatched_at) * 1000)
        used = held.prompt_est + tokens_out if held.dispatched_at is not None else 0
        await self.store.session_settle(
            held.session_id,
            task_id,
            (used, cost_micro(used, held.cost_per_1k)),
            time_ms,
            self.cfg.ttl_ms,
        )

    async def settle_record(self, record: TaskRecord, tokens_out: int) -> None:
        """:meth:`settle` for a task this process may not hold (admitted or dispatched before a
        restart): what it used comes from its record. Each reservation settles once (the store's
        step), so settling a task twice is harmless."""
        if record.task_id in self._held:
            await self.settle(record.task_id, tokens_out)
            return
        if not record.session_id:
            return
        dispatched = record.dispatched_ms > 0
        used = record.request.prompt_est + tokens_out if dispatched else 0
        per_1k = next(
            (p.cost_per_1k_tokens for _, p in self.registry.pools() if p.pool_id == record.pool_id), 0.0
        )
        await self.store.session_settle(
            record.session_id,
            record.task_id,
            (used, cost_micro(used, per_1k)),
            max(0, now_ms() - record.dispatched_ms) if dispatched else 0,
            self.cfg.ttl_ms,
        )

    async def info(self, session_id: str) -> SessionView:
        record = await self.store.session(session_id)
        if record is None:
            raise OrchestratorError(Code.NOT_FOUND, f"session {session_id} is unknown or expired")
        replica = record.replica_id or None
        return SessionView(
            record,
            kv_bytes=record.tokens_held * _bytes_per_token(self.registry, replica),
            kv_warmth=replica is not None and self.registry.replica_pid(replica) == record.replica_pid,
        )


@dataclass(frozen=True, slots=True)
class SessionView:
    """SessionInfo (SPEC §2.2): the stored session plus what the registry knows of its replica."""

    record: SessionRecord
    kv_bytes: int
    kv_warmth: bool


def _bytes_per_token(registry: PoolRegistry, replica_id: str | None) -> int:
    found = registry.find_replica(replica_id)
    return int(found[1].kv_bytes_per_token) if found else 0


def _refusal(session_id: str, what: str, detail: str) -> OrchestratorError:
    """The store's refusal as SPEC §4's envelope: `budget` (tokens | time | cost | turns) and `remaining`."""
    if what == "model":
        return invalid("session_id", f"session {session_id} belongs to model {detail}; use that model_ref")
    if what == "turns":
        message = f"session {session_id} used all its {detail} turns; start a new session"
        return OrchestratorError(Code.BUDGET_EXHAUSTED, message, budget="turns", remaining=0)
    if what == "tokens":
        message = (
            f"session {session_id} has {detail} tokens left, fewer than this task reserves "
            "(prompt + max_tokens); lower max_tokens or start a new session"
        )
        return OrchestratorError(Code.BUDGET_EXHAUSTED, message, budget="tokens", remaining=int(detail))
    if what == "cost":
        left = int(detail) / MICRO
        message = f"session {session_id} has {left:.4f} cost left, less than this task reserves"
        return OrchestratorError(Code.BUDGET_EXHAUSTED, message, budget="cost", remaining=round(left, 4))
    message = f"session {session_id} has no time budget left"
    return OrchestratorError(Code.BUDGET_EXHAUSTED, message, budget="time", remaining=max(0, int(detail)))


def budget_json(view: dict[str, object]) -> str:
    return json.dumps(view, separators=(",", ":")) if view else ""
