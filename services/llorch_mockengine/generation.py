"""Deterministic output and llama-server's wire encoding, for the mock engine.

Token k of a completion is ``" " + WORDS[r_k]`` where ``r`` is a ``random.Random`` seeded with
``sha256(f"{model_digest}|{prompt}|{seed}")``: the same model file, prompt and seed give the same text.
"""

from __future__ import annotations

import hashlib
import json
import random
import zlib
from collections.abc import Iterator
from typing import Final

_WORD_LIST: Final = """
the of and to in is was for on that with as by at from his her they this have are be not had but one
all were when there can an which their said if do will each about how up out them then she many some
so these would other into has more two like him see time could no make than first been its who now
people my made over did down only way find use may water long little very after words called just
where most know get through back much before go good new write our used me man too any day same
right look think also around another came come work three word must because does part even place
well such here take why things help put years different away again off went old number great tell
men say small every found still between name should home big give air line set own under read last
never us left end along while might next sound below saw something thought both few those always
looked show large often together asked house world going want school important until form food keep
children feet land side without boy once animals life enough took sometimes four head above kind
began almost live page got earth need far hand high year mother light parts country father let night
following picture being study second eyes soon times story boys since white days ever paper hard
near sentence better best across during today others however sure means
"""
WORDS: Final[tuple[str, ...]] = tuple(_WORD_LIST.split())
"""The fixed 256-word vocabulary of the mock (SPEC §8)."""
TOKEN_ID_BASE: Final = 1000
"""Word ``i`` is token id ``TOKEN_ID_BASE + i``."""
NO_MODEL_DIGEST: Final = "none"

CHATML_TEMPLATE: Final = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
BOS_TOKEN: Final = "<|im_start|>"
EOS_TOKEN: Final = "<|im_end|>"

_CONTENT_JSON: Final = tuple(json.dumps(" " + word).encode() for word in WORDS)
_TOKEN_CHUNK: Final = (
    b'data: {"index":0,"content":%b,"tokens":[%d],"stop":false,"id_slot":-1,'
    b'"tokens_predicted":%d,"tokens_evaluated":%d}\n\n'
)


def file_digest(path: str | None) -> str:
    """sha256 of the model file in hex, or ``"none"`` when the mock runs without ``--model``."""
    if path is None:
        return NO_MODEL_DIGEST
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def prompt_tokens(prompt: str) -> int:
    """The mock's prompt length estimate: one token per 4 UTF-8 bytes, at least one."""
    return max(1, -(-len(prompt.encode()) // 4))


def word_indices(model_digest: str, prompt: str, seed: int) -> Iterator[int]:
    """The endless, deterministic sequence of word indices for one completion."""
    key = hashlib.sha256(f"{model_digest}|{prompt}|{seed}".encode()).digest()
    rng = random.Random(int.from_bytes(key, "big"))
    n = len(WORDS)
    while True:
        yield rng.randrange(n)


def completion_text(model_digest: str, prompt: str, seed: int, n_tokens: int) -> str:
    """The text of the first ``n_tokens`` tokens; what a client should see from the mock."""
    stream = word_indices(model_digest, prompt, seed)
    return "".join(" " + WORDS[next(stream)] for _ in range(n_tokens))


def token_chunk(word: int, tokens_predicted: int, tokens_evaluated: int) -> bytes:
    """One streamed token in llama-server's exact chunk format (a template, not ``json.dumps``)."""
    return _TOKEN_CHUNK % (_CONTENT_JSON[word], TOKEN_ID_BASE + word, tokens_predicted, tokens_evaluated)


def compact_json(payload: object) -> str:
    return json.dumps(payload, separators=(",", ":"))


def sse_event(payload: object) -> bytes:
    return b"data: " + compact_json(payload).encode() + b"\n\n"


def tokenize(text: str) -> list[tuple[int, str]]:
    """Split into 4-byte pieces (matching :func:`prompt_tokens`) with a stable id per piece."""
    raw = text.encode()
    pieces = [raw[i : i + 4] for i in range(0, len(raw), 4)]
    return [(zlib.crc32(piece) % 49152, piece.decode(errors="replace")) for piece in pieces]


def message_text(content: object) -> str:
    """A message's text: a string, or the concatenated ``text`` of ``{"type": "text"}`` parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for part in content:
            text = part.get("text") if isinstance(part, dict) and part.get("type") == "text" else None
            if not isinstance(text, str):
                raise ValueError('content parts must be {"type": "text", "text": <string>} (no media here)')
            texts.append(text)
        return "".join(texts)
    raise ValueError("message content must be a string or a list of text parts")


def _render_message(message: object) -> str:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise ValueError("each message needs a string 'role'")
    role: str = message["role"]
    if "content" not in message and "tool_calls" not in message:
        raise ValueError("Expected 'content' or 'tool_calls' in each message")
    text = message_text(message.get("content"))
    if role == "tool" and not isinstance(message.get("tool_call_id", ""), str):
        raise ValueError("'tool_call_id' must be a string")
    tool_calls = message.get("tool_calls")
    if tool_calls is not None:
        if role != "assistant" or not isinstance(tool_calls, list):
            raise ValueError("'tool_calls' must be a list, on an assistant message")
        text += ("\n" if text else "") + compact_json(tool_calls)  # a tool-calling model emits them as JSON
    return f"<|im_start|>{role}\n{text}<|im_end|>\n"


def apply_chatml(messages: object, add_generation_prompt: bool = True) -> str:
    """A built-in ChatML rendering (the template SmolLM2-Instruct ships), as ``/apply-template`` returns.

    Content may be a string or a list of text parts; ``tool`` messages and assistant ``tool_calls``
    (rendered as their JSON) are accepted, so a tool-use conversation renders to one prompt.
    """
    if not isinstance(messages, list):
        raise ValueError("'messages' must be a list")
    out = [_render_message(message) for message in messages]
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)
