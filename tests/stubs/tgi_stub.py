"""A text-generation-inference look-alike: ``python tests/stubs/tgi_stub.py --model-id M --hostname H
--port P --max-total-tokens N --max-concurrent-requests C [--num-shard S] [--stub-...]``.

Wire format after ENGINE-PROTOCOLS.md (TGI v3.3.7 router): ``GET /health`` 200 with an empty body (503
``{"error":"unhealthy","error_type":"healthcheck"}`` while the stub "loads"; real TGI refuses connections
then), ``GET /info`` (v3 field names), ``POST /generate_stream`` answering ``data:{json}`` events (no
space, compact JSON, no ``[DONE]``: the body ends after the event with ``details``), ``POST /generate``
(non-streaming), ``GET /metrics`` with ``tgi_*`` names. Past ``--max-concurrent-requests`` a request is
refused as TGI does: on ``/generate_stream`` with HTTP 200 and the event
``data:{"error":"Model is overloaded","error_type":"overloaded"}``, on ``/generate`` with HTTP 429 and
that body. Parameters are validated like TGI's router (``temperature`` > 0, 0 < ``top_p`` < 1,
``top_k`` > 0, ``inputs`` tokens + ``max_new_tokens`` ≤ ``--max-total-tokens``); sampling is on when
``do_sample`` is true or any of those is set. An EOS ends with a special ``</s>`` token that counts in
``generated_tokens``. Knobs: see ``common.py``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
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
    json_body,
    json_response,
    knobs_from,
    new_app,
    parse_flags,
    prometheus_text,
    prompt_tokens,
    run,
    sse_stream,
    words,
)

VERSION = "3.3.7"
EOS_ID = 2
_UNHEALTHY = {"error": "unhealthy", "error_type": "healthcheck"}
_OVERLOADED = {"error": "Model is overloaded", "error_type": "overloaded"}


class Invalid(ValueError):
    """A request TGI's validation rejects (``error_type: validation``)."""


def _event(payload: object) -> bytes:
    return b"data:" + compact_json(payload).encode() + b"\n\n"


class TgiStub:
    def __init__(self, state: StubState, model_id: str, max_total_tokens: int, max_concurrent: int) -> None:
        self.state = state
        self.model_id = model_id
        self.max_total_tokens = max_total_tokens
        self.max_concurrent = max_concurrent
        self.in_flight = 0  # holders of a concurrency permit
        self.generating = 0
        self.request_count = 0
        self.request_success = 0
        self.failures: dict[str, int] = {"validation": 0, "overloaded": 0, "dropped": 0, "generation": 0}

    def build_app(self) -> web.Application:
        @web.middleware
        async def loading_gate(request: web.Request, handler: Handler) -> web.StreamResponse:
            if self.state.loading() and not request.path.startswith("/stub/"):
                return json_response(_UNHEALTHY, status=503)
            return await handler(request)

        app = new_app(self.state, middlewares=[loading_gate])
        app.router.add_get("/health", self.health)
        app.router.add_get("/info", self.info)
        app.router.add_post("/generate_stream", self.generate_stream)
        app.router.add_post("/generate", self.generate)
        app.router.add_get("/metrics", self.metrics)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def info(self, request: web.Request) -> web.Response:
        return json_response(
            {
                "model_id": self.model_id,
                "model_sha": None,
                "model_pipeline_tag": "text-generation",
                "max_concurrent_requests": self.max_concurrent,
                "max_best_of": 2,
                "max_stop_sequences": 4,
                "max_input_tokens": self.max_total_tokens - 1,
                "max_total_tokens": self.max_total_tokens,
                "validation_workers": 2,
                "max_client_batch_size": 4,
                "router": "text-generation-router",
                "version": self.state.knobs.version,
                "sha": None,
                "docker_label": None,
            }
        )

    def _validate(self, body: Mapping[str, object]) -> tuple[str, int, int | None, bool]:
        """(inputs, max_new_tokens, seed, do_sample) as TGI's validation would accept them."""
        inputs = body.get("inputs")
        params = body.get("parameters") or {}
        if not isinstance(inputs, str) or not isinstance(params, dict):
            raise Invalid("Input validation error: `inputs` must be a string and `parameters` an object")
        if not inputs:
            raise Invalid("Input validation error: `inputs` cannot be empty")
        temperature, top_p, top_k = params.get("temperature"), params.get("top_p"), params.get("top_k")
        if temperature is not None and not (isinstance(temperature, int | float) and temperature > 0):
            raise Invalid("Input validation error: `temperature` must be strictly positive")
        if top_p is not None and not (isinstance(top_p, int | float) and 0 < top_p < 1):
            raise Invalid("Input validation error: `top_p` must be > 0.0 and < 1.0")
        if top_k is not None and not (isinstance(top_k, int) and top_k > 0):
            raise Invalid("Input validation error: `top_k` must be strictly positive")
        n_in = prompt_tokens(inputs)
        if n_in >= self.max_total_tokens:
            raise Invalid(
                f"Input validation error: `inputs` must have less than {self.max_total_tokens} tokens. "
                f"Given: {n_in}"
            )
        max_new = params.get("max_new_tokens", self.max_total_tokens - n_in)  # 3.x fills the context
        if not isinstance(max_new, int) or max_new <= 0:
            raise Invalid("Input validation error: `max_new_tokens` must be strictly positive")
        if n_in + max_new > self.max_total_tokens:
            raise Invalid(
                f"Input validation error: `inputs` tokens + `max_new_tokens` must be <= "
                f"{self.max_total_tokens}. Given: {n_in} `inputs` tokens and {max_new} `max_new_tokens`"
            )
        seed = params.get("seed")
        do_sample = params.get("do_sample") is True or any(v is not None for v in (temperature, top_p, top_k))
        return inputs, max_new, seed if isinstance(seed, int) else None, do_sample

    async def generate_stream(self, request: web.Request) -> web.StreamResponse:
        body = await json_body(request)
        if body is None:
            return web.Response(status=422, text="Failed to deserialize the JSON body into the target type")
        self.request_count += 1
        resp = sse_stream()
        await resp.prepare(request)  # axum's Sse answers 200 first; every error is an event
        if self.in_flight >= self.max_concurrent:
            self.failures["overloaded"] += 1
            await resp.write(_event(_OVERLOADED))
            await resp.write_eof()
            return resp
        self.in_flight += 1
        try:
            try:
                inputs, max_new, seed, do_sample = self._validate(body)
            except Invalid as exc:
                self.failures["validation"] += 1
                await resp.write(_event({"error": str(exc), "error_type": "validation"}))
                await resp.write_eof()
                return resp
            async with self.state.track(body):
                await self._stream(resp, inputs, max_new, seed, do_sample)
            return resp
        finally:
            self.in_flight -= 1

    async def _stream(
        self, resp: web.StreamResponse, inputs: str, max_new: int, seed: int | None, do_sample: bool
    ) -> None:
        pieces: list[str] = []
        n_in = prompt_tokens(inputs)

        def details(reason: str, generated: int) -> dict[str, object]:
            return {
                "finish_reason": reason,
                "generated_tokens": generated,
                "seed": seed if do_sample else None,
                "input_length": n_in,
            }

        async def emit(word: str, last: bool) -> None:
            pieces.append(word)
            index = len(pieces)
            token = {"id": 1000 + index, "text": word, "logprob": -0.25, "special": False}
            event: dict[str, object] = {
                "index": index,
                "token": token,
                "generated_text": None,
                "details": None,
            }
            if last:
                event["generated_text"] = "".join(pieces)
                event["details"] = details("length", index)
            await resp.write(_event(event))

        self.generating += 1
        try:
            count, eos = await self.state.produce(inputs, seed or 0, max_new, emit)
        except Fault as fault:
            self.failures["generation"] += 1
            message = f"Request failed during generation: Server error: {fault.message}"
            await resp.write(_event({"error": message, "error_type": "generation"}))
            await resp.write_eof()
            return
        except BaseException:
            self.failures["dropped"] += 1
            raise
        finally:
            self.generating -= 1
        if eos:
            token = {"id": EOS_ID, "text": "</s>", "logprob": -0.01, "special": True}
            await resp.write(
                _event(
                    {
                        "index": count + 1,
                        "token": token,
                        "generated_text": "".join(pieces),
                        "details": details("eos_token", count + 1),
                    }
                )
            )
        self.request_success += 1
        await resp.write_eof()

    async def generate(self, request: web.Request) -> web.Response:
        """Non-streaming: the overload refusal is HTTP 429 here, validation 422, generation 424."""
        body = await json_body(request)
        if body is None:
            return web.Response(status=422, text="Failed to deserialize the JSON body into the target type")
        self.request_count += 1
        if self.in_flight >= self.max_concurrent:
            self.failures["overloaded"] += 1
            return json_response(_OVERLOADED, status=429)
        self.in_flight += 1
        try:
            try:
                inputs, max_new, seed, _ = self._validate(body)
            except Invalid as exc:
                self.failures["validation"] += 1
                return json_response({"error": str(exc), "error_type": "validation"}, status=422)
            stream = words(inputs, seed or 0)
            text = "".join(next(stream) for _ in range(max_new))
            self.request_success += 1
            return json_response({"generated_text": text})
        finally:
            self.in_flight -= 1

    async def metrics(self, request: web.Request) -> web.Response:
        families: list[Family] = [
            ("tgi_request_count", "counter", "Requests received", [({}, self.request_count)]),
            ("tgi_request_success", "counter", "Requests answered in full", [({}, self.request_success)]),
            (
                "tgi_request_failure",
                "counter",
                "Requests failed, by reason",
                [({"err": k}, v) for k, v in self.failures.items()],
            ),
            (
                "tgi_queue_size",
                "gauge",
                "Requests waiting for a batch",
                [({}, max(0, self.in_flight - self.generating))],
            ),
            ("tgi_batch_current_size", "gauge", "Requests in the running batch", [({}, self.generating)]),
        ]
        return web.Response(text=prometheus_text(families), content_type="text/plain", charset="utf-8")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="text-generation-launcher", description="TGI stub")
    parser.add_argument("--model-id", default="bigscience/bloom-560m")
    parser.add_argument("--hostname", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3000)
    parser.add_argument("--max-total-tokens", type=int, default=4096)
    parser.add_argument("--max-concurrent-requests", type=int, default=128)
    parser.add_argument("--num-shard", type=int, default=1)
    add_knob_flags(parser, VERSION)
    ns = parse_flags(parser, argv)
    stub = TgiStub(StubState(knobs_from(ns)), ns.model_id, ns.max_total_tokens, ns.max_concurrent_requests)
    run([(stub.build_app(), ns.hostname, ns.port)])


if __name__ == "__main__":
    main()
