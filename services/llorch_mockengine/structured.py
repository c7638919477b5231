"""Structured chat answers: a deterministic tool call or a JSON document, sampled from a JSON schema.

A real server constrains sampling with a grammar built from the schema; the mock samples one valid
value from it instead (seeded like the text, so the same prompt and seed give the same document) and
streams its JSON text in small pieces, each counting as one token.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Final

from llorch_mockengine.generation import WORDS, compact_json

PIECE_CHARS: Final = 4
"""A structured answer is streamed in pieces of this many characters (one token each)."""
_MAX_DEPTH: Final = 12
_UNBOUNDED: Final = 1_000_000
_TOOL_CHOICES: Final = ("none", "auto", "required")
_FORMATS: Final = ("text", "json_object", "json_schema")

Json = object


@dataclass(frozen=True, slots=True)
class ToolCall:
    """Answer with one call of ``name``; ``schema`` is the function's ``parameters``."""

    name: str
    schema: Json


@dataclass(frozen=True, slots=True)
class JsonDocument:
    """Answer with a JSON document valid against ``schema`` (None: a small ``{"answer": ...}`` object)."""

    schema: Json | None


Plan = ToolCall | JsonDocument


@dataclass(frozen=True, slots=True)
class Structured:
    """The sampled answer: the JSON text in stream pieces, and the tool call id when it is a call."""

    plan: Plan
    text: str
    call_id: str

    @property
    def pieces(self) -> list[str]:
        return [self.text[i : i + PIECE_CHARS] for i in range(0, len(self.text), PIECE_CHARS)]


def _function(value: object, what: str) -> tuple[str, dict[str, Json]]:
    """``value["function"]`` and its name, as in a tool or a named ``tool_choice``."""
    function = value.get("function") if isinstance(value, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(function, dict) or not isinstance(name, str) or not name:
        raise ValueError(f"{what} needs a 'function' with a string 'name'")
    return name, function


def _tools(body: dict[str, object]) -> dict[str, Json]:
    """``tools`` as ``{name: parameters schema}``, in request order."""
    raw = body.get("tools")
    if raw is None:
        return {}
    if not isinstance(raw, list):
        raise ValueError("'tools' must be an array")
    tools: dict[str, Json] = {}
    for tool in raw:
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise ValueError('each tool must be {"type": "function", "function": {...}}')
        name, function = _function(tool, "each tool")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise ValueError(f"the parameters of tool {name!r} must be a JSON schema object")
        tools[name] = parameters
    return tools


def _chosen_tool(body: dict[str, object], last_user_text: str) -> ToolCall | None:
    tools = _tools(body)
    choice = body.get("tool_choice", "auto")
    if isinstance(choice, dict):
        name, _ = _function(choice, "'tool_choice'")
        if name not in tools:
            raise ValueError(f"'tool_choice' names the function {name!r}, which is not in 'tools'")
        return ToolCall(name, tools[name])
    if choice not in _TOOL_CHOICES:
        raise ValueError(f"Invalid tool_choice: {choice}")
    if not tools or choice == "none":
        return None
    if choice == "required":
        name = next(iter(tools))
        return ToolCall(name, tools[name])
    mentioned = next((name for name in tools if name in last_user_text), None)
    return None if mentioned is None else ToolCall(mentioned, tools[mentioned])


def _document(body: dict[str, object]) -> JsonDocument | None:
    fmt = body.get("response_format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if not isinstance(fmt, dict) or kind not in _FORMATS:
        raise ValueError(
            f'response_format type must be one of "text", "json_object", "json_schema", not {kind}'
        )
    if kind == "text":
        return None
    if kind == "json_object":  # llama-server also takes a schema here
        return JsonDocument(fmt.get("schema"))
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict | bool):
        raise ValueError("response_format json_schema needs a 'json_schema' object with a 'schema'")
    return JsonDocument(spec["schema"])


def plan_answer(body: dict[str, object], last_user_text: str) -> Plan | None:
    """The structured answer a chat request asks for, or None for free text; a tool call wins."""
    tool = _chosen_tool(body, last_user_text)
    document = _document(body)
    return tool if tool is not None else document


def sample_answer(plan: Plan, model_digest: str, prompt: str, seed: int) -> Structured:
    """Sample the answer deterministically from (model, prompt, seed)."""
    key = hashlib.sha256(f"{model_digest}|{prompt}|{seed}|structured".encode()).digest()
    rng = random.Random(int.from_bytes(key, "big"))
    if isinstance(plan, JsonDocument) and plan.schema is None:
        value: Json = {"answer": " ".join(rng.choice(WORDS) for _ in range(4))}
    else:
        value = _Sampler(plan.schema, rng).sample(plan.schema, 0)
    return Structured(plan, compact_json(value), "call_" + key.hex()[:24])


class _Sampler:
    """One value valid against a JSON schema (the common keywords; ``$ref`` into the same document)."""

    def __init__(self, root: Json, rng: random.Random) -> None:
        self._root = root
        self._rng = rng

    def sample(self, schema: Json, depth: int) -> Json:
        if not isinstance(schema, dict) or depth > _MAX_DEPTH:
            return self._word()
        if "$ref" in schema:
            return self.sample(self._resolve(schema["$ref"]), depth + 1)
        if "const" in schema:
            return schema["const"]
        enum = schema.get("enum")
        if isinstance(enum, list) and enum:
            return enum[0]
        for key in ("anyOf", "oneOf", "allOf"):
            options = schema.get(key)
            if isinstance(options, list) and options:
                return self.sample(options[0], depth + 1)
        kind = schema.get("type")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), "null")
        if kind is None:
            kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
        return self._typed(str(kind), schema, depth)

    def _typed(self, kind: str, schema: dict[str, Json], depth: int) -> Json:
        if kind == "object":
            props = schema.get("properties")
            if not isinstance(props, dict):
                return {}
            return {name: self.sample(sub, depth + 1) for name, sub in props.items()}
        if kind == "array":
            count = max(1, _int(schema.get("minItems"), 1))
            count = min(count, _int(schema.get("maxItems"), count))
            return [self.sample(schema.get("items", {}), depth + 1) for _ in range(count)]
        if kind == "integer":
            return self._rng.randint(*_bounds(schema, 0, 100))
        if kind == "number":
            low, high = _bounds(schema, 0, 100)
            return self._rng.randint(low, high - 1) + 0.5 if high > low else float(low)
        if kind == "boolean":
            return self._rng.random() < 0.5
        if kind == "null":
            return None
        return self._string(schema)

    def _word(self) -> str:
        return self._rng.choice(WORDS)

    def _string(self, schema: dict[str, Json]) -> str:
        text = self._word()
        while len(text) < _int(schema.get("minLength"), 0):
            text += " " + self._word()
        return text[: _int(schema.get("maxLength"), len(text))]

    def _resolve(self, ref: Json) -> Json:
        if not isinstance(ref, str) or not ref.startswith("#"):
            return {}
        node = self._root
        for part in ref.lstrip("#").split("/"):
            if part:
                node = node.get(part, {}) if isinstance(node, dict) else {}
        return node


def _int(value: Json, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _bounds(schema: dict[str, Json], low: int, high: int) -> tuple[int, int]:
    """An integer range inside the schema's bounds, near ``low..high`` when the schema leaves room."""

    def number(key: str) -> float | None:
        value = schema.get(key)
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

    lo = number("minimum")
    x_lo = number("exclusiveMinimum")
    hi = number("maximum")
    x_hi = number("exclusiveMaximum")
    least = max(
        -_UNBOUNDED if lo is None else -(-lo // 1),
        -_UNBOUNDED if x_lo is None else x_lo // 1 + 1,
    )
    most = min(_UNBOUNDED if hi is None else hi // 1, _UNBOUNDED if x_hi is None else -(-x_hi // 1) - 1)
    start = int(max(least, min(low, most)))
    end = int(min(most, max(high, start)))
    return start, max(start, end)
