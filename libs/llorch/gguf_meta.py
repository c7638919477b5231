"""What a GGUF model file says about itself, read with llama.cpp's own ``gguf`` package.

:func:`read_facts` gives a :class:`ModelFacts` for a GGUF file (None for anything else);
:func:`facts_json` is its catalog form. :meth:`ModelFacts.kv_bytes_per_token` is the exact f16 KV
footprint of one cached token, which the pool manager's VRAM estimate uses instead of guessing it from
the file size (:func:`llorch.gpu.sizing.kv_reserve_from_facts`).

Cost: ``gguf.GGUFReader`` memory-maps the file and never reads tensor data (each tensor is a lazy view),
but it parses every metadata array element into its own numpy view, so the tokenizer vocabulary
dominated: about 5 s for SmolLM2's 49k tokens + 49k merges, proportionally more for 128k-256k
vocabularies, paid at a model's first verification and so at the first reload onto it. The facts need
no long array, so :class:`_FactsReader` steps over the contents of arrays longer than
:data:`ARRAY_READ_MAX` elements (90-95 ms for SmolLM2's facts where gguf's reader took 6-7 s).
Callers on an event loop still run it in a process and read it once per use.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import dataclasses
import functools
import json
import logging
import multiprocessing
import os
import signal
import struct
import sys
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from gguf import GGUF_MAGIC, GGUFEndian, GGUFReader, GGUFValueType, LlamaFileType

log = logging.getLogger(__name__)

_MAGIC: Final = GGUF_MAGIC.to_bytes(4, "little")  # b"GGUF"
# What a malformed or truncated file makes GGUFReader raise (short memmap slices, bad enum values,
# duplicate keys, undecodable strings, tensor data past the end of the file).
_BAD_FILE: Final = (OSError, ValueError, IndexError, KeyError, TypeError, OverflowError)

FactsJson = dict[str, str | int | list[int] | None]
ARRAY_READ_MAX: Final = 4096
"""Metadata arrays up to this many elements are read (a per-layer array has one per layer); longer ones
(the tokenizer's tokens, merges and token types) keep their element type and length, not their
elements."""


@dataclass(frozen=True)
class ModelFacts:
    """A GGUF model's metadata, each field from the key named beside it (``<arch>`` = architecture).

    ``kv_heads`` holds one value per layer (``head_count_kv``, or ``head_count`` without it, repeated
    when the file stores one number); it is empty when the file does not say. ``key_length`` and
    ``value_length`` are the per-head K and V sizes (``attention.key_length``/``value_length``, else
    ``embedding_length / head_count`` of layer 0, as llama.cpp derives them).
    """

    architecture: str  # general.architecture
    parameter_count: int  # general.parameter_count, else the sum of the tensors' element counts
    quantisation: str | None  # general.file_type as llama.cpp names it, else the most common tensor type
    trained_ctx: int | None  # <arch>.context_length
    layers: int | None  # <arch>.block_count
    kv_heads: tuple[int, ...]  # <arch>.attention.head_count_kv per layer
    key_length: int | None
    value_length: int | None

    def kv_bytes_per_token(self, bytes_per_element: int = 2) -> int | None:
        """KV-cache bytes one token takes across all layers: the sum over layers of
        (key_length + value_length) x kv_heads(layer) x ``bytes_per_element`` (2: f16, llama-server's
        default ``--cache-type-k/v``). None when the file lacks the attention shape.

        Exact for full-attention (MHA/GQA) layers. Layers with 0 KV heads (recurrent layers of hybrid
        models) add nothing, and their recurrent state is not counted. Sliding-window layers are counted
        at full context, so for those models this is an upper bound; MLA models (DeepSeek 2/3) cache a
        compressed latent that this does not model.
        """
        if not self.kv_heads or self.key_length is None or self.value_length is None:
            return None
        return (self.key_length + self.value_length) * sum(self.kv_heads) * bytes_per_element


def read_facts(path: Path | str) -> ModelFacts | None:
    """The facts of the GGUF file at ``path``; None for a directory, a non-GGUF file or a file that
    cannot be parsed (logged; never raises). Slow on big vocabularies: see the module docstring."""
    path = Path(path)
    try:
        if path.is_dir():
            return None
        with path.open("rb") as head:
            if head.read(4) != _MAGIC:
                log.debug("not a GGUF file", extra={"event": "gguf_not_gguf", "path": str(path)})
                return None
        stat = path.stat()
        return _read_once(path, stat.st_size, stat.st_mtime_ns)
    except _BAD_FILE as exc:
        log.warning(
            "cannot read GGUF metadata",
            extra={"event": "gguf_unreadable", "path": str(path), "reason": f"{type(exc).__name__}: {exc}"},
        )
        return None


@functools.lru_cache(maxsize=64)
def _read_once(path: Path, size: int, mtime_ns: int) -> ModelFacts | None:
    """One read per unchanged file (its size and mtime key the cache): a restart costs nothing."""
    return _facts(_FactsReader(path))


class _FactsReader(GGUFReader):
    """``GGUFReader`` that steps over the elements of metadata arrays longer than
    :data:`ARRAY_READ_MAX`: such a field's ``contents()`` is empty, its ``types`` are still
    ``[ARRAY, element type]``. It overrides the reader's private ``_get_field_parts`` (gguf is pinned;
    tests/support/gguf_reading.py compares it with the plain reader, on tiny files and on SmolLM2). A
    length that runs past the end of the file raises ``ValueError``, as the plain reader's short views
    do."""

    def _get_field_parts(
        self, orig_offs: int, raw_type: int
    ) -> tuple[int, list[npt.NDArray[Any]], list[int], list[GGUFValueType]]:
        if raw_type != GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        if len(alen) < 1 or int(alen[0]) <= ARRAY_READ_MAX:
            return super()._get_field_parts(orig_offs, raw_type)
        itype = GGUFValueType(int(raw_itype[0]))
        count, offs, end = int(alen[0]), orig_offs + 12, len(self.data)
        if itype == GGUFValueType.STRING:
            length = struct.Struct("<Q" if self.endianess == GGUFEndian.LITTLE else ">Q")
            data = self.data.data  # the map's bytes, without a numpy view per string
            for _ in range(count):
                if offs + 8 > end:
                    raise ValueError("a GGUF string array runs past the end of the file")
                offs += 8 + length.unpack_from(data, offs)[0]
        else:
            element = self.gguf_scalar_to_np.get(itype)
            if element is None:  # an array of arrays: not a tokenizer's, so read it as gguf does
                return super()._get_field_parts(orig_offs, raw_type)
            offs += count * np.dtype(element).itemsize
        if offs > end:
            raise ValueError("a GGUF array runs past the end of the file")
        return offs - orig_offs, [raw_itype, alen], [], [GGUFValueType.ARRAY, itype]


_PR_SET_PDEATHSIG: Final = 1  # <linux/prctl.h>


@functools.cache
def _worker() -> concurrent.futures.ProcessPoolExecutor:
    """One worker process per service, started on first use, and gone with the service."""
    # spawn, not fork: the services hold gRPC and event-loop threads that a forked child must not inherit
    return concurrent.futures.ProcessPoolExecutor(
        max_workers=1,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_exit_with_parent,
        initargs=(os.getpid(),),
    )


def _exit_with_parent(parent: int) -> None:
    """A worker whose service dies without shutting the pool down (SIGKILL, a crash) would wait
    forever: the pool's queue holds both ends of its pipe in the worker, so no EOF ever comes. On Linux
    the kernel kills it with its parent (PR_SET_PDEATHSIG); a parent already gone ends it at once."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(0)


def default_cache_file() -> Path:
    """``$XDG_CACHE_HOME/llorch/gguf-facts.json`` (``~/.cache`` by default): facts depend only on the
    file, so every stack and service on the machine shares them."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "llorch" / "gguf-facts.json"


async def facts_of(path: Path, cache_file: Path | None = None) -> ModelFacts | None:
    """:func:`read_facts` for a service's event loop: the parse runs in a worker process (it holds the
    GIL for seconds on a large vocabulary, which would stall every stream), and its result is kept in
    ``cache_file`` (:func:`default_cache_file`) per (path, size, mtime_ns), so a restart or another
    service reads nothing."""
    cache_file = cache_file or default_cache_file()
    key = (id(asyncio.get_running_loop()), str(path))
    async with _locks.setdefault(key, asyncio.Lock()):  # replicas of one file parse it once
        try:
            return await _facts_cached(path, cache_file)
        except (OSError, concurrent.futures.process.BrokenProcessPool) as exc:  # never fail a preload
            log.warning(
                "cannot read GGUF facts",
                extra={"event": "gguf_unreadable", "path": str(path), "reason": type(exc).__name__},
            )
            return None


_locks: dict[tuple[int, str], asyncio.Lock] = {}


async def _facts_cached(path: Path, cache_file: Path) -> ModelFacts | None:
    try:
        stat = await asyncio.to_thread(path.stat)
    except OSError:
        return None
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    cache = await asyncio.to_thread(_load_cache, cache_file)
    if key in cache:
        return _from_json(cache[key])
    facts = await asyncio.get_running_loop().run_in_executor(_worker(), read_facts, path)
    if facts is not None:
        cache[key] = dataclasses.asdict(facts)
        await asyncio.to_thread(_save_cache, cache_file, cache)
    return facts


def _load_cache(cache_file: Path) -> dict[str, dict[str, Any]]:
    try:
        loaded = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _save_cache(cache_file: Path, cache: dict[str, dict[str, Any]]) -> None:
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    partial = cache_file.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
    partial.write_text(json.dumps(cache, sort_keys=True))
    partial.replace(cache_file)  # atomic: services sharing the file never read half of it


def _from_json(data: dict[str, Any]) -> ModelFacts | None:
    try:
        return ModelFacts(**{**data, "kv_heads": tuple(data.get("kv_heads") or ())})
    except TypeError:
        return None


def facts_json(facts: ModelFacts) -> FactsJson:
    """The catalog entry's ``gguf`` object. ``kv_heads`` is one number when every layer has the same."""
    heads = facts.kv_heads
    return {
        "architecture": facts.architecture,
        "parameter_count": facts.parameter_count,
        "quantisation": facts.quantisation,
        "trained_ctx": facts.trained_ctx,
        "layers": facts.layers,
        "kv_heads": heads[0] if heads and len(set(heads)) == 1 else list(heads) or None,
        "key_length": facts.key_length,
        "value_length": facts.value_length,
        "kv_bytes_per_token_f16": facts.kv_bytes_per_token(),
    }


def _facts(reader: GGUFReader) -> ModelFacts | None:
    arch = _string(reader, "general.architecture")
    if arch is None:
        log.warning("GGUF file without general.architecture", extra={"event": "gguf_no_arch"})
        return None
    layers = _scalar(reader, f"{arch}.block_count")
    head_count = _per_layer(reader, f"{arch}.attention.head_count", layers)
    kv_key = f"{arch}.attention.head_count_kv"
    kv_heads = _per_layer(reader, kv_key, layers) if reader.get_field(kv_key) is not None else head_count
    head_dim = None
    embedding = _scalar(reader, f"{arch}.embedding_length")
    if embedding is not None and head_count and head_count[0] > 0:
        head_dim = embedding // head_count[0]
    key_length = _scalar(reader, f"{arch}.attention.key_length")
    value_length = _scalar(reader, f"{arch}.attention.value_length")
    params = _scalar(reader, "general.parameter_count")
    return ModelFacts(
        architecture=arch,
        parameter_count=params if params is not None else sum(t.n_elements for t in reader.tensors),
        quantisation=_quantisation(reader),
        trained_ctx=_scalar(reader, f"{arch}.context_length"),
        layers=layers,
        kv_heads=kv_heads,
        key_length=key_length if key_length is not None else head_dim,
        value_length=value_length if value_length is not None else head_dim,
    )


def _quantisation(reader: GGUFReader) -> str | None:
    """``general.file_type`` without llama.cpp's MOSTLY_/ALL_ prefix (as llama-server prints it), else
    the tensor type holding the most weights."""
    file_type = _scalar(reader, "general.file_type")
    known = {t.value: t for t in LlamaFileType if t != LlamaFileType.GUESSED}
    if file_type in known:
        return known[file_type].name.removeprefix("MOSTLY_").removeprefix("ALL_")
    weights: Counter[str] = Counter()
    for tensor in reader.tensors:
        weights[tensor.tensor_type.name] += tensor.n_elements
    return weights.most_common(1)[0][0] if weights else None


def _string(reader: GGUFReader, key: str) -> str | None:
    field = reader.get_field(key)
    if field is None or field.types != [GGUFValueType.STRING]:
        return None
    value = field.contents()
    return value if isinstance(value, str) else None


def _scalar(reader: GGUFReader, key: str) -> int | None:
    """An integer scalar; None when absent or of another type."""
    field = reader.get_field(key)
    if field is None or len(field.types) != 1 or field.types[0] == GGUFValueType.BOOL:
        return None
    value = field.contents()
    return value if isinstance(value, int) else None


def _per_layer(reader: GGUFReader, key: str, layers: int | None) -> tuple[int, ...]:
    """An integer stored once or once per layer, as one value per layer; empty when absent or when an
    array's length is not the layer count."""
    field = reader.get_field(key)
    if field is None or layers is None:
        return ()
    if field.types and field.types[0] == GGUFValueType.ARRAY:
        values = field.contents()
        if isinstance(values, list) and len(values) == layers and all(isinstance(v, int) for v in values):
            return tuple(values)
        log.warning(
            "GGUF per-layer array does not match block_count", extra={"event": "gguf_bad_array", "key": key}
        )
        return ()
    value = _scalar(reader, key)
    return () if value is None else (value,) * layers
