"""GGUF metadata (llorch.gguf_meta) from tiny files written by gguf's own writer, and the exact KV sizing."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from llorch import gpu
from llorch.config import LlorchConfig
from llorch.gguf_meta import ARRAY_READ_MAX, ModelFacts, _FactsReader, facts_json, read_facts
from llorch_poolmgr import preload
from tests.support.gguf_reading import same_reading

LAYERS = 4
MIB = 1 << 20


def write_gguf(
    path: Path,
    *,
    kv_heads: int | Sequence[int] | None = 2,
    key_length: int | None = None,
    file_type: gguf.LlamaFileType | None = gguf.LlamaFileType.MOSTLY_Q8_0,
    parameter_count: int | None = None,
    vocabulary: int = 0,
) -> Path:
    """A fake llama GGUF: 4 layers, 64-wide embeddings, 8 query heads, GQA KV heads, two F32 tensors.
    ``vocabulary``: that many tokens, merges and token types (a tokenizer's long arrays) and a short
    array, written before the other keys, so a reader that steps over the long ones must land on the
    rest."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(LAYERS)
    if vocabulary:
        writer.add_token_list([f"tok-{i}-é" for i in range(vocabulary)])  # non-ASCII: lengths are bytes
        writer.add_token_merges([f"m {i}" for i in range(vocabulary)])
        writer.add_token_types([i % 6 for i in range(vocabulary)])
        writer.add_array("llorch.test.short", ["a", "bb", "ccc"])
    writer.add_context_length(4096)
    writer.add_embedding_length(64)
    writer.add_head_count(8)
    if kv_heads is not None:
        writer.add_head_count_kv(kv_heads)
    if key_length is not None:
        writer.add_key_length(key_length)
        writer.add_value_length(key_length // 2)
    if file_type is not None:
        writer.add_file_type(file_type)
    if parameter_count is not None:
        writer.add_uint64("general.parameter_count", parameter_count)
    writer.add_tensor("token_embd.weight", np.ones((10, 64), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_every_fact_of_a_gqa_llama(tmp_path: Path) -> None:
    facts = read_facts(write_gguf(tmp_path / "m.gguf"))
    assert facts == ModelFacts(
        architecture="llama",
        parameter_count=10 * 64 + 64,  # summed from the tensors: the file has no general.parameter_count
        quantisation="Q8_0",  # general.file_type MOSTLY_Q8_0, as llama-server prints it
        trained_ctx=4096,
        layers=LAYERS,
        kv_heads=(2,) * LAYERS,
        key_length=64 // 8,  # embedding_length / head_count without key_length
        value_length=64 // 8,
    )
    # per layer: (8 + 8) x 2 KV heads x 2 bytes (f16) = 64; 4 layers = 256
    assert facts.kv_bytes_per_token() == 256
    assert facts.kv_bytes_per_token(bytes_per_element=4) == 512


def test_per_layer_kv_heads_and_explicit_head_sizes(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", kv_heads=[4, 2, 0, 1], key_length=32, parameter_count=123)
    facts = read_facts(path)
    assert facts is not None
    assert facts.kv_heads == (4, 2, 0, 1)
    assert (facts.key_length, facts.value_length, facts.parameter_count) == (32, 16, 123)
    assert facts.kv_bytes_per_token() == (32 + 16) * (4 + 2 + 0 + 1) * 2
    assert facts_json(facts)["kv_heads"] == [4, 2, 0, 1]


def test_fallbacks_head_count_and_dominant_tensor_type(tmp_path: Path) -> None:
    facts = read_facts(write_gguf(tmp_path / "m.gguf", kv_heads=None, file_type=None))
    assert facts is not None
    assert facts.kv_heads == (8,) * LAYERS  # no head_count_kv: full multi-head attention
    assert facts.quantisation == "F32"  # no general.file_type: the type holding the most weights
    assert facts.kv_bytes_per_token() == (8 + 8) * 8 * LAYERS * 2


def test_a_per_layer_array_of_the_wrong_length_gives_no_kv_shape(tmp_path: Path) -> None:
    facts = read_facts(write_gguf(tmp_path / "m.gguf", kv_heads=[2, 2]))
    assert facts is not None and facts.kv_heads == () and facts.kv_bytes_per_token() is None
    assert facts_json(facts)["kv_heads"] is None


def test_facts_json_is_the_catalog_entry(tmp_path: Path) -> None:
    facts = read_facts(write_gguf(tmp_path / "m.gguf"))
    assert facts is not None
    assert facts_json(facts) == {
        "architecture": "llama",
        "parameter_count": 704,
        "quantisation": "Q8_0",
        "trained_ctx": 4096,
        "layers": LAYERS,
        "kv_heads": 2,
        "key_length": 8,
        "value_length": 8,
        "kv_bytes_per_token_f16": 256,
    }


def test_non_gguf_directory_missing_and_truncated_files_give_none(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "weights.safetensors").write_bytes(b"\x00" * 64)
    assert read_facts(tmp_path / "weights.safetensors") is None
    assert read_facts(tmp_path) is None
    assert read_facts(tmp_path / "absent.gguf") is None
    whole = write_gguf(tmp_path / "m.gguf").read_bytes()
    assert_cuts_give_none(tmp_path, whole, (4, 24, len(whole) // 3, len(whole) - 8), caplog)


def assert_cuts_give_none(
    tmp_path: Path, whole: bytes, cuts: Sequence[int], caplog: pytest.LogCaptureFixture
) -> None:
    """The file cut at each of ``cuts`` gives None and the "cannot read" warning."""
    for cut in cuts:
        (tmp_path / "cut.gguf").write_bytes(whole[:cut])
        with caplog.at_level(logging.WARNING, logger="llorch.gguf_meta"):
            caplog.clear()
            assert read_facts(tmp_path / "cut.gguf") is None, cut
        assert any(r.getMessage() == "cannot read GGUF metadata" for r in caplog.records), cut


def write_with_vocabulary(path: Path) -> Path:
    return write_gguf(path, kv_heads=[2, 2, 4, 4], vocabulary=ARRAY_READ_MAX + 1000)


def test_long_metadata_arrays_are_stepped_over_and_everything_else_reads_the_same(tmp_path: Path) -> None:
    path = write_with_vocabulary(tmp_path / "vocab.gguf")
    same_reading(path)
    fast = _FactsReader(path)
    tokens = fast.fields["tokenizer.ggml.tokens"]
    assert tokens.types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING]
    assert tokens.contents() == []
    assert fast.fields["llorch.test.short"].contents() == ["a", "bb", "ccc"]
    facts = read_facts(path)
    assert facts is not None
    assert (facts.trained_ctx, facts.kv_heads, facts.quantisation) == (4096, (2, 2, 4, 4), "Q8_0")


def test_a_file_cut_inside_a_long_array_gives_none(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    whole = write_with_vocabulary(tmp_path / "vocab.gguf").read_bytes()
    assert_cuts_give_none(tmp_path, whole, (len(whole) // 8, len(whole) // 4, len(whole) // 2), caplog)


def test_kv_reserve_from_facts_pads_the_context_as_llama_cpp_does(tmp_path: Path) -> None:
    facts = read_facts(write_gguf(tmp_path / "m.gguf"))
    assert facts is not None
    assert gpu.kv_reserve_from_facts(2048, 16, facts) == 2048 * 16 * 256
    assert gpu.kv_reserve_from_facts(1000, 3, facts) == 3072 * 256  # -c 3000 -> n_ctx 3072
    no_shape = ModelFacts("mamba", 1, None, None, 4, (), None, None)
    assert gpu.kv_reserve_from_facts(2048, 1, no_shape) is None
    with pytest.raises(ValueError):
        gpu.kv_reserve_from_facts(0, 1, facts)


@given(st.integers(1, 1 << 20), st.integers(1, 64), st.lists(st.integers(1, 64), min_size=1, max_size=8))
def test_kv_reserve_from_facts_covers_every_cell(ctx: int, slots: int, heads: list[int]) -> None:
    facts = ModelFacts("llama", 1, None, None, len(heads), tuple(heads), 64, 64)
    per_token = 128 * sum(heads) * 2
    reserve = gpu.kv_reserve_from_facts(ctx, slots, facts)
    assert reserve is not None
    assert ctx * slots * per_token <= reserve < (ctx * slots + 256) * per_token


def _pool_cfg(tmp_path: Path, model: Path, vram: dict[str, object]) -> LlorchConfig:
    return LlorchConfig.model_validate(
        {
            "version": 1,
            "state_dir": str(tmp_path / "state"),
            "catalog": {"models": [{"id": "m", "path": str(model)}]},
            "pools": [
                {"id": "p", "engine": "llamacpp", "model": "m", "devices": [0], "ctx": 2048, "slots": 4}
                | {"vram": vram}
            ],
        }
    )


def test_preload_uses_the_facts_and_the_operator_override_wins(tmp_path: Path) -> None:
    model = write_gguf(tmp_path / "m.gguf")
    facts = read_facts(model)
    size = model.stat().st_size
    pool = _pool_cfg(tmp_path, model, {"factor": 1.0}).pools[0]
    assert preload.kv_reserve(pool, size, facts) == 2048 * 4 * 256
    assert preload.kv_reserve(pool, size, None) == gpu.kv_reserve_estimate(2048, 4, size)
    assert preload.vram_need(pool, size, 1.0, facts) == size + 2048 * 4 * 256
    fixed = _pool_cfg(tmp_path, model, {"factor": 1.0, "kv_reserve_mib": 7}).pools[0]
    assert preload.kv_reserve(fixed, size, facts) == 7 * MIB
