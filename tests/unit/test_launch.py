"""Engine command lines and adapter choice (llorch.adapters.launch, SPEC §8 "Launch" lines)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from llorch.adapters.launch import Launch, engine_command, make_adapter
from llorch.adapters.llamacpp import LlamaCppAdapter
from llorch.adapters.openai import OpenAIAdapter
from llorch.adapters.tgi import TgiAdapter
from llorch.adapters.triton import TritonAdapter
from llorch.config import PoolConfig

MODEL = Path("/models/model.gguf")


def pool(engine: str, **keys: Any) -> PoolConfig:
    return PoolConfig.model_validate({"id": "p-1", "engine": engine, "model": "m", **keys})


def ports(*values: int) -> Callable[[], int]:
    """A free_port stand-in handing out ``values`` in order (and failing loudly beyond them)."""
    it = iter(values)
    return lambda: next(it)


def no_ports() -> int:
    raise AssertionError("this engine needs no extra ports")


@pytest.mark.parametrize("engine", ["llamacpp", "mock"])
def test_llama_server_command_line(engine: str) -> None:
    launch = engine_command(
        pool(engine, devices=[0], ctx=2048, slots=2), "llama-server", MODEL, 9000, no_ports
    )
    assert launch.argv == (
        "llama-server",
        *("-m", str(MODEL), "--host", "127.0.0.1", "--port", "9000", "-c", "4096", "--parallel", "2"),
        *("--metrics", "--no-webui", "--alias", "p-1", "-ngl", "999"),
    )
    assert (launch.port, launch.metrics_port, launch.model_path) == (9000, None, str(MODEL))


def test_llama_server_single_slot_cpu_pool() -> None:
    launch = engine_command(pool("mock", devices="cpu", slots=1), "mock", MODEL, 9000, no_ports)
    assert "--no-cont-batching" in launch.argv
    assert "-ngl" not in launch.argv  # CPU pools offload nothing
    assert launch.argv[launch.argv.index("-c") + 1] == "4096"  # ctx per slot x slots


def test_vllm_command_line() -> None:
    config = pool("vllm", devices=[0], ctx=8192, slots=8, engine_args=["--gpu-memory-utilization", "0.55"])
    launch = engine_command(config, "vllm", MODEL, 9001, no_ports)
    assert launch.argv == (
        *("vllm", "serve", str(MODEL), "--host", "127.0.0.1", "--port", "9001"),
        *("--max-model-len", "8192", "--max-num-seqs", "8", "--gpu-memory-utilization", "0.55"),
    )


@pytest.mark.parametrize(("devices", "flag"), [([0, 1], "2"), ([0, 1, 2, 3], "4")])
def test_vllm_tensor_parallel_over_the_devices(devices: list[int], flag: str) -> None:
    launch = engine_command(pool("vllm", devices=devices), "vllm", MODEL, 9001, no_ports)
    assert launch.argv[-2:] == ("--tensor-parallel-size", flag)


def test_tgi_command_line() -> None:
    config = pool("tgi", devices=[0], ctx=4096, slots=4, engine_args=["--dtype", "bfloat16"])
    launch = engine_command(config, "text-generation-launcher", MODEL, 9002, no_ports)
    assert launch.argv == (
        *("text-generation-launcher", "--model-id", str(MODEL), "--hostname", "127.0.0.1", "--port", "9002"),
        *("--max-total-tokens", "4096", "--max-concurrent-requests", "4", "--dtype", "bfloat16"),
    )


def test_tgi_shards_over_the_devices() -> None:
    launch = engine_command(pool("tgi", devices=[2, 3]), "tgi", MODEL, 9002, no_ports)
    assert launch.argv[-2:] == ("--num-shard", "2")
    assert "--num-shard" not in engine_command(pool("tgi", devices=[2]), "tgi", MODEL, 9002, no_ports).argv


def test_triton_command_line_takes_two_more_ports() -> None:
    config = pool("triton", devices=[0], adapter={"model_name": "ensemble"}, engine_args=["--log-verbose=1"])
    launch = engine_command(config, "tritonserver", Path("/models/repo"), 9003, ports(9004, 9005))
    assert launch.argv == (
        *("tritonserver", "--model-repository", "/models/repo", "--http-address", "127.0.0.1"),
        *("--http-port", "9003"),
        *("--grpc-port", "9004", "--metrics-port", "9005", "--log-verbose=1"),
    )
    assert launch.metrics_port == 9005
    assert launch.base_url == "http://127.0.0.1:9003"
    assert launch.metrics_url == "http://127.0.0.1:9005/metrics"


def test_metrics_url_is_the_api_port_elsewhere() -> None:
    launch = engine_command(pool("vllm"), "vllm", MODEL, 9001, no_ports)
    assert launch.metrics_url == "http://127.0.0.1:9001/metrics"


@pytest.mark.parametrize(
    ("config", "kind"),
    [
        (pool("llamacpp"), LlamaCppAdapter),
        (pool("mock"), LlamaCppAdapter),
        (pool("vllm"), OpenAIAdapter),
        (pool("tgi"), TgiAdapter),
        (pool("triton", adapter={"model_name": "ensemble"}), TritonAdapter),
    ],
)
async def test_make_adapter_picks_the_engine_adapter(config: PoolConfig, kind: type) -> None:
    counter = itertools.count(9100)
    launch = engine_command(config, "bin", MODEL, 9000, lambda: next(counter))
    adapter = make_adapter(config, launch)
    try:
        assert isinstance(adapter, kind)
    finally:
        await adapter.aclose()


async def test_vllm_adapter_serves_the_model_path_with_the_pool_limits() -> None:
    config = pool("vllm", ctx=2048, slots=6)
    adapter = make_adapter(config, engine_command(config, "vllm", MODEL, 9001, no_ports))
    assert isinstance(adapter, OpenAIAdapter)
    assert (adapter.model, adapter.slots_total, adapter.ctx, adapter.base_url) == (
        str(MODEL),
        6,
        2048,
        "http://127.0.0.1:9001",
    )
    await adapter.aclose()


async def test_triton_adapter_takes_the_pool_options_and_metrics_port() -> None:
    options = {
        "model_name": "llm",
        "input": "prompt",
        "output": "text",
        "max_tokens_input": "n",
        "trtllm_version": "0.17",
    }
    config = pool("triton", adapter=options)
    adapter = make_adapter(config, Launch(("tritonserver",), 9003, "/repo", metrics_port=9005))
    assert isinstance(adapter, TritonAdapter)
    assert (adapter.model_name, adapter.input_name, adapter.output_name, adapter.max_tokens_input) == (
        "llm",
        "prompt",
        "text",
        "n",
    )
    assert (adapter.trtllm_version, adapter.metrics_url) == ("0.17", "http://127.0.0.1:9005/metrics")
    await adapter.aclose()


async def test_triton_adapter_defaults_the_tensor_names() -> None:
    config = pool("triton", adapter={"model_name": "ensemble"})
    adapter = make_adapter(config, Launch(("tritonserver",), 9003, "/repo", metrics_port=9005))
    assert isinstance(adapter, TritonAdapter)
    assert (adapter.input_name, adapter.output_name, adapter.max_tokens_input) == (
        "text_input",
        "text_output",
        "max_tokens",
    )
    assert adapter.trtllm_version is None
    await adapter.aclose()


def test_an_auto_pool_offloads_on_its_resolved_gpu_and_gets_a_slot_save_path() -> None:
    config = pool("llamacpp", devices="auto")
    assert "-ngl" not in engine_command(config, "llama-server", MODEL, 9000, no_ports).argv
    launch = engine_command(config, "llama-server", MODEL, 9000, no_ports, gpus=[1], slots_dir=Path("/s"))
    assert launch.argv[-4:] == ("-ngl", "999", "--slot-save-path", "/s")
    mock = engine_command(pool("mock", devices="cpu"), "mock", MODEL, 9000, no_ports, slots_dir=Path("/s"))
    assert "--slot-save-path" not in mock.argv  # only llama-server erases slots


def test_engine_env_reaches_the_engine_with_the_device_mask() -> None:
    from llorch_poolmgr.process import engine_env

    env = engine_env(pool("mock", engine_env={"LLORCH_TEST_KNOB": "on", "OMP_NUM_THREADS": "3"}), [1, 0])
    assert env["LLORCH_TEST_KNOB"] == "on" and env["OMP_NUM_THREADS"] == "3"
    assert (env["CUDA_VISIBLE_DEVICES"], env["CUDA_DEVICE_ORDER"]) == ("1,0", "PCI_BUS_ID")
    assert engine_env(pool("mock"), None)["CUDA_VISIBLE_DEVICES"] == ""  # a CPU pool sees no GPU
