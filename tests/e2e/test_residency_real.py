"""On-demand residency (issue 13) with the real llama-server + SmolLM2, public API only.

Two on-demand pools serve SmolLM2 under two catalog ids (the second is the same GGUF with bytes
appended, so its digest and set differ). They run on the CPU, whose memory budget for the ledger
(``residency.cpu_memory_mib``) is set to hold one of them and not two: every switch from one model to
the other evicts the idle one and loads the other. Interleaved tasks for the two models all end.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.support.stack import Client, SseEvent

MODELS = ("smollm2-a", "smollm2-b")
RAM_FACTOR = 1.2  # a CPU pool's default ram_factor: its ledger need is model bytes x this


def _pool(pool_id: str, model: str, llama_server_bin: Path) -> dict[str, Any]:
    return {
        "id": pool_id,
        "engine": "llamacpp",
        "model": model,
        "devices": "cpu",
        "allow_cpu": True,
        "ctx": 1024,
        "slots": 1,
        "residency": "on-demand",
        "engine_bin": str(llama_server_bin),
        "engine_args": ["--threads", "1"],
        "queue": {"capacity": 16, "full_policy": "reject"},
    }


async def _loads(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with http.get(f"{url}/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("model_loads_total", "model_evictions_total"):
                key = f"{sample.name}:{sample.labels['model']}:{sample.labels['reason']}"
                out[key] = sample.value
    return out


def _second_model(model_gguf: Path, tmp_path: Path) -> tuple[Path, float]:
    """The copy with bytes appended, and its ledger need in MiB."""
    second = tmp_path / "smollm2-b.gguf"
    second.write_bytes(model_gguf.read_bytes() + b"\nllorch residency e2e\n")
    return second, second.stat().st_size * RAM_FACTOR / (1 << 20)


async def test_two_on_demand_models_alternate_when_only_one_fits(
    stack_factory: Any, http: aiohttp.ClientSession, llama_server_bin: Path, model_gguf: Path, tmp_path: Path
) -> None:
    second, need_mib = _second_model(model_gguf, tmp_path)
    stack = stack_factory(
        models=[{"id": MODELS[0], "path": str(model_gguf)}, {"id": MODELS[1], "path": str(second)}],
        pools=[_pool("smol-a", MODELS[0], llama_server_bin), _pool("smol-b", MODELS[1], llama_server_bin)],
        extra={"residency": {"cpu_memory_mib": math.ceil(need_mib * 1.5), "min_residency_s": 0}},
    )
    await stack.start()
    client = Client(stack, http)

    # Interleaved: a, b, a, b, each pair submitted together so that the second waits for a swap.
    ids: list[tuple[str, str]] = []
    for round_ in range(2):
        for model in MODELS:
            body = {"model_ref": model, "prompt": f"Count to ten, round {round_}.", "max_tokens": 8}
            ids.append((model, await client.admit(**body)))
    results: list[list[SseEvent]] = await asyncio.gather(*(client.events(t) for _, t in ids))
    for (model, task_id), events in zip(ids, results, strict=True):
        assert events[-1].event == "end", (model, task_id, events[-1])
        assert events[-1].data["tokens_out"] >= 1
        assert events[-1].data["pool_id"] == ("smol-a" if model == MODELS[0] else "smol-b")

    counts = await _loads(http, stack.url)
    loads = sum(v for k, v in counts.items() if k.startswith("model_loads_total") and k.endswith(":demand"))
    swaps = sum(v for k, v in counts.items() if k.startswith("model_evictions_total") and k.endswith(":swap"))
    assert loads >= 2 and swaps >= 1, counts  # they never ran side by side: one was evicted for the other
    assert not any(k.endswith(":failed") for k in counts), counts
