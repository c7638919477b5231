"""What a client asked for, as the scheduler's domain code sees it (the gRPC edge converts)."""

from __future__ import annotations

from dataclasses import dataclass

from llorch.store import Priority
from llorch.v1 import scheduler_pb2


@dataclass(frozen=True, slots=True)
class Budget:
    """A session's starting budgets, used only when this task creates its session (None: default)."""

    tokens: int | None = None
    time_ms: int | None = None
    cost: float | None = None


@dataclass(frozen=True, slots=True)
class Submission:
    """An admission request after the gateway's shape checks; 0 and '' mean "the default"."""

    model_ref: str
    prompt: str | None = None  # None: the first of `inputs`
    inputs: tuple[str, ...] = ()
    task_id: str = ""
    session_id: str = ""
    workload: str = "completion"
    engine: str = ""
    ctx: int = 0
    priority: Priority = "interactive"
    max_tokens: int = 0
    deadline_ms: int = 0
    seed: int | None = None
    determinism: str = ""
    sampler_profile_version: str = ""
    expected_tokens: int = 0
    kv_hint: str = ""
    client: str = ""
    budget: Budget | None = None
    body: str = ""  # the client's OpenAI fields for the engine, as JSON (AdmitRequest.body_json)

    @property
    def text(self) -> str:
        """The prompt, the first input of a multi-input workload, or a chat's request (its size
        stands for the rendered chat's in the estimates)."""
        if self.workload == "chat":
            return self.body
        if self.prompt is not None:
            return self.prompt
        return self.inputs[0] if self.inputs else ""


def submission_of(req: scheduler_pb2.AdmitRequest) -> Submission:
    budget = None
    if req.HasField("budget"):
        b = req.budget
        budget = Budget(
            b.tokens if b.HasField("tokens") else None,
            b.time_ms if b.HasField("time_ms") else None,
            b.cost if b.HasField("cost") else None,
        )
    return Submission(
        model_ref=req.model_ref,
        prompt=req.prompt if req.HasField("prompt") else None,
        inputs=tuple(req.inputs),
        task_id=req.task_id,
        session_id=req.session_id,
        workload=req.workload or "completion",
        engine=req.engine,
        ctx=req.ctx,
        priority="batch" if req.priority == "batch" else "interactive",
        max_tokens=req.max_tokens,
        deadline_ms=req.deadline_ms,
        seed=req.seed if req.HasField("seed") else None,
        determinism=req.determinism,
        sampler_profile_version=req.sampler_profile_version,
        expected_tokens=req.expected_tokens,
        kv_hint=req.kv_hint,
        client=req.client,
        budget=budget,
        body=req.body_json,
    )
