from __future__ import annotations

import hashlib

from hypothesis import given
from hypothesis import strategies as st

from llorch.ids import correlation_id, default_seed, is_valid_id, replica_set_id


@given(st.text(min_size=1, max_size=64))
def test_default_seed_is_31_bit_and_follows_the_spec(task_id: str) -> None:
    seed = default_seed(task_id)
    assert 0 <= seed <= 2**31 - 1
    assert seed == int.from_bytes(hashlib.sha256(task_id.encode()).digest()[:4], "big") & 0x7FFFFFFF


def test_id_rule() -> None:
    assert is_valid_id("a") and is_valid_id("Task-1.2:3_x") and is_valid_id("a" * 128)
    for bad in ("", "-a", ".a", "a b", "a" * 129, "tâche", "a/b"):
        assert not is_valid_id(bad), bad


def test_correlation_id_echoes_only_well_formed_values() -> None:
    assert correlation_id("abc-123") == "abc-123"
    minted = correlation_id("has space")
    assert minted != "has space" and len(minted) == 36
    assert correlation_id(None) != correlation_id(None)
    assert correlation_id("x" * 129) != "x" * 129


def test_replica_set_id_pins_every_part_of_the_key() -> None:
    base = ("llamacpp", "sha256:aa", 4096, "b1", "v1")
    rs = replica_set_id(*base)
    assert rs.startswith("rs-") and len(rs) == 15
    assert rs == replica_set_id(*base)
    for i, changed in enumerate(("vllm", "sha256:bb", 2048, "b2", "v2")):
        other = list(base)
        other[i] = changed
        assert replica_set_id(*other) != rs  # type: ignore[arg-type]
