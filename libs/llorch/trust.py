"""Verification of one catalog model (SPEC §5.7 ORCH-3061, ORCH-3037a).

:func:`verify` runs the five checks on a :class:`ModelClaim` under the effective
:class:`~llorch.config.TrustPolicy` and returns a :class:`Verification`; it never raises for a bad model.
The scheduler's catalog stores and counts the result, and pool managers call it before preload.

1. The model is hashed with sha256 by a :class:`~llorch.digest.DigestCache` (a directory over its
   manifest lines ``"<sha256>  <relpath>\\n"`` sorted by path), cached per (path, size, mtime_ns).
2. The hash is compared with the declared ``digest``: a mismatch fails in both modes. A missing digest is
   pinned (``pinned=True``, the caller stores ``digest``) under permissive and is an error under strict.
3. ``ed25519`` signatures over the digest string (UTF-8 of ``"sha256:<hex>"``; the declared digest, or the
   computed one when none is declared) are checked against the keys in ``ca_roots``.
4. A local SBOM (a path, or a ``file://`` URI) must hash to its declared digest.
5. With ``allowed_registries`` set, the host of ``source_url`` must be one of them.

``ca_roots`` entries are either an inline key, the base64 of the raw 32-byte ed25519 public key (as
``Ed25519PublicKey.public_bytes(Encoding.Raw, PublicFormat.Raw)`` gives), or a path to a PEM
``SubjectPublicKeyInfo`` file (``-----BEGIN PUBLIC KEY-----``); a relative path is taken from the working
directory. An inline PEM block is accepted as well. An entry that yields no ed25519 key is skipped with a
warning.

Severity: a digest, SBOM digest or signature that does not verify, a disallowed registry and a missing
file are errors in both modes. A missing signature or SBOM, and a signature in an algorithm other than
ed25519, are errors only where the policy requires signatures (SBOMs), otherwise warnings. ``reasons``
lists the SPEC reason of every error and warning, in check order; a warning with no SPEC reason (an SBOM
at a remote URI, which is not fetched; an unusable ``ca_roots`` entry) adds none.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal, NamedTuple
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from llorch.config import CatalogModelConfig, TrustPolicy
from llorch.digest import DigestCache

Reason = Literal[
    "ok",
    "digest_mismatch",
    "missing_signature",
    "bad_signature",
    "unsupported_algo",
    "missing_sbom",
    "sbom_mismatch",
    "registry_not_allowed",
    "file_missing",
]
Status = Literal["pass", "fail"]
_ED25519: Final = "ed25519"
_DIGEST_PREFIX: Final = "sha256:"


class Signature(NamedTuple):
    signer: str
    algo: str
    sig: str  # base64 of the signature bytes


class Sbom(NamedTuple):
    uri: str  # a local path, a file:// URI, or a remote URI (recorded, not fetched)
    digest: str  # "sha256:<hex>"


@dataclass(frozen=True)
class ModelClaim:
    """What a catalog entry declares about its model."""

    path: Path
    digest: str | None = None
    source_url: str | None = None
    signatures: tuple[Signature, ...] = ()
    sbom: Sbom | None = None


@dataclass(frozen=True)
class Verification:
    """The outcome of :func:`verify`: ``status`` is ``fail`` iff ``errors`` is non-empty."""

    status: Status
    digest: str | None  # the computed "sha256:<hex>"; None when the model could not be read
    warnings: list[str]
    errors: list[str]
    reasons: list[Reason]  # ["ok"] alone when there is no error or warning with a SPEC reason
    pinned: bool  # no digest was declared and the computed one is to be stored (permissive only)
    checked_ms: int  # wall clock, ms since the epoch

    @property
    def passed(self) -> bool:
        return self.status == "pass"


def policy_for(entry_policy: TrustPolicy | None, catalog_policy: TrustPolicy) -> TrustPolicy:
    """The effective policy of one entry: the fields its own policy sets win, the rest are the catalog's."""
    if entry_policy is None:
        return catalog_policy
    overrides = {name: getattr(entry_policy, name) for name in entry_policy.model_fields_set}
    return catalog_policy.model_copy(update=overrides)


def claim_of(cfg: CatalogModelConfig) -> ModelClaim:
    """The claim a ``catalog.models[]`` entry makes."""
    return ModelClaim(
        path=cfg.path,
        digest=cfg.digest,
        source_url=cfg.source_url,
        signatures=tuple(Signature(s.signer, s.algo, s.sig) for s in cfg.signatures),
        sbom=Sbom(cfg.sbom.uri, cfg.sbom.digest) if cfg.sbom is not None else None,
    )


@dataclass
class _Findings:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    reasons: list[Reason] = field(default_factory=list)

    def add(self, reason: Reason | None, message: str, *, fatal: bool) -> None:
        (self.errors if fatal else self.warnings).append(message)
        if reason is not None and reason not in self.reasons:
            self.reasons.append(reason)


async def verify(
    claim: ModelClaim, policy: TrustPolicy, hasher: DigestCache, *, clock: Callable[[], float] = time.time
) -> Verification:
    """Run the ORCH-3061 checks on ``claim`` under ``policy`` (already merged by :func:`policy_for`)."""
    found = _Findings()
    computed: str | None = None
    try:
        computed = await hasher.digest(claim.path)
    except FileNotFoundError:
        found.add(
            "file_missing", f"model not found at {claim.path}: fix path or restore the file", fatal=True
        )
    except OSError as exc:
        what = exc.__class__.__name__
        found.add("file_missing", f"cannot read the model at {claim.path} ({what}): check it", fatal=True)
    pinned = _check_digest(claim, policy, computed, found)
    subject = claim.digest or computed
    keys = await asyncio.to_thread(_load_keys, policy.ca_roots, found)
    _check_signatures(claim.signatures, subject, keys, policy, found)
    await _check_sbom(claim, policy, hasher, found)
    _check_registry(claim.source_url, policy.allowed_registries, found)
    return Verification(
        status="fail" if found.errors else "pass",
        digest=computed,
        warnings=found.warnings,
        errors=found.errors,
        reasons=found.reasons or ["ok"],
        pinned=pinned,
        checked_ms=int(clock() * 1000),
    )


def _check_digest(claim: ModelClaim, policy: TrustPolicy, computed: str | None, found: _Findings) -> bool:
    """Compare with the declared digest; True when a missing one is to be pinned."""
    if computed is None:
        return False  # nothing to compare: the file is missing, already an error
    if claim.digest is None:
        if policy.mode == "permissive":
            return True
        msg = f"no digest declared and trust mode is strict: declare digest: {computed} if this file is right"
        found.add("digest_mismatch", msg, fatal=True)
        return False
    if claim.digest != computed:
        msg = (
            f"the model at {claim.path} hashes to {computed}, not the declared {claim.digest}: "
            "re-download the model or correct digest"
        )
        found.add("digest_mismatch", msg, fatal=True)
    return False


def _load_keys(ca_roots: Sequence[str], found: _Findings) -> list[Ed25519PublicKey]:
    keys: list[Ed25519PublicKey] = []
    for i, entry in enumerate(ca_roots):
        key, problem = _load_key(entry.strip())
        if key is not None:
            keys.append(key)
        else:
            found.add(None, f"trust_policy.ca_roots[{i}]: {problem}; it is skipped", fatal=False)
    return keys


def _load_key(entry: str) -> tuple[Ed25519PublicKey | None, str]:
    """A key from one ``ca_roots`` entry, or None and why (never quoting what may be key text)."""
    raw = _b64(entry)
    if raw is not None and len(raw) == 32:
        return Ed25519PublicKey.from_public_bytes(raw), ""
    if entry.startswith("-----BEGIN"):
        return _pem_key(entry.encode(), "the inline PEM key")
    path = Path(entry).expanduser()
    try:
        return _pem_key(path.read_bytes(), str(path))
    except OSError as exc:
        why = exc.__class__.__name__
    if raw is not None:
        return None, f"the inline key decodes to {len(raw)} bytes, not the 32 of a raw ed25519 public key"
    if "/" not in entry:
        return None, "neither a readable PEM file nor the base64 of a raw 32-byte ed25519 public key"
    return None, f"cannot read {path} ({why}): give a PEM public key file or an inline base64 key"


def _b64(text: str) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def _pem_key(data: bytes, where: str) -> tuple[Ed25519PublicKey | None, str]:
    try:
        key = load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        return None, f"{where} is not a PEM public key"
    if not isinstance(key, Ed25519PublicKey):
        return None, f"{where} is a {type(key).__name__}, not an ed25519 public key"
    return key, ""


def _check_signatures(
    signatures: Sequence[Signature],
    subject: str | None,
    keys: Sequence[Ed25519PublicKey],
    policy: TrustPolicy,
    found: _Findings,
) -> None:
    required = policy.effective_require_signature
    if not signatures:
        msg = "no signature declared: add an ed25519 signature over the digest"
        found.add(
            "missing_signature", msg + ("" if required else " (not required by policy)"), fatal=required
        )
        return
    if subject is None:
        return  # no digest to check them against: the model is missing, already an error
    unsupported: list[Signature] = []
    verified = False
    for sig in signatures:
        if sig.algo.lower() != _ED25519:
            unsupported.append(sig)
        elif _signature_ok(sig, subject, keys):
            verified = True
        else:
            hint = (
                "no ca_roots are configured: add the signer's public key to trust_policy.ca_roots"
                if not keys
                else "no key in trust_policy.ca_roots accepts it: check the signer key and the signed digest"
            )
            found.add(
                "bad_signature",
                f"signature by {sig.signer!r} over {subject} does not verify: {hint}",
                fatal=True,
            )
    for sig in unsupported:
        msg = f"signature by {sig.signer!r} uses algo {sig.algo!r}, which is not checked: only ed25519 is"
        found.add("unsupported_algo", msg, fatal=required and not verified)


def _signature_ok(sig: Signature, subject: str, keys: Sequence[Ed25519PublicKey]) -> bool:
    raw = _b64(sig.sig)
    if raw is None or len(raw) != 64:
        return False
    for key in keys:
        try:
            key.verify(raw, subject.encode())
        except InvalidSignature:
            continue
        return True
    return False


async def _check_sbom(claim: ModelClaim, policy: TrustPolicy, hasher: DigestCache, found: _Findings) -> None:
    required = policy.effective_require_sbom
    if claim.sbom is None:
        msg = "no SBOM declared: add sbom: {uri, digest}" + ("" if required else " (not required by policy)")
        found.add("missing_sbom", msg, fatal=required)
        return
    path = _local_path(claim.sbom.uri, claim.path)
    if path is None:
        found.add(None, f"the SBOM at {claim.sbom.uri} is remote and was not checked", fatal=False)
        return
    try:
        actual = await hasher.digest(path)
    except OSError as exc:
        msg = f"cannot read the SBOM at {path} ({exc.__class__.__name__}): fix sbom.uri or restore it"
        found.add("missing_sbom", msg, fatal=required)
        return
    if actual != claim.sbom.digest:
        msg = f"the SBOM at {path} hashes to {actual}, not the declared {claim.sbom.digest}: fix sbom.digest"
        found.add("sbom_mismatch", msg, fatal=True)


def _local_path(uri: str, model: Path) -> Path | None:
    """The local file an SBOM URI names (relative paths are taken from the model's directory), or None."""
    parts = urlsplit(uri)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            return None
        return Path(url2pathname(unquote(parts.path)))
    if parts.scheme:
        return None
    path = Path(uri).expanduser()
    return path if path.is_absolute() else model.parent / path


def _check_registry(source_url: str | None, allowed: Sequence[str], found: _Findings) -> None:
    if not allowed:
        return
    names = ", ".join(allowed)
    if source_url is None:
        msg = f"no source_url declared, and trust_policy.allowed_registries is set ({names}): declare it"
        found.add("registry_not_allowed", msg, fatal=True)
        return
    host = _host(source_url)
    if host is None or host not in {_host(a) or a.lower() for a in allowed}:
        msg = (
            f"source_url host {host or '(none)'} is not in trust_policy.allowed_registries ({names}): "
            "fetch the model from an allowed registry or add its host"
        )
        found.add("registry_not_allowed", msg, fatal=True)


def _host(url: str) -> str | None:
    """The lower-case host of a URL, or of a bare ``host[:port]``."""
    try:
        return urlsplit(url if "://" in url else f"//{url}").hostname
    except ValueError:
        return None
