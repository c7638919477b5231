"""The fake GPU box is shared by real processes: a reservation or fault made in one shows in another, and a
reservation dies with the process that made it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from llorch.config import FakeGpu, TelemetryConfig
from llorch.gpu import MIB, GpuFault, open_probe

FAKE = TelemetryConfig(
    gpu_provider="fake", fake_gpus=[FakeGpu(index=0, name="Fake 12GB", total_mib=12288, free_mib=12288)]
)

CHILD = """
import os, sys
from pathlib import Path
from llorch.config import TelemetryConfig
from llorch.gpu import MIB, open_probe

probe = open_probe(TelemetryConfig.model_validate_json(sys.argv[2]), Path(sys.argv[1]))
probe.reserve("child-engine", os.getpid(), 0, 4096 * MIB)
probe.inject_fault(0, "xid", "Xid 79")
print("ready", flush=True)
sys.stdin.readline()  # hold the reservation until the parent lets go
"""


def test_reservations_and_faults_cross_processes(tmp_path: Path) -> None:
    parent = open_probe(FAKE, tmp_path)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path), FAKE.model_dump_json()],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline() == "ready\n"
        dev = parent.device(0)
        assert dev is not None and dev.free_bytes == 8192 * MIB
        assert parent.process_vram(child.pid) == {0: 4096 * MIB}
        assert parent.faults() == [GpuFault(0, "xid", "Xid 79")]
        child.stdin.close()
        assert child.wait(timeout=60) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    dev = parent.device(0)  # the child died without releasing: its reservation went with it
    assert dev is not None and dev.free_bytes == 12288 * MIB
    assert parent.process_vram(child.pid) == {}
    assert parent.faults() == []
