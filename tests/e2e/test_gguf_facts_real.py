"""The GGUF facts of a real model (``LLORCH_MODEL_GGUF``, SmolLM2 under ``make test``): the facts reader,
which steps over the tokenizer's long arrays, reads what gguf's own reader reads."""

from __future__ import annotations

from pathlib import Path

from tests.support.gguf_reading import same_reading


def test_the_facts_reader_reads_a_real_model_as_gguf_does(model_gguf: Path) -> None:
    same_reading(model_gguf)
