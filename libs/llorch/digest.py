"""Model digests (SPEC §5.7): sha256 of a model file, or of a model directory's manifest.

A directory (vLLM, TGI and Triton models) is hashed over its manifest lines ``"<sha256>  <relpath>\\n"``,
one per file, sorted by path. Results are cached under the state dir per (path, size, mtime_ns) of
each file, so an unchanged model is never read twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable
from pathlib import Path


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


async def model_digest(path: Path, cache_file: Path) -> str:
    """``sha256:<hex>`` of the model; files are read only when they changed since the last call."""
    return await asyncio.to_thread(_cached_digest, path, cache_file, _sha256_file)


class DigestCache:
    """:func:`model_digest` over one cache file, as the object the trust checks take
    (:func:`llorch.trust.verify`); ``files_hashed`` counts the files actually read."""

    def __init__(self, cache_file: Path) -> None:
        self.cache_file = cache_file
        self.files_hashed = 0

    async def digest(self, path: Path) -> str:
        """``sha256:<hex>`` of a file or a directory's manifest; raises ``OSError`` if unreadable."""
        return await asyncio.to_thread(_cached_digest, path, self.cache_file, self._read)

    def _read(self, path: Path) -> str:
        self.files_hashed += 1
        return _sha256_file(path)


def _cached_digest(path: Path, cache_file: Path, read: Callable[[Path], str]) -> str:
    cache: dict[str, str] = {}
    if cache_file.exists():
        try:
            cache = json.loads(cache_file.read_text())
        except json.JSONDecodeError:
            cache = {}
    before = dict(cache)

    def file_hex(file: Path) -> str:
        stat = file.stat()
        key = f"{file}|{stat.st_size}|{stat.st_mtime_ns}"
        if key not in cache:
            cache[key] = read(file)
        return cache[key]

    resolved = path.resolve()
    if resolved.is_dir():
        files = sorted(
            (p for p in resolved.rglob("*") if p.is_file()), key=lambda p: p.relative_to(resolved).as_posix()
        )
        manifest = "".join(f"{file_hex(p.resolve())}  {p.relative_to(resolved).as_posix()}\n" for p in files)
        result = hashlib.sha256(manifest.encode()).hexdigest()
    else:
        result = file_hex(resolved)
    if cache != before:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps(cache, indent=1, sort_keys=True))
    return "sha256:" + result
