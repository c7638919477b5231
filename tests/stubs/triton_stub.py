"""A Triton look-alike serving the generate extension for a TensorRT-LLM-style model:
``python tests/stubs/triton_stub.py --model-repository DIR --http-port P --grpc-port G --metrics-port M
[--stub-input text_input] [--stub-output text_output] [--stub-max-tokens-input max_tokens] [--stub-...]``.

Wire format after ENGINE-PROTOCOLS.md and Triton's ``extension_generate.md``: the models are the
subdirectories of ``--model-repository`` (``ensemble`` when it has none), each serving ``POST
/v2/models/{m}/generate_stream`` and ``/generate`` with the JSON keys named by the ``--stub-*`` I/O
flags (Triton learns them from each model's config). Stream frames are ``data: {json}`` (with a space),
keys sorted as Triton's ``std::map`` writes them, the new text under the output key, no ``[DONE]``:
the body ends after the last response. Errors are ``{"error": "..."}``: before inference as JSON with
the status (400 for a missing input or an unknown model), on the first response as that status with an
SSE body, later as a ``data:`` event after the 200. ``GET /v2/health/live`` is 200 once listening;
``/v2/health/ready`` and ``/v2/models/{m}/ready`` answer 400 while the stub "loads" (real Triton only
listens after its models load). ``GET /v2`` gives ``{name, version, extensions}``. Metrics
(``nv_inference_*``, ``nv_trt_llm_*``) are on ``--metrics-port`` only; the gRPC port is not served.
Requests are not limited (Triton queues them). Knobs: see ``common.py``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

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
    run,
    sse_stream,
)

VERSION = "2.54.0"
LOOPBACK = "127.0.0.1"
EXTENSIONS = [
    "classification",
    "sequence",
    "model_repository",
    "model_repository(unload_dependents)",
    "schedule_policy",
    "model_configuration",
    "system_shared_memory",
    "cuda_shared_memory",
    "binary_tensor_data",
    "parameters",
    "statistics",
    "trace",
    "logging",
]
KV_BLOCKS_MAX = 1024
KV_BLOCKS_PER_REQUEST = 16


def _event(payload: dict[str, object]) -> bytes:
    return b"data: " + compact_json(dict(sorted(payload.items()))).encode() + b"\n\n"


def _error(status: int, message: str) -> web.Response:
    return json_response({"error": message}, status=status)


class TritonStub:
    def __init__(
        self, state: StubState, models: list[str], input_name: str, output_name: str, max_tokens_input: str
    ) -> None:
        self.state = state
        self.models = models
        self.input_name = input_name
        self.output_name = output_name
        self.max_tokens_input = max_tokens_input
        self.success: dict[str, int] = dict.fromkeys(models, 0)
        self.failure: dict[tuple[str, str], int] = {}
        self.active = 0

    def build_app(self) -> web.Application:
        app = new_app(self.state)
        app.router.add_get("/v2", self.server_metadata)
        app.router.add_get("/v2/health/live", self.live)
        app.router.add_get("/v2/health/ready", self.ready)
        app.router.add_get("/v2/models/{model}/ready", self.model_ready)
        app.router.add_get("/v2/models/{model}", self.model_metadata)
        app.router.add_post("/v2/models/{model}/generate_stream", self.generate_stream)
        app.router.add_post("/v2/models/{model}/generate", self.generate)
        return app

    def build_metrics_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self.metrics)
        return app

    async def server_metadata(self, request: web.Request) -> web.Response:
        return json_response(
            {"name": "triton", "version": self.state.knobs.version, "extensions": EXTENSIONS}
        )

    async def live(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def ready(self, request: web.Request) -> web.Response:
        return web.Response(status=400 if self.state.loading() else 200)

    async def model_ready(self, request: web.Request) -> web.Response:
        if request.match_info["model"] not in self.models or self.state.loading():
            return _error(400, "Model version not ready")
        return web.Response(status=200)

    async def model_metadata(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        if model not in self.models:
            return _error(400, f"Request for unknown model: '{model}' is not found")
        return json_response(
            {
                "name": model,
                "versions": ["1"],
                "platform": "ensemble",
                "inputs": [
                    {"name": self.input_name, "datatype": "BYTES", "shape": [-1, 1]},
                    {"name": self.max_tokens_input, "datatype": "INT32", "shape": [-1, 1]},
                ],
                "outputs": [{"name": self.output_name, "datatype": "BYTES", "shape": [-1, -1]}],
            }
        )

    def _inputs(self, model: str, body: dict[str, object] | None) -> tuple[str, int] | web.Response:
        """(prompt, max_tokens) or the error answer Triton gives before inference."""
        if model not in self.models:
            return _error(400, f"Request for unknown model: '{model}' is not found")
        if self.state.loading():
            return _error(503, f"Request for unknown model: '{model}' has no available versions")
        if body is None:
            return _error(400, "failed to parse the request JSON buffer")
        params = body.get("parameters")
        merged = {**(params if isinstance(params, dict) else {}), **body}
        prompt, max_tokens = merged.get(self.input_name), merged.get(self.max_tokens_input)
        missing = [name for name in (self.input_name, self.max_tokens_input) if merged.get(name) is None]
        if missing:
            return _error(
                400, f"[request id: <id_unknown>] missing required input(s) {missing} for '{model}'"
            )
        if not isinstance(prompt, str) or isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
            return _error(400, f"[request id: <id_unknown>] unexpected datatype for inputs of '{model}'")
        return prompt, max_tokens

    def _response(self, model: str, text: str) -> dict[str, object]:
        return {
            "batch_index": 0,
            "context_logits": 0.0,
            "cum_log_probs": 0.0,
            "generation_logits": 0.0,
            "model_name": model,
            "model_version": "1",
            "output_log_probs": [0.0],
            "sequence_index": 0,
            self.output_name: text,
        }

    async def generate_stream(self, request: web.Request) -> web.StreamResponse:
        model = request.match_info["model"]
        body = await json_body(request)
        parsed = self._inputs(model, body)
        if isinstance(parsed, web.Response):
            return parsed
        prompt, max_tokens = parsed
        seed = body.get("seed", body.get("random_seed", 0)) if body is not None else 0
        resp = sse_stream("text/event-stream; charset=utf-8")

        async def emit(word: str, last: bool) -> None:
            if not resp.prepared:
                await resp.prepare(request)
            await resp.write(_event(self._response(model, word)))

        async with self.state.track(body):
            self.active += 1
            try:
                await self.state.produce(prompt, seed if isinstance(seed, int) else 0, max_tokens, emit)
            except Fault as fault:
                self._fail(model, "BACKEND")
                message = f"Encountered error for requestId 1: {fault.message}"
                if not resp.prepared:  # the first response failed: its status, with an SSE body
                    resp.set_status(500)
                    await resp.prepare(request)
                await resp.write(_event({"error": message}))
                await resp.write_eof()
                return resp
            except BaseException:
                self._fail(model, "CANCELED")
                raise
            finally:
                self.active -= 1
            self.success[model] += 1
            if not resp.prepared:
                await resp.prepare(request)
            await resp.write_eof()
        return resp

    async def generate(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        parsed = self._inputs(model, await json_body(request))
        if isinstance(parsed, web.Response):
            return parsed
        prompt, max_tokens = parsed
        pieces: list[str] = []

        async def collect(word: str, last: bool) -> None:
            pieces.append(word)

        try:
            await self.state.produce(prompt, 0, max_tokens, collect)
        except Fault as fault:
            self._fail(model, "BACKEND")
            return _error(500, f"Encountered error for requestId 1: {fault.message}")
        self.success[model] += 1
        return json_response(self._response(model, prompt + "".join(pieces)))  # the prompt is echoed

    def _fail(self, model: str, reason: str) -> None:
        self.failure[(model, reason)] = self.failure.get((model, reason), 0) + 1

    async def metrics(self, request: web.Request) -> web.Response:
        used = min(KV_BLOCKS_MAX, self.active * KV_BLOCKS_PER_REQUEST)
        kv = {"max": KV_BLOCKS_MAX, "free": KV_BLOCKS_MAX - used, "used": used, "tokens_per": 64}
        requests = {"active": self.active, "max": 64, "scheduled": self.active, "context": 0, "waiting": 0}
        trt = {"model": "tensorrt_llm", "version": "1"}
        families: list[Family] = [
            (
                "nv_inference_request_success",
                "counter",
                "Number of successful inference requests, all batch sizes",
                [({"model": m, "version": "1"}, float(n)) for m, n in self.success.items()],
            ),
            (
                "nv_inference_request_failure",
                "counter",
                "Number of failed inference requests, all batch sizes",
                [({"model": m, "reason": r, "version": "1"}, float(n)) for (m, r), n in self.failure.items()],
            ),
            (
                "nv_inference_pending_request_count",
                "gauge",
                "Instantaneous number of pending requests awaiting execution per-model.",
                [({"model": m, "version": "1"}, 0.0) for m in self.models],
            ),
            (
                "nv_trt_llm_request_metrics",
                "gauge",
                "TRT LLM request metrics",
                [({**trt, "request_type": k}, float(v)) for k, v in requests.items()],
            ),
            (
                "nv_trt_llm_kv_cache_block_metrics",
                "gauge",
                "TRT LLM KV cache block metrics",
                [({**trt, "kv_cache_block_type": k}, float(v)) for k, v in kv.items()],
            ),
        ]
        return web.Response(text=prometheus_text(families), content_type="text/plain", charset="utf-8")


def _models(repository: str) -> list[str]:
    root = Path(repository)
    found = sorted(entry.name for entry in root.iterdir() if entry.is_dir()) if root.is_dir() else []
    return found or ["ensemble"]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tritonserver", description="Triton generate-extension stub")
    parser.add_argument("--model-repository", "--model-store", dest="model_repository", required=True)
    parser.add_argument("--http-address", default=LOOPBACK)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--stub-input", default="text_input")
    parser.add_argument("--stub-output", default="text_output")
    parser.add_argument("--stub-max-tokens-input", default="max_tokens")
    add_knob_flags(parser, VERSION)
    ns = parse_flags(parser, argv)
    stub = TritonStub(
        StubState(knobs_from(ns)),
        _models(ns.model_repository),
        ns.stub_input,
        ns.stub_output,
        ns.stub_max_tokens_input,
    )
    # Triton binds every interface by default; the stub stays on loopback.
    run(
        [
            (stub.build_app(), ns.http_address, ns.http_port),
            (stub.build_metrics_app(), LOOPBACK, ns.metrics_port),
        ]
    )


if __name__ == "__main__":
    main()
