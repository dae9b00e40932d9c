"""Model and tokenizer loading: save/reload fidelity and the shared-tokenizer check."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from asyncopd.models.files import resolve_model_path
from asyncopd.models.loading import (
    TokenizerMismatchError,
    check_same_tokenizer,
    load_model,
    load_tokenizer,
)
from asyncopd.tasks.toy.tokenizer import VOCAB_SIZE, build_tokenizer
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

pytestmark = pytest.mark.unit


def _tiny_qwen3() -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=64,
    )
    return Qwen3ForCausalLM(config).eval()


def test_saved_model_reloads_with_identical_logits(tmp_path: Path) -> None:
    model = _tiny_qwen3()
    model.save_pretrained(tmp_path)
    build_tokenizer().save_pretrained(tmp_path)
    reloaded = load_model(str(tmp_path), "float32", "cpu")
    tokenizer = load_tokenizer(str(tmp_path))
    ids = torch.tensor([tokenizer("Q:1+2*3=? A:")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert not reloaded.training


def test_load_model_casts_dtype(tmp_path: Path) -> None:
    _tiny_qwen3().save_pretrained(tmp_path)
    assert next(load_model(str(tmp_path), "bfloat16").parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(str(tmp_path), "float8")


def test_missing_local_directory_is_a_clear_error() -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_path("./no/such/model")


def test_shipped_asset_paths_resolve_from_any_working_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir("/")
    assert Path(resolve_model_path("assets/toy-teacher"), "config.json").is_file()


def test_check_same_tokenizer_accepts_equal_and_rejects_different_vocabularies() -> None:
    check_same_tokenizer(build_tokenizer(), build_tokenizer())
    other = build_tokenizer()
    other.add_tokens(["<new>"])
    with pytest.raises(TokenizerMismatchError, match="only in teacher"):
        check_same_tokenizer(build_tokenizer(), other)


def test_check_same_tokenizer_rejects_same_tokens_under_different_ids() -> None:
    from tokenizers import Tokenizer, models

    def word_level(vocab: dict[str, int]) -> PreTrainedTokenizerFast:
        backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="u"))
        return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="u", eos_token="e")

    a = word_level({"u": 0, "e": 1, "x": 2, "y": 3})
    b = word_level({"u": 0, "e": 1, "x": 3, "y": 2})
    with pytest.raises(TokenizerMismatchError, match="different ids"):
        check_same_tokenizer(a, b)
