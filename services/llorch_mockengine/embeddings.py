"""``POST /v1/embeddings``: deterministic unit vectors, served when started with ``--embeddings``.

Vector ``i`` of a text is drawn from ``random.Random`` seeded with ``sha256(f"{model_digest}|{text}")``
and L2-normalised, so the same model file and text always give the same vector.
"""

from __future__ import annotations

import base64
import hashlib
import math
import random
import struct

from aiohttp import web

from llorch_mockengine.engine import Engine
from llorch_mockengine.generation import prompt_tokens
from llorch_mockengine.replies import bad_request, context_exceeded, error_response, json_response

_NOT_ENABLED = "This server does not support embeddings. Start it with `--embeddings`"


def embed(model_digest: str, text: str, dim: int) -> list[float]:
    """The mock's embedding of ``text``: ``dim`` floats with an L2 norm of 1."""
    key = hashlib.sha256(f"{model_digest}|{text}".encode()).digest()
    rng = random.Random(int.from_bytes(key, "big"))
    vector = [rng.gauss(0.0, 1.0) for _ in range(dim)]
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]


def _inputs(body: object) -> tuple[list[str], bool]:
    """The input texts, and whether base64 was asked for."""
    if not isinstance(body, dict):
        raise ValueError("request body must be a JSON object")
    raw = body.get("input", body.get("content"))
    texts = [raw] if isinstance(raw, str) else raw
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("'input' must be a string or a non-empty array of strings")
    if any(not text for text in texts):
        raise ValueError("Input content cannot be empty")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise ValueError("The format to return the embeddings in. Can be either float or base64")
    return texts, encoding == "base64"


async def handle_embeddings(request: web.Request, engine: Engine) -> web.Response:
    knobs = engine.knobs
    if not knobs.embedding:
        return error_response(501, _NOT_ENABLED, "not_supported_error")
    try:
        texts, as_base64 = _inputs(await request.json())
    except (ValueError, RecursionError) as exc:  # RecursionError: JSON nested too deep to parse
        return bad_request(str(exc))
    counts = [prompt_tokens(text) for text in texts]
    for n_prompt in counts:
        too_long = context_exceeded(n_prompt, knobs.n_ctx_slot)
        if too_long is not None:
            return too_long
    data: list[dict[str, object]] = []
    for index, text in enumerate(texts):
        vector = embed(engine.model_digest, text, knobs.embedding_dim)
        encoded: object = vector
        if as_base64:
            encoded = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"embedding": encoded, "index": index, "object": "embedding"})
    total = sum(counts)
    return json_response(
        {
            "model": knobs.alias or knobs.model or "mock",
            "object": "list",
            "usage": {"prompt_tokens": total, "total_tokens": total},
            "data": data,
        }
    )
