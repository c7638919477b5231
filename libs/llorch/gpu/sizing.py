"""The preload arithmetic: will a model fit in VRAM and host RAM (SPEC §5.3, §5.6).

The preload checks are pure functions: :func:`vram_need_bytes`, :func:`kv_reserve_from_facts` (a GGUF
file's exact KV size), :func:`kv_reserve_estimate` (the fallback guess), :func:`check_vram`,
:func:`check_ram` and :func:`pick_auto_device`. :func:`mem_available_bytes` reads the one input that
comes from the host.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Final

from llorch.gpu.probe import MIB, GpuDevice

if TYPE_CHECKING:  # keeps gguf and numpy out of every importer of llorch.gpu
    from llorch.gguf_meta import ModelFacts

# llama.cpp rounds the context (-c, all slots together) up to a multiple of this before sizing the KV
# cache (b11434: `-c 3000 --parallel 3` reports n_ctx = 3072).
LLAMA_CTX_PAD: Final = 256


def _exact(x: float) -> Fraction:
    """A config float as the decimal its user wrote (1.1 is 11/10, not the nearest binary fraction)."""
    if not math.isfinite(x):
        raise ValueError(f"expected a finite number, got {x}")
    return Fraction(repr(x))


def _mib_up(nbytes: int | Fraction) -> int:
    return math.ceil(Fraction(nbytes) / MIB)


def vram_need_bytes(model_bytes: int, factor: float, kv_reserve_bytes: int) -> int:
    """VRAM one engine needs in all: ceil(model bytes * ``vram.factor``) + the KV reserve (SPEC §5.6)."""
    if model_bytes < 0 or kv_reserve_bytes < 0 or factor <= 0:
        raise ValueError("vram_need_bytes needs model_bytes >= 0, factor > 0 and kv_reserve_bytes >= 0")
    return math.ceil(model_bytes * _exact(factor)) + kv_reserve_bytes


def kv_reserve_estimate(ctx: int, slots: int, model_bytes: int) -> int:
    """KV-cache bytes for ``ctx`` tokens in each of ``slots`` slots when ``vram.kv_reserve_mib`` is null
    and the model has no GGUF metadata to size it exactly (:func:`kv_reserve_from_facts`): directory
    models (vLLM, TGI, Triton) and files whose metadata cannot be read.

    A deliberately simple heuristic: 2·√(model bytes) bytes per token. f16 KV grows with layer count, which
    grows about as the square root of the weights, so this lands near the real figure for current
    grouped-query models (≈19 KiB/token for a 0.1 GB file, 8B at 4.9 GB ≈ 137 KiB against 128 KiB, 14B at
    9 GB ≈ 185 KiB against 192 KiB, 70B at 40 GB ≈ 390 KiB against 320 KiB). It under-estimates old
    full-attention models; that shows up as ``VRAM_OOM``, after which the next preload asks 10% more.
    """
    if ctx < 1 or slots < 1 or model_bytes < 0:
        raise ValueError("kv_reserve_estimate needs ctx >= 1, slots >= 1 and model_bytes >= 0")
    return ctx * slots * 2 * math.isqrt(model_bytes)


def kv_reserve_from_facts(ctx: int, slots: int, facts: ModelFacts) -> int | None:
    """KV-cache bytes llama-server allocates for ``ctx`` tokens in each of ``slots`` slots with its
    default f16 cache: ctx x slots (rounded up to :data:`LLAMA_CTX_PAD`) x the model's
    :meth:`~llorch.gguf_meta.ModelFacts.kv_bytes_per_token`, which comes from the GGUF metadata (layers,
    KV heads, K/V head sizes). None when the metadata lacks the attention shape.

    Measured against llama-server b11434 on SmolLM2-135M (-c 32768 --parallel 16): 720 MiB both.
    """
    if ctx < 1 or slots < 1:
        raise ValueError("kv_reserve_from_facts needs ctx >= 1 and slots >= 1")
    per_token = facts.kv_bytes_per_token()
    if per_token is None:
        return None
    cells = (ctx * slots + LLAMA_CTX_PAD - 1) // LLAMA_CTX_PAD * LLAMA_CTX_PAD
    return cells * per_token


def check_vram(
    devices: Sequence[GpuDevice], need: int, headroom_bytes: int, shares: Sequence[float] | None
) -> str | None:
    """Why ``need`` bytes do not fit on ``devices`` (SPEC §5.3, §5.6), or None when they do.

    Without ``shares`` each device must hold the whole ``need``; with a tensor split device d holds
    ``need * shares[d] / sum(shares)``. A device passes iff free - headroom >= its need (exact arithmetic).
    The reason names every short device with free and need in MiB (free rounded down, need up).
    """
    if shares is not None and len(shares) != len(devices):
        raise ValueError(f"{len(shares)} tensor_split shares for {len(devices)} devices")
    if not devices:
        return "no GPU to place the model on"
    exact = [_exact(s) for s in shares] if shares is not None else None
    total = sum(exact, Fraction(0)) if exact is not None else Fraction(1)
    if total <= 0:
        raise ValueError("tensor_split shares must be positive")
    short = []
    for i, dev in enumerate(devices):
        share = exact[i] / total if exact is not None else Fraction(1)
        dev_need = need * share
        if dev.free_bytes - headroom_bytes >= dev_need:
            continue
        of = f" ({float(share):.1%} of {_mib_up(need)} MiB)" if exact is not None else ""
        short.append(
            f"GPU {dev.index} ({dev.name}): {dev.free_bytes // MIB} MiB free, needs {_mib_up(dev_need)} MiB"
            f"{of} + {_mib_up(headroom_bytes)} MiB headroom"
        )
    return "; ".join(short) or None


def check_vram_total(
    devices: Sequence[GpuDevice], need: int, headroom_bytes: int, shares: Sequence[float] | None
) -> str | None:
    """Why ``need`` bytes could never fit ``devices``, even with nothing else on them: each device's
    share of the need plus the headroom exceeds its TOTAL memory. That is a configuration error, not a
    transient shortage (defect 5). None when an empty device would do."""
    empty = [
        GpuDevice(d.index, d.name, d.uuid, d.total_bytes, d.total_bytes, 0, d.utilization) for d in devices
    ]
    short = check_vram(empty, need, headroom_bytes, shares)
    if short is None:
        return None
    return short.replace(" MiB free,", " MiB in total,") + ": it can never fit; lower the pool's VRAM need"


def check_ram(model_bytes: int, ram_factor: float, mem_available: int) -> str | None:
    """Why host RAM is short for the model (MemAvailable < model bytes * ``ram_factor``), or None."""
    need = model_bytes * _exact(ram_factor)
    if mem_available >= need:
        return None
    return (
        f"MemAvailable {mem_available // MIB} MiB, needs {_mib_up(need)} MiB "
        f"(model {_mib_up(model_bytes)} MiB x ram_factor {ram_factor})"
    )


def mem_available_bytes(meminfo: Path = Path("/proc/meminfo")) -> int:
    """``MemAvailable`` from ``/proc/meminfo``, in bytes; OSError when it cannot be read."""
    return _meminfo_bytes("MemAvailable", meminfo)


def mem_total_bytes(meminfo: Path = Path("/proc/meminfo")) -> int:
    """``MemTotal`` from ``/proc/meminfo``, in bytes (the host RAM an on-demand CPU pool may fill);
    OSError when it cannot be read."""
    return _meminfo_bytes("MemTotal", meminfo)


def _meminfo_bytes(field: str, meminfo: Path) -> int:
    for line in meminfo.read_text(encoding="ascii").splitlines():
        name, _, rest = line.partition(":")
        if name == field:
            value, _, unit = rest.strip().partition(" ")
            return int(value) * (1024 if unit.strip() == "kB" else 1)
    raise OSError(f"no {field} in {meminfo}")


def pick_auto_device(devices: Sequence[GpuDevice], need: int, headroom_bytes: int) -> int | None:
    """``devices: auto``: the GPU with the most free VRAM that passes the VRAM check; ties → lowest index."""
    fits = [dev for dev in devices if check_vram([dev], need, headroom_bytes, None) is None]
    if not fits:
        return None
    return min(fits, key=lambda dev: (-dev.free_bytes, dev.index)).index
