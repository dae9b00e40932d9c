"""Which models load from a GGUF file, and the error when the `gguf` extra is missing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from asyncopd.models import loading

pytestmark = pytest.mark.unit


def test_a_gguf_file_or_a_directory_holding_one_is_a_gguf_model(tmp_path: Path) -> None:
    single = tmp_path / "smol"
    single.mkdir()
    (single / "model.Q4_1.gguf").write_bytes(b"GGUF")
    assert loading.gguf_location(str(single / "model.Q4_1.gguf")) == (single, "model.Q4_1.gguf")
    assert loading.gguf_location(str(single)) == (single, "model.Q4_1.gguf")
    (single / "other.gguf").write_bytes(b"GGUF")
    assert loading.gguf_location(str(single)) is None, "two files: which one is ambiguous"
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.gguf").write_bytes(b"GGUF")
    assert loading.gguf_location(str(hf)) is None, "an HF directory loads as one"
    assert loading.gguf_location("Qwen/Qwen3-1.7B") is None
    assert loading.gguf_location("assets/toy-student") is None


def test_a_gguf_model_without_the_extra_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ImportError, match=r"needs gguf: pip install 'asyncopd\[gguf\]'"):
        loading.load_tokenizer(str(path))
