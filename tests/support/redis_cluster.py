"""A real 3-master Redis Cluster on loopback from the valkey binary `llorch up` embeds: each node its
own process and data directory, slots split evenly, joined with CLUSTER MEET (no replicas)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import redis.asyncio as aioredis

from llorch_cli.embedded_redis import server_binary
from tests.support.procs import Proc, free_port, wait_until

SLOTS = 16384


class RedisCluster:
    def __init__(self, workdir: Path, masters: int = 3) -> None:
        self.ports = [free_port() for _ in range(masters)]
        self.bus_ports = [free_port() for _ in range(masters)]  # port + 10000 may not exist
        self.procs: list[Proc] = []
        for port, bus in zip(self.ports, self.bus_ports, strict=True):
            node_dir = workdir / f"node-{port}"
            node_dir.mkdir(parents=True, exist_ok=True)
            argv = [
                server_binary(),
                "--port", str(port),
                "--bind", "127.0.0.1",
                "--dir", str(node_dir),
                "--cluster-enabled", "yes",
                "--cluster-port", str(bus),
                "--cluster-config-file", "nodes.conf",
                "--appendonly", "no",
                "--save", "",
            ]  # fmt: skip
            self.procs.append(Proc(argv, node_dir / "server.log"))
        self.url = f"redis://127.0.0.1:{self.ports[0]}/0"

    async def start(self) -> None:
        """Wait for every node, give each a third of the slots, join them, wait for `cluster_state:ok`."""
        clients = [aioredis.Redis(host="127.0.0.1", port=p, decode_responses=True) for p in self.ports]
        try:
            for client, proc in zip(clients, self.procs, strict=True):

                async def up(c: aioredis.Redis = client, p: Proc = proc) -> bool:
                    assert p.alive(), f"a cluster node exited:\n{p.log_text()[-2000:]}"
                    return await _pong(c)

                await wait_until(up, 30, "a cluster node to answer")
            share = SLOTS // len(clients)
            for n, client in enumerate(clients):
                last = SLOTS - 1 if n == len(clients) - 1 else (n + 1) * share - 1
                await client.execute_command("CLUSTER", "ADDSLOTSRANGE", n * share, last)
            for port, bus in zip(self.ports[1:], self.bus_ports[1:], strict=True):
                await clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", port, bus)

            async def ok() -> bool:
                infos = await asyncio.gather(*(c.execute_command("CLUSTER", "INFO") for c in clients))
                return all("cluster_state:ok" in str(i) for i in infos)

            await wait_until(ok, 60, "the cluster to be ok")
        finally:
            for client in clients:
                await client.aclose()

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()


async def _pong(client: aioredis.Redis) -> bool:
    try:
        return bool(await client.ping())
    except aioredis.RedisError:
        return False
