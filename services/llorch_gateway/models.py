"""Request models of the native API (SPEC §2.2): strict types, unknown fields rejected."""

from __future__ import annotations

import json
from typing import Annotated, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from llorch.errors import OrchestratorError, invalid
from llorch.ids import ID_PATTERN, SEED_MAX

Id = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
MAX_INT32 = 2**31 - 1
M = TypeVar("M", bound=BaseModel)


class Budget(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    tokens: Annotated[int, Field(ge=0, le=MAX_INT32)] | None = None
    time_ms: Annotated[int, Field(ge=0, le=MAX_INT32)] | None = None
    cost: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None


class TaskRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    task_id: Id | None = None
    session_id: Id | None = None
    workload: Literal["completion", "embedding", "rerank"] = "completion"
    model_ref: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    engine: Literal["llamacpp", "vllm", "tgi", "triton", "mock"] | None = None
    ctx: Annotated[int, Field(ge=0, le=1_048_576)] = 0
    priority: Literal["interactive", "batch"] = "interactive"
    max_tokens: Annotated[int, Field(ge=1, le=1_048_576)] | None = None
    deadline_ms: Annotated[int, Field(le=2**53)] | None = None
    seed: Annotated[int, Field(ge=0, le=SEED_MAX)] | None = None
    determinism: Literal["strict", "best_effort"] | None = None
    sampler_profile_version: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = None
    prompt: str | None = None
    inputs: Annotated[list[str], Field(min_length=1, max_length=64)] | None = None
    expected_tokens: Annotated[int, Field(ge=1, le=1_048_576)] | None = None
    kv_hint: Literal["reuse", "cold"] = "reuse"
    budget: Budget | None = None

    @field_validator("prompt", "inputs")
    @classmethod
    def _encodable(cls, value: str | list[str] | None) -> str | list[str] | None:
        for text in [value] if isinstance(value, str) else value or []:
            try:
                text.encode()
            except UnicodeEncodeError:
                raise ValueError("text must be valid Unicode (no lone surrogates)") from None
        return value

    @model_validator(mode="after")
    def _one_input(self) -> TaskRequest:
        if self.prompt is None and self.inputs is None:
            raise ValueError("one of prompt or inputs is required")
        if self.workload == "completion" and self.inputs is not None and len(self.inputs) != 1:
            raise ValueError("a completion takes exactly one item in inputs")
        if (
            self.expected_tokens is not None
            and self.max_tokens is not None
            and self.expected_tokens > self.max_tokens
        ):
            raise ValueError("expected_tokens must be at most max_tokens")
        return self


class DrainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    deadline_ms: Annotated[int, Field(ge=1, le=3_600_000)]


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    new_model_ref: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}$")]


def parse_json_object(body: bytes) -> dict[str, object]:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # bad JSON, bad UTF-8, or an integer past Python's digit limit
        raise invalid("body", "the body must be a UTF-8 JSON object") from None
    if not isinstance(data, dict):
        raise invalid("body", "the body must be a JSON object")
    return data


def parse_model(model: type[M], data: dict[str, object]) -> M:
    """Validate ``data``; the first problem becomes INVALID_PARAMS naming its field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _invalid_from(exc) from None


def _invalid_from(exc: ValidationError) -> OrchestratorError:
    first = exc.errors(include_url=False, include_input=False)[0]
    field = ".".join(str(part) for part in first["loc"]) or "body"
    if first["type"] == "extra_forbidden":
        return invalid(field, f"unknown field {field!r}")
    message = str(first["msg"]).removeprefix("Value error, ")
    return invalid(field, f"{field}: {message}" if field != "body" else message)
