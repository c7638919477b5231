"""A pool manager on another host: `llorch pool-manager --host NAME --listen HOST --advertise HOST
--scheduler HOST:PORT` serves the pools whose `host` is NAME, binds only its listen host, registers its
advertised address with the scheduler (which dials it back), and refuses options it cannot serve with
exit 2. `llorch up` starts pool managers for the `local` pools only. 127.0.0.2 and 127.0.0.3 stand in
for other hosts: Linux routes all of 127.0.0.0/8 to loopback."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from llorch.config import LlorchConfig, load_config, validate_config
from llorch_cli import up
from llorch_cli.supervise import ServiceChild
from llorch_poolmgr.__main__ import ServeOptionError, addresses, advertised_host, manager_id, select_pools
from tests.support.procs import free_port, python_module, wait_until
from tests.support.stack import MOCK_MODEL, Client, Stack, mock_pool

REMOTE_HOST = "gpu-box-2"
REMOTE_IP = "127.0.0.2"
CLI_S = 60.0
READY_S = 60.0


async def _listening(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on host:port (refused: nothing bound there)."""
    try:
        _reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    except (ConnectionRefusedError, OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def _pools_reported(http: aiohttp.ClientSession, metrics_address: str) -> set[str]:
    """The pool ids a pool manager's own /metrics reports (its `pool_ready{pool_id}` gauge)."""
    async with http.get(f"http://{metrics_address}/metrics") as r:
        assert r.status == 200
        text = await r.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    return {s.labels["pool_id"] for s in families["pool_ready"].samples}


async def _component_up(http: aiohttp.ClientSession, stack: Stack) -> dict[str, float]:
    async with http.get(f"{stack.url}/metrics") as r:
        assert r.status == 200
        text = await r.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    return {s.labels["component"]: s.value for s in families["component_up"].samples}


def _remote_stack(stack_factory: Any) -> Stack:
    """A local pool (mock-a) and one on gpu-box-2, of another model and context, so that a task for
    that model can only run there."""
    remote = mock_pool("mock-remote", host=REMOTE_HOST, model="mock-remote", ctx=4096)
    models = [{"id": "mock-tiny", "path": str(MOCK_MODEL)}, {"id": "mock-remote", "path": str(MOCK_MODEL)}]
    stack: Stack = stack_factory(pools=[mock_pool("mock-a"), remote], models=models)
    return stack


async def test_a_pool_manager_on_another_host_serves_its_pools(
    stack_factory: Any, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    stack = _remote_stack(stack_factory)
    cfg = load_config(stack.config_path, env={})
    # gpu-box-2's copy of the config names a scheduler that is not there: --scheduler is what it dials.
    theirs = yaml.safe_load(stack.config_path.read_text())
    theirs["grpc"]["scheduler"] = f"127.0.0.1:{free_port()}"
    their_config = tmp_path / "gpu-box-2.yaml"
    their_config.write_text(yaml.safe_dump(theirs))
    await stack.start(ready=False)  # the scheduler and the gateway on 127.0.0.1, a local pool manager
    remote_args = ["--host", REMOTE_HOST, "--listen", REMOTE_IP, "--advertise", REMOTE_IP]
    # Index 1, so that its ports are free on 127.0.0.1 too and "not bound there" means something.
    remote_args += ["--scheduler", cfg.grpc.scheduler, "--index", "1"]
    stack.start_pool_manager(remote_args, name="pool-manager-gpu-box-2", config=their_config)
    await stack.wait_ready(READY_S)
    await stack.wait_pools_ready("mock-a", "mock-remote", timeout_s=READY_S)

    client = Client(stack, http)
    task_id = await client.admit(model_ref="mock-remote", max_tokens=3)
    events = await client.events(task_id)
    assert events[-1].event == "end", [e.event for e in events]
    status = await client.status(task_id)
    assert status["state"] == "succeeded", status
    assert status["pool_id"] == "mock-remote" and status["replica_id"].startswith("mock-remote-r0"), status

    grpc_address, metrics_address = addresses(cfg, 1, REMOTE_IP)
    for address in (grpc_address, metrics_address):
        port = int(address.rpartition(":")[2])
        assert await _listening(REMOTE_IP, port), address
        assert not await _listening("127.0.0.1", port), f"{port} is bound on 127.0.0.1 too"
    # Each pool manager serves its own host's pools, and the gateway scrapes the advertised address.
    assert await _pools_reported(http, metrics_address) == {"mock-remote"}
    assert await _pools_reported(http, addresses(cfg, 0)[1]) == {"mock-a"}
    up_by_component = await _component_up(http, stack)
    assert up_by_component.get(f"pool-manager@{metrics_address}") == 1.0, up_by_component


async def test_the_scheduler_binds_its_listen_address(stack_factory: Any) -> None:
    """`llorch scheduler --listen` binds gRPC there and its metrics on the same host; grpc.scheduler
    stays the address the others dial (nothing answers there in this test)."""
    stack: Stack = stack_factory(pools=[mock_pool()])
    cfg = load_config(stack.config_path, env={})
    port = int(cfg.grpc.scheduler.rpartition(":")[2])
    listen = "127.0.0.3"
    await stack.start(ready=False, scheduler_args=["--listen", f"{listen}:{port}"])
    scheduler = stack.procs["scheduler"]

    async def bound() -> bool:
        assert scheduler.alive(), scheduler.log_text()[-3000:]
        return await _listening(listen, port) and await _listening(listen, cfg.grpc.metrics_base_port)

    await wait_until(bound, READY_S, "the scheduler on its --listen address")
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://{listen}:{cfg.grpc.metrics_base_port}/metrics") as r,
    ):
        assert r.status == 200
    for unbound in (port, cfg.grpc.metrics_base_port):
        assert not await _listening("127.0.0.1", unbound), unbound


async def _llorch(stack: Stack, *args: str) -> tuple[int, str]:
    """(exit code, stderr) of `llorch <args> --config <the stack's>`."""
    argv = python_module("llorch_cli.main", *args, "--config", str(stack.config_path))
    proc = await asyncio.create_subprocess_exec(
        *argv, env={**os.environ, **stack.env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        _out, err = await asyncio.wait_for(proc.communicate(), CLI_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"llorch {' '.join(args)} did not exit (it should refuse at once)") from None
    assert "Traceback" not in err.decode(), err.decode()
    return proc.returncode if proc.returncode is not None else -1, err.decode()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--listen", "0.0.0.0"], "--listen 0.0.0.0 binds every address"),
        (["--listen", "::", "--host", REMOTE_HOST], "add --advertise HOST"),
        (["--listen", "0.0.0.0", "--advertise", "0.0.0.0"], "--advertise 0.0.0.0 is a wildcard"),
        (["--host", "nobody"], "no pool has host: nobody (the config's pool hosts: gpu-box-2, local)"),
        (["--host", REMOTE_HOST, "--pools", "mock-a"], "no pool has host: gpu-box-2 among --pools mock-a"),
        (["--host", "Not_A_Host"], "argument --host: expected 'local' or a host name"),
        (["--listen", "127.0.0.2:50061"], "argument --listen: expected an IP address or a host name"),
        (["--scheduler", "127.0.0.1"], "argument --scheduler: expected host:port"),
    ],
    ids=[
        "wildcard",
        "wildcard-v6",
        "advertise-wildcard",
        "no-pool",
        "no-pool-among",
        "bad-host",
        "port",
        "sched",
    ],
)
async def test_pool_manager_refuses_what_it_cannot_serve(
    stack_factory: Any, args: list[str], message: str
) -> None:
    code, err = await _llorch(_remote_stack(stack_factory), "pool-manager", *args)
    assert code == 2 and message in err, (code, err)


async def test_scheduler_refuses_a_listen_address_without_a_port(stack_factory: Any) -> None:
    code, err = await _llorch(_remote_stack(stack_factory), "scheduler", "--listen", "0.0.0.0")
    assert code == 2 and "argument --listen: expected host:port" in err, (code, err)


# ---- the pieces, without processes --------------------------------------------------------------------


def _config(*pools: dict[str, Any]) -> LlorchConfig:
    return validate_config(
        {
            "version": 1,
            "grpc": {
                "scheduler": "10.0.0.1:50051",
                "pool_manager_base_port": 50061,
                "metrics_base_port": 9101,
            },
            "pools": list(pools),
        }
    )


def test_addresses_and_the_advertised_host() -> None:
    cfg = _config(mock_pool("a"))
    assert addresses(cfg, 2) == ("10.0.0.1:50063", "10.0.0.1:9113")  # today's rule: the scheduler's host
    assert addresses(cfg, 0, "::") == ("[::]:50061", "[::]:9111")
    assert addresses(cfg, 0, "[::1]") == ("[::1]:50061", "[::1]:9111")
    assert advertised_host(None, None) is None  # grpc.scheduler's host, as before
    assert advertised_host("10.0.0.7", None) == "10.0.0.7"
    assert advertised_host("0.0.0.0", "10.0.0.7") == "10.0.0.7"
    assert advertised_host("::", "gpu-box-2.lan") == "gpu-box-2.lan"
    for listen, advertise in (("0.0.0.0", None), ("::", None), ("10.0.0.7", "::")):
        with pytest.raises(ServeOptionError):
            advertised_host(listen, advertise)


def test_pools_are_selected_by_host() -> None:
    cfg = _config(mock_pool("a"), mock_pool("b", host="gpu-box-2"), mock_pool("c", host="gpu-box-2"))
    assert [p.id for p in select_pools(cfg)] == ["a"]
    assert [p.id for p in select_pools(cfg, "gpu-box-2")] == ["b", "c"]
    assert [p.id for p in select_pools(cfg, "gpu-box-2", ["c"])] == ["c"]
    with pytest.raises(ServeOptionError, match="no pool has host: gpu-box-3"):
        select_pools(cfg, "gpu-box-3")
    # Every host counts its pool managers from 0, so the id names the host.
    assert (manager_id("local", 0), manager_id("gpu-box-2", 0)) == ("pm-0", "pm-gpu-box-2-0")


def test_up_starts_pool_managers_for_the_local_pools_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pools = [mock_pool("a"), mock_pool("b", host="gpu-box-2"), mock_pool("c", host="gpu-box-3")]
    cfg = _config(*pools).model_copy(update={"state_dir": tmp_path})
    children = up._children(cfg, tmp_path / "llorch.yaml", {}, None)
    managers = [c for c in children if c.name.startswith("pool-manager")]
    assert [c.name for c in managers] == ["pool-manager-cpu"]
    assert isinstance(managers[0], ServiceChild)
    argv = managers[0].argv
    assert argv[argv.index("--pools") + 1] == "a" and "--host" not in argv
    out = capsys.readouterr().out
    assert "pools left to host gpu-box-2 (its own `llorch pool-manager --host gpu-box-2`): b" in out
    assert "pools left to host gpu-box-3" in out
    only_remote = _config(mock_pool("b", host="gpu-box-2")).model_copy(update={"state_dir": tmp_path})
    names = [c.name for c in up._children(only_remote, tmp_path / "llorch.yaml", {}, None)]
    assert names == ["scheduler", "gateway"]
