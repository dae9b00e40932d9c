"""The toy character tokenizer: one id per character, fixed specials, save/load round-trip."""

from __future__ import annotations

from pathlib import Path

import pytest
from asyncopd.lab.toytrain.train import model_config
from asyncopd.tasks.toy import task
from asyncopd.tasks.toy.tokenizer import EOS_ID, PAD_ID, VOCAB_SIZE, build_tokenizer
from transformers import AutoTokenizer

pytestmark = pytest.mark.unit


def test_prompt_encodes_to_one_id_per_character_without_added_tokens() -> None:
    tokenizer = build_tokenizer()
    prompt = "Q:(7+5)*3-4=? A:"
    ids = tokenizer(prompt)["input_ids"]
    assert len(ids) == len(prompt)
    assert tokenizer.convert_ids_to_tokens(ids) == list(prompt)
    assert len(set(tokenizer(task.ALPHABET)["input_ids"])) == len(task.ALPHABET)


def test_decode_drops_specials_and_joins_characters() -> None:
    tokenizer = build_tokenizer()
    ids = tokenizer("7+5=12#12")["input_ids"] + [EOS_ID, PAD_ID]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "7+5=12#12"


def test_save_load_round_trip_keeps_ids_and_vocab_matches_model(tmp_path: Path) -> None:
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "Q:9*9-9=? A:9*9=81;81-9=72#72"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert (loaded.pad_token_id, loaded.eos_token_id) == (PAD_ID, EOS_ID)
    assert len(loaded) == VOCAB_SIZE == model_config("teacher").vocab_size == model_config("student").vocab_size
    assert loaded.padding_side == "left"
