"""The mock engine's state: knobs, model digest, loading phase, slots and counters."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from llorch_mockengine.generation import file_digest
from llorch_mockengine.knobs import Knobs

log = logging.getLogger(__name__)

ANY_SLOT = -1


@dataclass(slots=True)
class Slot:
    id: int
    busy: bool = False
    id_task: int = -1
    n_prompt_tokens: int = 0
    n_decoded: int = 0
    n_remain: int = 0
    n_cached: int = 0

    def as_json(self, n_ctx: int) -> dict[str, object]:
        """The ``/slots`` entry: llama-server shows task fields only while the slot is processing."""
        body: dict[str, object] = {
            "id": self.id,
            "n_ctx": n_ctx,
            "speculative": False,
            "is_processing": self.busy,
        }
        if self.busy:
            body["id_task"] = self.id_task
            body["n_prompt_tokens"] = self.n_prompt_tokens
            body["next_token"] = [
                {
                    "has_next_token": True,
                    "has_new_line": False,
                    "n_remain": self.n_remain,
                    "n_decoded": self.n_decoded,
                }
            ]
        return body


@dataclass(slots=True, eq=False)
class _Waiter:
    want: int
    future: asyncio.Future[Slot]


class SlotPool:
    """``--parallel`` slots. A request that finds none free waits in FIFO order (llama-server defers it)."""

    def __init__(self, count: int) -> None:
        self._slots = [Slot(i) for i in range(count)]
        self._count = count
        self._waiters: deque[_Waiter] = deque()
        self.deferred_total = 0

    @property
    def slots(self) -> list[Slot]:
        return self._slots[: self._count]

    @property
    def deferred(self) -> int:
        return len(self._waiters)

    @property
    def processing(self) -> int:
        return sum(1 for slot in self._slots if slot.busy)

    def _free_slot(self, want: int) -> Slot | None:
        if want != ANY_SLOT:
            slot = self._slots[want] if 0 <= want < self._count else None
            return slot if slot is not None and not slot.busy else None
        return next((slot for slot in self._slots[: self._count] if not slot.busy), None)

    def valid(self, want: int) -> bool:
        return want == ANY_SLOT or 0 <= want < self._count

    async def acquire(self, want: int = ANY_SLOT) -> Slot:
        if not self._waiters:
            slot = self._free_slot(want)
            if slot is not None:
                slot.busy = True
                return slot
        waiter = _Waiter(want, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        self._hand_over()
        if waiter.future.done():
            return waiter.future.result()
        self.deferred_total += 1
        try:
            return await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self.release(waiter.future.result())
            else:
                self._waiters.remove(waiter)
            raise

    def release(self, slot: Slot) -> None:
        slot.busy = False
        slot.id_task = -1
        self._hand_over()

    def resize(self, count: int) -> None:
        """Change the slot count at runtime; busy slots beyond the new count finish their task first."""
        while len(self._slots) < count:
            self._slots.append(Slot(len(self._slots)))
        self._count = count
        self._hand_over()

    def _hand_over(self) -> None:
        for waiter in list(self._waiters):
            if waiter.future.done():
                self._waiters.remove(waiter)
                continue
            slot = self._free_slot(waiter.want)
            if slot is not None:
                slot.busy = True
                self._waiters.remove(waiter)
                waiter.future.set_result(slot)


@dataclass(slots=True)
class Counters:
    """What ``/metrics`` and ``/mock/stats`` report."""

    requests_total: int = 0
    aborted_total: int = 0
    active: int = 0
    prompt_tokens_total: int = 0
    prompt_seconds_total: float = 0.0
    tokens_predicted_total: int = 0
    tokens_predicted_seconds_total: float = 0.0
    n_decode_total: int = 0
    n_tokens_max: int = 0


@dataclass(slots=True)
class Engine:
    """Everything the handlers share; one per process, built in ``__main__``."""

    knobs: Knobs
    slots: SlotPool = field(init=False)
    counters: Counters = field(default_factory=Counters)
    model_digest: str = ""
    loaded: bool = False
    started_at: float = field(default_factory=time.time)
    _loading_until: float = field(default=0.0)
    _next_task: int = 0
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.slots = SlotPool(self.knobs.parallel)
        self._loading_until = time.monotonic() + self.knobs.start_delay_ms / 1000

    def loading(self) -> bool:
        return not self.loaded or time.monotonic() < self._loading_until

    def next_task_id(self) -> int:
        self._next_task += 1
        return self._next_task

    async def load(self) -> bool:
        """The load phase: hash the model file. False = the load failed and the process should exit 1.

        ``/health`` says "Loading model" until this is done and the start delay (which
        ``/mock/control`` may change meanwhile) has passed; ``--preload-fail exit`` fails at its end.
        """
        try:
            model = self.knobs.model
            self.model_digest = await asyncio.to_thread(file_digest, model) if model else file_digest(None)
        except OSError as exc:
            log.error("failed to load model %s: %s", self.knobs.model, exc)
            return False
        if self.knobs.preload_fail in ("exit", "oom"):
            while (remaining_s := self._loading_until - time.monotonic()) > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.knobs_changed(), remaining_s)
            if self.knobs.preload_fail == "oom":  # llama-server's words when the weights do not fit
                log.error("ggml_backend_cuda_buffer_type_alloc_buffer: CUDA out of memory (mock)")
            log.error("failed to load model %s: --preload-fail %s", self.knobs.model, self.knobs.preload_fail)
            return False
        self.loaded = True
        return True

    async def knobs_changed(self) -> None:
        """Wait for the next ``/mock/control`` change (a hung stream re-checks its knobs then)."""
        await self._changed.wait()

    def apply(self, changes: dict[str, object]) -> None:
        """Apply validated ``/mock/control`` changes; slot count and loading window take effect now."""
        for key, value in changes.items():
            setattr(self.knobs, key, value)
        if "parallel" in changes:
            self.slots.resize(self.knobs.parallel)
        if "start_delay_ms" in changes:
            self._loading_until = time.monotonic() + self.knobs.start_delay_ms / 1000
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def stats(self) -> dict[str, int]:
        c = self.counters
        return {
            "requests_total": c.requests_total,
            "aborted_total": c.aborted_total,
            "active": c.active,
            "processing": self.slots.processing,
            "deferred": self.slots.deferred,
            "deferred_total": self.slots.deferred_total,
        }
