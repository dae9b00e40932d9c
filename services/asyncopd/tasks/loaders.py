"""Loading a prompt dataset: a built-in task (toy, wide), a local jsonl/parquet file, or a Hugging
Face dataset.

A record holds a question (field `prompt_key`, default `question`) and a reference answer
(`answer_key`, default `answer`); an optional `id_key` field (default `id`) becomes the prompt
id. What the answer must look like depends on the grader the prompts carry:

- `gsm8k`: GSM8K's `... #### <number>`, or a bare number; the number is kept.
- `math`: any non-empty expression (`\\frac{\\pi}{4}`, `3\\sqrt{2}`); a `#### x` tail or a
  `\\boxed{x}` in it is reduced to `x`.

Local files are read here; Hugging Face datasets through the `datasets` library (the `data`
extra), which reads a local dataset directory or the HF cache when offline. Nothing here knows
tokenizers: a chat template is applied by a `format_prompt` function the caller passes
(`asyncopd.models.chat.prompt_formatter`), so the text every consumer sees is the same.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from asyncopd.config.model import TaskConfig
from asyncopd.tasks.dataset import PromptDataset, PromptItem
from asyncopd.tasks.graders import (
    GSM8K_MARK,
    MissingExtraError,
    extract_boxed,
    get_grader,
    parse_gsm8k_number,
    require_math_verify,
)
from asyncopd.tasks.toy import task as toy_task
from asyncopd.tasks.wide import task as wide_task

Split = Literal["train", "test"]
FormatPrompt = Callable[[str], str]


@dataclass(frozen=True)
class RecordFormat:
    """How records become prompts: which fields to read, the prompt template, the grader."""

    prompt_key: str = "question"
    answer_key: str = "answer"
    id_key: str = "id"
    prompt_template: str = "{question}"
    grader: str = "gsm8k"

    @classmethod
    def of(cls, config: TaskConfig) -> RecordFormat:
        return cls(config.prompt_key, config.answer_key, config.id_key, config.prompt_template, config.grader_name)


def load_toy_dataset(split: Split, n: int, seed: int) -> PromptDataset:
    """`n` toy problems of `split` drawn with `seed`; the answer is the final integer."""
    problems = toy_task.sample_problems(split, n, seed)
    items = [
        PromptItem(prompt_id=f"toy/{p.expression}", prompt=p.prompt, answer=p.answer, grader="toy") for p in problems
    ]
    return PromptDataset(f"toy-{split}", items)


def load_wide_dataset(split: Split, n: int, seed: int) -> PromptDataset:
    """`n` wide-task prompts of `split` drawn with `seed`; the answer is the animal the walk
    continues from (grader `wide`)."""
    problems = wide_task.sample_problems(split, n, seed)
    items = [PromptItem(prompt_id=p.prompt_id, prompt=p.prompt, answer=p.answer, grader="wide") for p in problems]
    return PromptDataset(f"wide-{split}", items)


def _read_records(path: Path) -> Iterator[Mapping[str, Any]]:
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as err:
            raise MissingExtraError("reading parquet needs pyarrow: pip install 'asyncopd[parquet]'") from err
        yield from pq.read_table(path).to_pylist()
        return
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not a JSON object ({err})") from err
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield record


def reference_answer(raw: Any, grader: str, where: str) -> str:
    """The answer a prompt carries, from a record's raw answer field (see the module doc)."""
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        raise ValueError(f"{where}: the answer must be a string or a number, got {type(raw).__name__}")
    text = str(raw).strip()
    if grader == "gsm8k":
        if GSM8K_MARK in text:
            if parse_gsm8k_number(text) is None:
                raise ValueError(f"{where}: answer must end with '{GSM8K_MARK} <number>'")
            return text.rpartition(GSM8K_MARK)[2].strip().replace(",", "")
        if get_grader("gsm8k").score(f"{GSM8K_MARK} {text}", text) == 1.0:
            return text.replace(",", "")
        raise ValueError(f"{where}: answer must end with '{GSM8K_MARK} <number>' or be a number (got {text[:40]!r})")
    if grader == "math":
        if GSM8K_MARK in text:
            text = text.rpartition(GSM8K_MARK)[2].strip()
        text = extract_boxed(text) or text
    if not text:
        raise ValueError(f"{where}: the answer is empty")
    return text


def dataset_from_records(
    name: str,
    records: Iterable[Mapping[str, Any]],
    fmt: RecordFormat,
    *,
    limit: int | None = None,
    format_prompt: FormatPrompt | None = None,
    label: str | None = None,
) -> PromptDataset:
    """The first `limit` records (all when None) as prompts; errors name the record (in `label`,
    default `name`) and the field."""
    items = []
    for index, record in enumerate(records):
        if limit is not None and index >= limit:
            break
        where = f"{label or name} record {index}"
        question = record.get(fmt.prompt_key)
        if not isinstance(question, str):
            raise ValueError(f"{where}: field {fmt.prompt_key!r} must be a string (task.prompt_key)")
        if fmt.answer_key not in record:
            raise ValueError(f"{where}: field {fmt.answer_key!r} is missing (task.answer_key)")
        answer = reference_answer(record[fmt.answer_key], fmt.grader, f"{where}: field {fmt.answer_key!r}")
        prompt = fmt.prompt_template.format(question=question)
        if format_prompt is not None:
            prompt = format_prompt(prompt)
        prompt_id = str(record.get(fmt.id_key, f"{name}/{index}"))
        items.append(PromptItem(prompt_id=prompt_id, prompt=prompt, answer=answer, grader=fmt.grader))
    if not items:
        raise ValueError(f"dataset {label or name} holds no records")
    return PromptDataset(name, items)


def load_file_dataset(
    path: str | Path,
    prompt_template: str = "{question}",
    *,
    fmt: RecordFormat | None = None,
    limit: int | None = None,
    format_prompt: FormatPrompt | None = None,
) -> PromptDataset:
    """A jsonl (`.jsonl`/`.json` lines) or `.parquet` file; GSM8K-style and graded by `gsm8k`
    unless `fmt` says otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {path} does not exist")
    fmt = fmt or RecordFormat(prompt_template=prompt_template)
    records = _read_records(path)
    return dataset_from_records(path.stem, records, fmt, limit=limit, format_prompt=format_prompt, label=str(path))


def hf_records(source: str, split: str, subset: str | None = None) -> Iterable[Mapping[str, Any]]:
    """Records of a Hugging Face dataset split (hub name or local directory) via `datasets`."""
    try:
        import datasets
    except ImportError as err:
        raise MissingExtraError(
            f"task.name 'hf' ({source!r}) needs the datasets library: pip install 'asyncopd[data]'"
        ) from err
    try:
        loaded = datasets.load_dataset(source, subset, split=split)
    except ValueError as err:
        if "split" in str(err).lower():
            where = "task.split / task.eval_split"
            raise ValueError(f"dataset {source!r} has no split {split!r} ({where}): {err}") from err
        raise
    return loaded  # type: ignore[no-any-return]


def load_hf_dataset(
    source: str,
    split: str,
    *,
    subset: str | None = None,
    fmt: RecordFormat | None = None,
    limit: int | None = None,
    format_prompt: FormatPrompt | None = None,
) -> PromptDataset:
    """A Hugging Face dataset split as prompts (see `hf_records`)."""
    records = hf_records(source, split, subset)
    name = f"{source.rstrip('/').rpartition('/')[2]}-{split}"
    fmt = fmt or RecordFormat()
    label = f"{source}[{split}]"
    return dataset_from_records(name, records, fmt, limit=limit, format_prompt=format_prompt, label=label)


def load_task(config: TaskConfig, split: Split, format_prompt: FormatPrompt | None = None) -> PromptDataset:
    """The dataset a run config names, for training (`train`) or evaluation (`test`).

    `format_prompt` is the student's chat template (required when `task.chat_template` is true);
    the `math` grader's extra is checked here, so a service fails at start, not at its first grade.
    """
    if config.chat_template and format_prompt is None:
        raise ValueError(
            "task.chat_template is true: pass the student's chat formatter "
            "(asyncopd.models.chat.prompt_formatter) as format_prompt"
        )
    if config.grader_name == "math":
        require_math_verify()
    if config.name in ("toy", "wide"):
        size = config.train_size if split == "train" else config.test_size
        load = load_toy_dataset if config.name == "toy" else load_wide_dataset
        dataset = load(split, size, config.seed)
        if format_prompt is None:
            return dataset
        return PromptDataset(dataset.name, [_reformatted(it, format_prompt) for it in dataset])
    limit = config.max_samples if split == "train" else config.test_size
    fmt = RecordFormat.of(config)
    source = config.data_source
    if source is None:
        raise ValueError(f"task.path is required when task.name is {config.name!r} (task.source)")
    if config.name == "hf":
        hf_split = config.split if split == "train" else config.eval_split
        return load_hf_dataset(
            source, hf_split, subset=config.subset, fmt=fmt, limit=limit, format_prompt=format_prompt
        )
    path = source if split == "train" else (config.eval_path or source)
    return load_file_dataset(path, fmt=fmt, limit=limit, format_prompt=format_prompt)


def _reformatted(item: PromptItem, format_prompt: FormatPrompt) -> PromptItem:
    return PromptItem(item.prompt_id, format_prompt(item.prompt), item.answer, item.grader)
