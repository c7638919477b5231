"""contracts/ carries copies of the shared contracts so the suite runs from any clone; when the shared
folder sits beside the repository, the copies must equal it."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "contracts"


@pytest.mark.parametrize("name", ["error-codes.json", "metrics.lint.json"])
def test_contract_copy_matches_shared(name: str) -> None:
    if not SHARED.is_dir():
        pytest.skip("no ../shared beside this checkout")
    assert (ROOT / "contracts" / name).read_bytes() == (SHARED / name).read_bytes()
