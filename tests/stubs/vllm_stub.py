"""A vLLM OpenAI-server look-alike: ``python tests/stubs/vllm_stub.py serve <model> --host H --port P
--max-model-len N --max-num-seqs S [--tensor-parallel-size T] [--served-model-name NAME] [--stub-...]``.

Wire format after ENGINE-PROTOCOLS.md (vLLM 0.33): ``GET /health`` 200 with an empty body (503 while the
stub "loads"; real vLLM refuses connections then), ``GET /version``, ``GET /v1/models`` (one card with
``max_model_len``), ``POST /v1/completions`` streaming ``data: {json}`` chunks (compact JSON), a usage
chunk with ``stream_options.include_usage``, and ``data: [DONE]`` (also after an error event, which is
``data: {"error": {...}}`` written by ``json.dumps``), ``GET /metrics`` with ``vllm:*`` names. Requests
beyond ``--max-num-seqs`` wait in a FIFO queue (vLLM's default: no queue cap, never 429). The served
model name is ``--served-model-name`` or else the model path. Knobs: see ``common.py``, plus
``--stub-kv-metric`` to choose the KV gauge's name (``gpu_cache_usage_perc`` as on old releases, or
``none``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler

if __package__ in (None, ""):  # run as a script: make the `tests` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.stubs.common import (
    Family,
    Fault,
    StubState,
    add_knob_flags,
    compact_json,
    int_field,
    json_body,
    json_response,
    knobs_from,
    new_app,
    parse_flags,
    prometheus_text,
    prompt_tokens,
    run,
    sse_stream,
)

VERSION = "0.33.0"
KV_METRICS = ("kv_cache_usage_perc", "gpu_cache_usage_perc", "none")


def _compact(payload: object) -> bytes:
    return compact_json(payload).encode()


def _error(status: int, message: str, kind: str, param: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return json_response(body, status=status)


class VllmStub:
    def __init__(
        self, state: StubState, model: str, served: str, max_model_len: int, max_num_seqs: int, kv: str
    ):
        self.state = state
        self.model = model
        self.served = served
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.kv = kv
        self.started = int(time.time())
        self.seqs = asyncio.Semaphore(max_num_seqs)
        self.running = 0
        self.waiting = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.success: dict[str, int] = {"stop": 0, "length": 0, "abort": 0}

    def build_app(self) -> web.Application:
        @web.middleware
        async def loading_gate(request: web.Request, handler: Handler) -> web.StreamResponse:
            # Real vLLM refuses connections while loading; the stub answers 503 (its EngineDead status).
            if self.state.loading() and not request.path.startswith("/stub/"):
                return web.Response(status=503)
            return await handler(request)

        app = new_app(self.state, middlewares=[loading_gate])
        app.router.add_get("/health", self.health)
        app.router.add_get("/ping", self.health)
        app.router.add_get("/version", self.version)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/metrics", self.metrics)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def version(self, request: web.Request) -> web.Response:
        return json_response({"version": self.state.knobs.version})

    async def models(self, request: web.Request) -> web.Response:
        card = {
            "id": self.served,
            "object": "model",
            "created": self.started,
            "owned_by": "vllm",
            "root": self.model,
            "parent": None,
            "max_model_len": self.max_model_len,
            "permission": [],
        }
        return json_response({"object": "list", "data": [card]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await json_body(request)
        if body is None:
            return _error(400, "1 validation error: body must be a JSON object", "Bad Request")
        if body.get("model") != self.served:
            return _error(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError", "model")
        prompt = body.get("prompt")
        stream = body.get("stream") is True
        options = body.get("stream_options")
        if not isinstance(prompt, str):
            return _error(400, "1 validation error: 'prompt' must be a string", "Bad Request")
        if options is not None and not stream:
            return _error(400, "Stream options can only be defined when `stream=True`.", "BadRequestError")
        try:
            max_tokens = int_field(body, "max_tokens", 16) or 0
            seed = int_field(body, "seed", 0) or 0
        except ValueError as exc:
            return _error(400, str(exc), "Bad Request")
        n_prompt = prompt_tokens(prompt)
        if n_prompt >= self.max_model_len:
            message = (
                f"This model's maximum context length is {self.max_model_len} tokens. However, your prompt "
                f"contains {n_prompt} input tokens. Please reduce the length of the input prompt."
            )
            return _error(400, message, "BadRequestError", "input_tokens")
        limit = min(max_tokens, self.max_model_len - n_prompt)  # 0.33 clamps silently
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        if not stream:  # not modelled: the adapters only stream
            return _error(400, "the stub serves only stream=true", "BadRequestError")
        resp = sse_stream()
        await resp.prepare(request)  # Starlette sends the headers before the engine produces anything
        async with self.state.track(body):
            await self._queue_and_generate(resp, prompt, seed, limit, n_prompt, include_usage, body)
        return resp

    async def _queue_and_generate(
        self,
        resp: web.StreamResponse,
        prompt: str,
        seed: int,
        limit: int,
        n_prompt: int,
        include_usage: bool,
        body: dict[str, object],
    ) -> None:
        self.waiting += 1
        try:
            await self.seqs.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        self.prompt_tokens_total += n_prompt
        rid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())

        def chunk(text: str, finish: str | None) -> bytes:
            choice = {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": finish,
                "stop_reason": None,
            }
            event = {"id": rid, "object": "text_completion", "created": created, "model": self.served}
            return b"data: " + _compact({**event, "choices": [choice]}) + b"\n\n"

        async def emit(word: str, last: bool) -> None:
            self.generation_tokens_total += 1
            await resp.write(chunk(word, "length" if last else None))

        try:
            count, eos = await self.state.produce(prompt, seed, limit, emit, body.get("ignore_eos") is True)
        except Fault as fault:
            error = {"message": fault.message, "type": "InternalServerError", "param": None, "code": 500}
            await resp.write(b"data: " + json.dumps({"error": error}).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return
        except BaseException:
            self.success["abort"] += 1
            raise
        finally:
            self.running -= 1
            self.seqs.release()
        if eos or count == 0:  # the EOS token detokenizes to "": a last chunk with no text
            await resp.write(chunk("", "stop" if eos else "length"))
        self.success["stop" if eos else "length"] += 1
        if include_usage:
            usage = {"prompt_tokens": n_prompt, "total_tokens": n_prompt + count, "completion_tokens": count}
            event = {"id": rid, "object": "text_completion", "created": created, "model": self.served}
            await resp.write(b"data: " + _compact({**event, "choices": [], "usage": usage}) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()

    async def metrics(self, request: web.Request) -> web.Response:
        labels = {"engine": "0", "model_name": self.served}
        families: list[Family] = [
            (
                "vllm:num_requests_running",
                "gauge",
                "Requests in model execution batches.",
                [(labels, self.running)],
            ),
            (
                "vllm:num_requests_waiting",
                "gauge",
                "Requests waiting to be processed.",
                [(labels, self.waiting)],
            ),
            (
                "vllm:prompt_tokens_total",
                "counter",
                "Prefill tokens processed.",
                [(labels, self.prompt_tokens_total)],
            ),
            (
                "vllm:generation_tokens_total",
                "counter",
                "Generation tokens processed.",
                [(labels, self.generation_tokens_total)],
            ),
            (
                "vllm:request_success_total",
                "counter",
                "Finished requests.",
                [({**labels, "finished_reason": reason}, count) for reason, count in self.success.items()],
            ),
        ]
        if self.kv != "none":
            usage = self.running / self.max_num_seqs
            families.append(
                (f"vllm:{self.kv}", "gauge", "KV-cache usage. 1 means 100 percent usage.", [(labels, usage)])
            )
        return web.Response(text=prometheus_text(families), content_type="text/plain", charset="utf-8")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vllm", description="vLLM OpenAI-server stub")
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("model")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--stub-kv-metric", choices=KV_METRICS, default="kv_cache_usage_perc")
    add_knob_flags(parser, VERSION)
    ns = parse_flags(parser, argv)
    stub = VllmStub(
        StubState(knobs_from(ns)),
        model=ns.model,
        served=ns.served_model_name or ns.model,
        max_model_len=ns.max_model_len,
        max_num_seqs=ns.max_num_seqs,
        kv=ns.stub_kv_metric,
    )
    run([(stub.build_app(), ns.host, ns.port)])


if __name__ == "__main__":
    main()
