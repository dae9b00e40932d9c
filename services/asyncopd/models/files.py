"""Where a model's files are (a local directory or a hub name), and what can be read from them
without torch or transformers: the tokenizer (through the `tokenizers` library) and the
vocabulary size.

Relative directories are looked up in the working directory first, then in the project root,
so the config defaults (`assets/toy-student`, `assets/toy-teacher`) work from anywhere in a
checkout. When `HF_HUB_OFFLINE` is set, nothing is downloaded (`local_files_only`).

A process that tokenizes but never runs a model (the cache service) uses `light_tokenizer`
and does not spend seconds importing torch and transformers at every start;
`asyncopd.models.loading` loads models and full tokenizers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[3]

# Tokenizer classes whose encoding (without special tokens) is exactly that of their
# tokenizer.json: transformers adds nothing to it at encode time.
_PLAIN_FAST_TOKENIZERS = frozenset(
    {"TokenizersBackend", "PreTrainedTokenizerFast", "Qwen2Tokenizer", "Qwen2TokenizerFast"}
)

Tokenize = Callable[[str], Sequence[int]]


def hub_offline() -> bool:
    """Whether `HF_HUB_OFFLINE` forbids downloads (the one place this env var is read here)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def resolve_model_path(name_or_path: str) -> str:
    """A local directory if `name_or_path` names one (cwd first, then the project root), else
    the string unchanged (a hub name)."""
    candidate = Path(name_or_path).expanduser()
    if candidate.is_dir():
        return str(candidate)
    if not candidate.is_absolute() and (PROJECT_ROOT / candidate).is_dir():
        return str(PROJECT_ROOT / candidate)
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local:
        raise FileNotFoundError(f"model directory {name_or_path!r} does not exist")
    return name_or_path


def light_tokenizer(name_or_path: str) -> tuple[Tokenize, int] | None:
    """(text -> token ids without special tokens, vocabulary size) straight from a local model
    directory's tokenizer.json and config.json, or None where that would not be exactly what
    transformers does (a hub name, no tokenizer.json, a tokenizer class that adds behaviour of
    its own): then use `asyncopd.models.loading.load_tokenizer`.

    The vocabulary size is the larger of the tokenizer's (with added tokens) and the model's
    embedding (`vocab_size` in config.json), as the cache checks ids against both.
    """
    directory = Path(resolve_model_path(name_or_path))
    files = directory / "tokenizer.json", directory / "tokenizer_config.json", directory / "config.json"
    if not all(f.is_file() for f in files):
        return None
    tokenizer_config = json.loads(files[1].read_text())
    if tokenizer_config.get("tokenizer_class") not in _PLAIN_FAST_TOKENIZERS:
        return None
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(files[0]))
    model_vocab = int(json.loads(files[2].read_text()).get("vocab_size") or 0)
    vocab = max(tokenizer.get_vocab_size(with_added_tokens=True), model_vocab)

    def tokenize(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False).ids)

    return tokenize, vocab
