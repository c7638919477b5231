"""Model digests: a file's sha256, a directory's manifest hash, and the cache."""

from __future__ import annotations

import hashlib
from pathlib import Path

from llorch.digest import model_digest


async def test_file_digest_is_its_sha256_and_cached(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"weights")
    cache = tmp_path / "state" / "digests.json"
    expected = "sha256:" + hashlib.sha256(b"weights").hexdigest()
    assert await model_digest(model, cache) == expected
    assert expected[7:] in cache.read_text()
    assert await model_digest(model, cache) == expected


async def test_directory_digest_hashes_the_sorted_manifest(tmp_path: Path) -> None:
    model = tmp_path / "repo"
    (model / "sub").mkdir(parents=True)
    (model / "b.bin").write_bytes(b"B")
    (model / "sub" / "a.json").write_bytes(b"A")
    manifest = (
        f"{hashlib.sha256(b'B').hexdigest()}  b.bin\n" + f"{hashlib.sha256(b'A').hexdigest()}  sub/a.json\n"
    )
    digest = await model_digest(model, tmp_path / "digests.json")
    assert digest == "sha256:" + hashlib.sha256(manifest.encode()).hexdigest()
    (model / "b.bin").write_bytes(b"changed")
    assert await model_digest(model, tmp_path / "digests.json") != digest
