"""The compatible API on the real llama-server + SmolLM2, with the official `openai` SDK as the client."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import openai

from llorch.adapters.llamacpp import LlamaCppAdapter

MESSAGES = [{"role": "user", "content": "Name one colour."}]


def _stack(stack_factory: Any, llama_server_bin: Path, model_gguf: Path) -> Any:
    common = {
        "engine": "llamacpp",
        "devices": "cpu",
        "allow_cpu": True,
        "ctx": 2048,
        "slots": 1,
        "engine_bin": str(llama_server_bin),
        "queue": {"capacity": 8, "full_policy": "reject"},
    }
    return stack_factory(
        models=[
            {"id": "smollm2-135m", "path": str(model_gguf)},
            {"id": "smollm2-embed", "path": str(model_gguf)},
        ],
        pools=[
            {**common, "id": "smollm2-chat", "model": "smollm2-135m", "engine_args": ["--threads", "2"]},
            {
                **common,
                "id": "smollm2-embed",
                "model": "smollm2-embed",
                "workloads": ["embedding"],
                # SmolLM2 declares no pooling; the OpenAI embeddings route needs one.
                "engine_args": ["--threads", "2", "--pooling", "mean"],
            },
        ],
    )


async def test_chat_uses_the_template_is_deterministic_and_embeds(
    stack_factory: Any,
    llama_server_bin: Path,
    model_gguf: Path,
    ready_adapter: LlamaCppAdapter,
    http: aiohttp.ClientSession,
) -> None:
    stack = _stack(stack_factory, llama_server_bin, model_gguf)
    await stack.start()
    await stack.wait_pools_ready("smollm2-chat", "smollm2-embed", timeout_s=120)
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=stack.token)

    answer = client.chat.completions.create(model="smollm2-135m", messages=MESSAGES, max_tokens=12)
    assert answer.choices[0].message.content
    # The engine counted the prompt the model's chat template renders, not the bare message.
    direct = ready_adapter.base_url
    async with http.post(f"{direct}/apply-template", json={"messages": MESSAGES}) as r:
        rendered = (await r.json())["prompt"]
    async with http.post(f"{direct}/tokenize", json={"content": rendered}) as r:
        templated = len((await r.json())["tokens"])
    async with http.post(f"{direct}/tokenize", json={"content": MESSAGES[0]["content"]}) as r:
        bare = len((await r.json())["tokens"])
    assert answer.usage is not None and abs(answer.usage.prompt_tokens - templated) <= 1
    assert templated > bare + 4 and "<|im_start|>" in rendered

    runs = []
    for _ in range(2):
        stream = client.chat.completions.create(
            model="smollm2-135m",
            messages=MESSAGES,
            max_tokens=16,
            seed=4321,
            temperature=0.8,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        runs.append([c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content])
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(runs[-1])
    assert runs[0] == runs[1] and runs[0]

    embedded = client.embeddings.create(model="smollm2-embed", input=["a red apple", "a green pear"])
    first, second = (d.embedding for d in embedded.data)
    assert len(first) == len(second) > 100 and first != second
    again = client.embeddings.create(model="smollm2-embed", input="a red apple").data[0].embedding
    assert max(abs(a - b) for a, b in zip(first, again, strict=True)) < 1e-4
