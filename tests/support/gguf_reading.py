"""The check that llorch.gguf_meta's facts reader reads a GGUF file as gguf's own reader does."""

from __future__ import annotations

from pathlib import Path

import gguf

from llorch.gguf_meta import ARRAY_READ_MAX, _facts, _FactsReader


def same_reading(path: Path) -> None:
    """The facts reader and gguf's own reader give the same facts, the same fields at the same
    offsets (the long arrays without their elements) and the same tensors."""
    plain, fast = gguf.GGUFReader(path), _FactsReader(path)
    assert _facts(fast) == _facts(plain)
    assert list(fast.fields) == list(plain.fields)
    for name, field in plain.fields.items():
        got = fast.fields[name]
        assert (got.offset, got.types) == (field.offset, field.types), name
        long = field.types[0] == gguf.GGUFValueType.ARRAY and len(field.data) > ARRAY_READ_MAX
        assert got.contents() == ([] if long else field.contents()), name
    assert [(t.name, t.shape.tolist(), t.data_offset) for t in fast.tensors] == [
        (t.name, t.shape.tolist(), t.data_offset) for t in plain.tensors
    ]
