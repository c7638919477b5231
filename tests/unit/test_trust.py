"""Model verification (SPEC §5.7 ORCH-3061, ORCH-3037a): digests, signatures, SBOMs, registries, modes."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from llorch.config import CatalogModelConfig, TrustPolicy
from llorch.digest import DigestCache, model_digest
from llorch.trust import (
    ModelClaim,
    Sbom,
    Signature,
    Verification,
    claim_of,
    policy_for,
    verify,
)

WEIGHTS = b"gguf weights" * 1000
DIGEST = "sha256:" + hashlib.sha256(WEIGHTS).hexdigest()
SBOM = b'{"bomFormat": "CycloneDX"}'
SBOM_DIGEST = "sha256:" + hashlib.sha256(SBOM).hexdigest()
PERMISSIVE = TrustPolicy()


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "m.gguf"
    path.write_bytes(WEIGHTS)
    return path


@pytest.fixture
def sbom(tmp_path: Path) -> Path:
    path = tmp_path / "m.sbom.json"
    path.write_bytes(SBOM)
    return path


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def inline_root(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def sign(key: Ed25519PrivateKey, digest: str = DIGEST, signer: str = "release") -> Signature:
    return Signature(signer, "ed25519", base64.b64encode(key.sign(digest.encode())).decode())


def strict(*roots: str, **kwargs: object) -> TrustPolicy:
    return TrustPolicy.model_validate({"mode": "strict", "ca_roots": list(roots), **kwargs})


async def check(claim: ModelClaim, policy: TrustPolicy, hasher: DigestCache | None = None) -> Verification:
    cache = hasher or DigestCache(claim.path.parent / "digests-of-check.json")
    return await verify(claim, policy, cache, clock=lambda: 1_700_000_000.5)


async def test_unsigned_model_passes_permissive_with_warnings(model: Path) -> None:
    result = await check(ModelClaim(model, DIGEST), PERMISSIVE)
    assert result.status == "pass" and result.passed
    assert result.digest == DIGEST and not result.pinned and result.errors == []
    assert result.reasons == ["missing_signature", "missing_sbom"]
    assert len(result.warnings) == 2 and "not required" in result.warnings[0]
    assert result.checked_ms == 1_700_000_000_500


async def test_clean_model_reports_ok(model: Path, sbom: Path, key: Ed25519PrivateKey) -> None:
    claim = ModelClaim(model, DIGEST, signatures=(sign(key),), sbom=Sbom(str(sbom), SBOM_DIGEST))
    result = await check(claim, strict(inline_root(key)))
    assert (result.status, result.reasons, result.errors, result.warnings) == ("pass", ["ok"], [], [])


async def test_strict_fails_without_signature_and_sbom(model: Path) -> None:
    result = await check(ModelClaim(model, DIGEST), strict())
    assert result.status == "fail"
    assert result.reasons == ["missing_signature", "missing_sbom"]
    assert len(result.errors) == 2 and result.warnings == []


async def test_strict_requirements_can_be_relaxed(model: Path) -> None:
    policy = strict(require_signature=False, require_sbom=False)
    assert (await check(ModelClaim(model, DIGEST), policy)).status == "pass"


async def test_good_signature_passes_strict(model: Path, sbom: Path, key: Ed25519PrivateKey) -> None:
    other = Ed25519PrivateKey.generate()
    claim = ModelClaim(model, DIGEST, signatures=(sign(key),), sbom=Sbom(str(sbom), SBOM_DIGEST))
    result = await check(claim, strict(inline_root(other), inline_root(key)))
    assert result.status == "pass", result.errors


async def test_pem_file_root(model: Path, sbom: Path, key: Ed25519PrivateKey, tmp_path: Path) -> None:
    pem = tmp_path / "release.pub.pem"
    pem.write_bytes(key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    claim = ModelClaim(model, DIGEST, signatures=(sign(key),), sbom=Sbom(str(sbom), SBOM_DIGEST))
    assert (await check(claim, strict(str(pem)))).status == "pass"


async def test_unusable_root_warns_without_key_material(model: Path, key: Ed25519PrivateKey) -> None:
    short = base64.b64encode(b"x" * 31).decode()
    hexed = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
    roots = [short, hexed, "/nonexistent/key.pem", inline_root(key)]
    claim = ModelClaim(model, DIGEST, signatures=(sign(key),))
    result = await check(claim, TrustPolicy(ca_roots=roots))
    assert result.status == "pass", result.errors
    problems = [w for w in result.warnings if "ca_roots" in w]
    assert [p.split(":")[0] for p in problems] == [f"trust_policy.ca_roots[{i}]" for i in range(3)]
    assert "31 bytes" in problems[0] and "/nonexistent/key.pem" in problems[2]
    assert all(short not in w and hexed not in w for w in result.warnings)


@pytest.mark.parametrize("mode", ["strict", "permissive"])
async def test_bad_signature_fails(model: Path, key: Ed25519PrivateKey, mode: str) -> None:
    wrong_signer = Ed25519PrivateKey.generate()
    policy = TrustPolicy.model_validate({"mode": mode, "ca_roots": [inline_root(key)], "require_sbom": False})
    for bad in (sign(wrong_signer), sign(key, digest="sha256:" + "0" * 64), Signature("x", "ed25519", "!!")):
        result = await check(ModelClaim(model, DIGEST, signatures=(bad,)), policy)
        assert result.status == "fail" and result.reasons[0] == "bad_signature"
        assert len(result.errors) == 1 and bad.sig not in result.errors[0]


async def test_signature_without_roots_says_to_add_one(model: Path, key: Ed25519PrivateKey) -> None:
    result = await check(ModelClaim(model, DIGEST, signatures=(sign(key),)), PERMISSIVE)
    assert result.status == "fail" and "bad_signature" in result.reasons
    assert "no ca_roots" in result.errors[0]


async def test_unsupported_algo(model: Path, key: Ed25519PrivateKey) -> None:
    cosign = Signature("sigstore", "ecdsa-p256", base64.b64encode(b"sig").decode())
    roots = inline_root(key)
    alone = ModelClaim(model, DIGEST, signatures=(cosign,))
    result = await check(alone, strict(roots, require_sbom=False))
    assert result.status == "fail" and result.reasons == ["unsupported_algo", "missing_sbom"]
    assert len(result.errors) == 1 and "ecdsa-p256" in result.errors[0]
    result = await check(alone, TrustPolicy(ca_roots=[roots]))
    assert result.status == "pass" and "unsupported_algo" in result.reasons
    # Beside a signature that verifies, an unchecked one is only a warning, even under strict.
    both = ModelClaim(model, DIGEST, signatures=(cosign, sign(key)))
    result = await check(both, strict(roots, require_sbom=False))
    assert result.status == "pass" and result.reasons[0] == "unsupported_algo"


@pytest.mark.parametrize("mode", ["strict", "permissive"])
async def test_digest_mismatch_fails_in_both_modes(model: Path, mode: str) -> None:
    declared = "sha256:" + "ab" * 32
    policy = TrustPolicy.model_validate({"mode": mode, "require_signature": False, "require_sbom": False})
    result = await check(ModelClaim(model, declared), policy)
    assert result.status == "fail" and result.reasons[0] == "digest_mismatch" and len(result.errors) == 1
    assert result.digest == DIGEST and DIGEST in result.errors[0] and declared in result.errors[0]


async def test_missing_digest_is_pinned_under_permissive(model: Path) -> None:
    result = await check(ModelClaim(model), PERMISSIVE)
    assert result.status == "pass" and result.pinned and result.digest == DIGEST
    assert "digest_mismatch" not in result.reasons


async def test_missing_digest_fails_under_strict(model: Path) -> None:
    result = await check(ModelClaim(model), strict(require_signature=False, require_sbom=False))
    assert result.status == "fail" and not result.pinned
    assert result.reasons[0] == "digest_mismatch" and len(result.errors) == 1
    assert "no digest declared" in result.errors[0]
    assert DIGEST in result.errors[0]  # the operator can paste it


async def test_signature_over_pinned_digest(model: Path, key: Ed25519PrivateKey) -> None:
    claim = ModelClaim(model, signatures=(sign(key),))
    result = await check(claim, TrustPolicy(ca_roots=[inline_root(key)]))
    assert result.status == "pass" and result.pinned and "bad_signature" not in result.reasons


async def test_file_missing(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    claim = ModelClaim(tmp_path / "gone.gguf", DIGEST, signatures=(sign(key),))
    result = await check(claim, TrustPolicy(ca_roots=[inline_root(key)]))
    assert result.status == "fail" and result.digest is None and not result.pinned
    assert result.reasons[0] == "file_missing" and "gone.gguf" in result.errors[0]
    assert len(result.errors) == 1  # the signature still verifies against the declared digest


async def test_directory_is_hashed_over_its_sorted_manifest(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "sub").mkdir(parents=True)
    (repo / "b.bin").write_bytes(b"B")
    (repo / "sub" / "a.json").write_bytes(b"A")
    (repo / "a.txt").write_bytes(b"T")
    manifest = "".join(
        f"{hashlib.sha256(data).hexdigest()}  {rel}\n"
        for rel, data in [("a.txt", b"T"), ("b.bin", b"B"), ("sub/a.json", b"A")]
    )
    expected = "sha256:" + hashlib.sha256(manifest.encode()).hexdigest()
    result = await check(ModelClaim(repo, expected), PERMISSIVE)
    assert result.digest == expected and "digest_mismatch" not in result.reasons
    assert expected == await model_digest(repo, tmp_path / "cache.json")  # the pool manager's HashModel


async def test_unchanged_file_is_not_rehashed_and_a_touched_one_is(model: Path, tmp_path: Path) -> None:
    hasher = DigestCache(tmp_path / "digests.json")
    claim = ModelClaim(model, DIGEST)
    await check(claim, PERMISSIVE, hasher)
    await check(claim, PERMISSIVE, hasher)
    assert hasher.files_hashed == 1
    stat = os.stat(model)
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert (await check(claim, PERMISSIVE, hasher)).digest == DIGEST
    assert hasher.files_hashed == 2
    await asyncio.to_thread(model.write_bytes, b"tampered")  # a new size, whatever the clock granularity
    result = await check(claim, PERMISSIVE, hasher)
    assert hasher.files_hashed == 3 and result.reasons[0] == "digest_mismatch"
    # In a directory only the changed file is read again.
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "a").write_bytes(b"A")
    (repo / "b").write_bytes(b"B")
    first = await hasher.digest(repo)
    (repo / "b").write_bytes(b"BB")
    assert await hasher.digest(repo) != first
    assert hasher.files_hashed == 3 + 2 + 1


@pytest.mark.parametrize("as_uri", [False, True])
async def test_sbom_match_and_mismatch(model: Path, sbom: Path, as_uri: bool) -> None:
    uri = sbom.as_uri() if as_uri else str(sbom)
    good = await check(ModelClaim(model, DIGEST, sbom=Sbom(uri, SBOM_DIGEST)), PERMISSIVE)
    assert good.reasons == ["missing_signature"]
    bad = await check(ModelClaim(model, DIGEST, sbom=Sbom(uri, "sha256:" + "0" * 64)), PERMISSIVE)
    assert bad.status == "fail" and "sbom_mismatch" in bad.reasons


async def test_relative_sbom_is_taken_from_the_model_directory(model: Path, sbom: Path) -> None:
    result = await check(ModelClaim(model, DIGEST, sbom=Sbom(sbom.name, SBOM_DIGEST)), strict())
    assert "sbom_mismatch" not in result.reasons and "missing_sbom" not in result.reasons


async def test_sbom_missing_file_and_remote_uri(model: Path, tmp_path: Path) -> None:
    gone = Sbom(str(tmp_path / "gone.json"), SBOM_DIGEST)
    assert (await check(ModelClaim(model, DIGEST, sbom=gone), PERMISSIVE)).status == "pass"
    result = await check(ModelClaim(model, DIGEST, sbom=gone), strict(require_signature=False))
    assert result.status == "fail" and result.reasons == ["missing_signature", "missing_sbom"]
    assert len(result.errors) == 1 and "gone.json" in result.errors[0]
    remote = Sbom("https://example.org/m.sbom.json", SBOM_DIGEST)
    result = await check(ModelClaim(model, DIGEST, sbom=remote), strict(require_signature=False))
    assert result.status == "pass" and result.reasons == ["missing_signature"]
    assert "not checked" in result.warnings[-1]


async def test_registry_allowed_and_not(model: Path) -> None:
    policy = TrustPolicy(allowed_registries=["huggingface.co", "https://models.example.org"])
    for url in ("https://huggingface.co/Qwen/Qwen2.5-7B-Instruct-GGUF", "https://models.example.org:8443/m"):
        result = await check(ModelClaim(model, DIGEST, source_url=url), policy)
        assert "registry_not_allowed" not in result.reasons, url
    for bad in ("https://evil.example.com/huggingface.co/m", "https://user@HuggingFace.co.evil.test/", None):
        result = await check(ModelClaim(model, DIGEST, source_url=bad), policy)
        assert result.status == "fail" and result.reasons[-1] == "registry_not_allowed", bad
    upper = await check(ModelClaim(model, DIGEST, source_url="https://HuggingFace.CO/m"), policy)
    assert "registry_not_allowed" not in upper.reasons
    anywhere = await check(ModelClaim(model, DIGEST, source_url="https://x.test/m"), PERMISSIVE)
    assert "registry_not_allowed" not in anywhere.reasons


def test_policy_for_takes_the_fields_the_entry_sets() -> None:
    catalog = TrustPolicy(allowed_registries=["huggingface.co"], ca_roots=["k"])
    assert policy_for(None, catalog) is catalog
    merged = policy_for(TrustPolicy.model_validate({"mode": "strict"}), catalog)
    assert merged.mode == "strict" and merged.allowed_registries == ["huggingface.co"]
    assert merged.ca_roots == ["k"] and merged.effective_require_signature
    relaxed = policy_for(TrustPolicy(mode="permissive"), TrustPolicy(mode="strict"))
    assert relaxed.mode == "permissive" and not relaxed.effective_require_sbom


def test_claim_of_a_catalog_entry(tmp_path: Path) -> None:
    cfg = CatalogModelConfig.model_validate(
        {
            "id": "m",
            "path": str(tmp_path / "m.gguf"),
            "digest": DIGEST,
            "source_url": "https://huggingface.co/m",
            "signatures": [{"signer": "release", "algo": "ed25519", "sig": "c2ln"}],
            "sbom": {"uri": "m.sbom.json", "digest": SBOM_DIGEST},
        }
    )
    claim = claim_of(cfg)
    assert claim == ModelClaim(
        tmp_path / "m.gguf",
        DIGEST,
        "https://huggingface.co/m",
        (Signature("release", "ed25519", "c2ln"),),
        Sbom("m.sbom.json", SBOM_DIGEST),
    )
    assert claim_of(CatalogModelConfig.model_validate({"id": "n", "path": "/m"})).sbom is None
