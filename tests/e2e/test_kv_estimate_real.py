"""The GGUF-metadata KV estimate against the KV size the real llama-server reports for 16 slots.

llama-server prints `llama_kv_cache: size = X MiB (...)` only at log verbosity 4 (`-lv 4`); the
default (3) shows server lines only. Unified KV stays off: `--parallel 16` with `-c` gives each slot
its own 2048 cells, as the pool manager launches it (`-c ctx*slots --parallel slots`).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from llorch import gpu
from llorch.gguf_meta import read_facts
from tests.support.procs import Proc, free_port, wait_until

pytestmark = pytest.mark.e2e

CTX, SLOTS = 2048, 16
MIB = 1 << 20
KV_SIZE = re.compile(r"llama_kv_cache: size =\s*([0-9.]+) MiB")


async def test_kv_estimate_from_gguf_matches_llama_server(
    llama_server_bin: Path, model_gguf: Path, tmp_path: Path
) -> None:
    facts = read_facts(model_gguf)
    assert facts is not None, f"no GGUF metadata read from {model_gguf}"
    ours = gpu.kv_reserve_from_facts(CTX, SLOTS, facts)
    assert ours is not None, f"{model_gguf} has no attention shape: {facts}"

    argv = [str(llama_server_bin), "-m", str(model_gguf), "--host", "127.0.0.1", "--port", str(free_port())]
    argv += ["-c", str(CTX * SLOTS), "--parallel", str(SLOTS), "--threads", "2", "--no-warmup", "-lv", "4"]
    proc = Proc(argv, tmp_path / "llama-server.log")
    try:

        async def reported() -> bool:
            if KV_SIZE.search(proc.log_text()):
                return True
            if not proc.alive():
                raise AssertionError(
                    f"llama-server exited ({proc.popen.returncode}):\n{proc.log_text()[-4000:]}"
                )
            return False

        await wait_until(reported, timeout_s=120, what="llama-server to report its KV cache size")
    finally:
        proc.stop()
    log = proc.log_text()
    match = KV_SIZE.search(log)
    assert match is not None
    theirs = float(match.group(1)) * MIB
    assert abs(ours - theirs) <= 0.05 * theirs, (
        f"ours {ours / MIB:.2f} MiB vs llama-server {theirs / MIB:.2f} MiB: {match.group(0)}"
    )
