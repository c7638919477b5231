"""Why an engine stopped: a VRAM OOM, a host OOM, a driver/CUDA fault, or a plain crash (SPEC §5.6).

The engine's own words decide first: its last log lines are matched against the CUDA out-of-memory
and CUDA-error patterns. A process killed by SIGKILL that we did not kill counts as a host OOM when
the kernel's OOM-kill counter of our memory cgroup (v2 ``memory.events`` or v1
``memory.oom_control``) rose while the engine ran; without that evidence it stays a crash, since
something else may have sent the signal.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Final


class PoolError(StrEnum):
    """`last_error.code` values of pool health (they describe a pool, not a task)."""

    MODEL_NOT_FOUND = "MODEL_NOT_FOUND"
    INSUFFICIENT_VRAM = "INSUFFICIENT_VRAM"
    INSUFFICIENT_RAM = "INSUFFICIENT_RAM"
    PRELOAD_FAILED = "PRELOAD_FAILED"
    SELFTEST_FAILED = "SELFTEST_FAILED"
    ENGINE_CRASHED = "ENGINE_CRASHED"
    ENGINE_UNHEALTHY = "ENGINE_UNHEALTHY"
    ENGINE_STUCK = "ENGINE_STUCK"
    VRAM_OOM = "VRAM_OOM"
    HOST_OOM = "HOST_OOM"
    DRIVER_FAULT = "DRIVER_FAULT"
    CIRCUIT_OPEN = "CIRCUIT_OPEN"
    UNTRUSTED_ARTIFACT = "UNTRUSTED_ARTIFACT"


_VRAM_OOM: Final = re.compile(
    r"CUDA out of memory|cudaMalloc failed: out of memory|out of memory allocating|"
    r"failed to allocate (CUDA|GPU)|CUDA_ERROR_OUT_OF_MEMORY|torch\.OutOfMemoryError|"
    r"alloc_buffer: allocating .* failed",
    re.IGNORECASE,
)
_DRIVER_FAULT: Final = re.compile(
    r"CUDA error|cudaError\w+|CUDA_ERROR_\w+|unspecified launch failure|illegal memory access|"
    r"GPU has fallen off the bus|Xid|uncorrectable ECC|NVML: Driver",
    re.IGNORECASE,
)


@dataclass(frozen=True, slots=True)
class Failure:
    code: PoolError
    message: str
    permanent: bool = False  # a configuration error: retrying cannot help (the replica goes to Failed)

    @property
    def kind(self) -> str:
        """The `engine_restarts_total` reason label."""
        return {
            PoolError.VRAM_OOM: "vram_oom",
            PoolError.HOST_OOM: "host_oom",
            PoolError.DRIVER_FAULT: "driver",
            PoolError.ENGINE_UNHEALTHY: "unhealthy",
            PoolError.ENGINE_STUCK: "stuck",
            PoolError.PRELOAD_FAILED: "preload",
            PoolError.SELFTEST_FAILED: "selftest",
        }.get(self.code, "crash")


def match_log(lines: list[str]) -> Failure | None:
    """A VRAM OOM or driver fault named in the engine's output (latest line wins within a kind)."""
    for pattern, code in ((_VRAM_OOM, PoolError.VRAM_OOM), (_DRIVER_FAULT, PoolError.DRIVER_FAULT)):
        for line in reversed(lines):
            if pattern.search(line):
                return Failure(code, f"engine reported: {line.strip()[:300]}")
    return None


def classify_exit(returncode: int, log_tail: list[str], oom_kills_rose: bool) -> Failure:
    """The failure behind an engine exit we did not ask for."""
    named = match_log(log_tail)
    if named is not None:
        return named
    if returncode == -signal.SIGKILL and oom_kills_rose:
        return Failure(PoolError.HOST_OOM, "the engine was killed by the host's OOM killer")
    if returncode < 0:
        return Failure(PoolError.ENGINE_CRASHED, f"engine killed by {signal.Signals(-returncode).name}")
    last = next((line.strip() for line in reversed(log_tail) if line.strip()), "")
    detail = f": {last[:300]}" if last else ""
    return Failure(PoolError.ENGINE_CRASHED, f"engine exited with code {returncode}{detail}")


def _memory_cgroup_files(proc_cgroup: Path, root: Path) -> list[Path]:
    found: list[Path] = []
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        _, controllers, path = line.split(":", 2)
        rel = path.lstrip("/")
        if controllers == "":  # cgroup v2 unified hierarchy
            found.append(root / rel / "memory.events")
        elif "memory" in controllers.split(","):
            found.append(root / "memory" / rel / "memory.oom_control")
    return found


def oom_kill_count(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> int:
    """The kernel's OOM-kill counter for this process's memory cgroup; 0 when it cannot be read."""
    for path in _memory_cgroup_files(proc_cgroup, root):
        try:
            for line in path.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            continue
    return 0
