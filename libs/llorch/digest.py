"""Model digests: sha256 of the model file, cached by (path, size, mtime_ns) under the state dir."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


async def model_digest(path: Path, cache_file: Path) -> str:
    """The model file's digest; the file is read only when it changed since the last call."""
    return await asyncio.to_thread(_cached_digest, path, cache_file)


def _cached_digest(path: Path, cache_file: Path) -> str:
    resolved = path.resolve()
    stat = resolved.stat()
    key = f"{resolved}|{stat.st_size}|{stat.st_mtime_ns}"
    cache: dict[str, str] = {}
    if cache_file.exists():
        try:
            cache = json.loads(cache_file.read_text())
        except json.JSONDecodeError:
            cache = {}
    if key not in cache:
        cache[key] = _sha256_file(resolved)
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps(cache, indent=1, sort_keys=True))
    return cache[key]
