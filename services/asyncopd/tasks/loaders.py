"""Loading a prompt dataset: the built-in toy task, or a local GSM8K-style jsonl/parquet file.

A file holds one record per prompt with a `question` and an `answer` whose last line is
`#### <number>` (GSM8K's format); an optional `id` field becomes the prompt id. Nothing here
downloads: files are local.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from asyncopd.config.model import TaskConfig
from asyncopd.tasks.dataset import PromptDataset, PromptItem
from asyncopd.tasks.graders import GSM8K_MARK, parse_gsm8k_number
from asyncopd.tasks.toy import task as toy_task

Split = Literal["train", "test"]


def load_toy_dataset(split: Split, n: int, seed: int) -> PromptDataset:
    """`n` toy problems of `split` drawn with `seed`; the answer is the final integer."""
    problems = toy_task.sample_problems(split, n, seed)
    items = [
        PromptItem(prompt_id=f"toy/{p.expression}", prompt=p.prompt, answer=p.answer, grader="toy") for p in problems
    ]
    return PromptDataset(f"toy-{split}", items)


def _read_records(path: Path) -> Iterator[Mapping[str, Any]]:
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as err:
            raise ImportError("reading parquet needs pyarrow: pip install 'asyncopd[parquet]'") from err
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


def load_file_dataset(path: str | Path, prompt_template: str = "{question}") -> PromptDataset:
    """A GSM8K-style jsonl (`.jsonl`/`.json` lines) or `.parquet` file, graded by `gsm8k`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {path} does not exist")
    items = []
    for index, record in enumerate(_read_records(path)):
        where = f"{path} record {index}"
        for key in ("question", "answer"):
            if not isinstance(record.get(key), str):
                raise ValueError(f"{where}: field {key!r} must be a string (GSM8K format)")
        number = parse_gsm8k_number(record["answer"])
        if number is None:
            raise ValueError(f"{where}: answer must end with '{GSM8K_MARK} <number>'")
        answer = record["answer"].rpartition(GSM8K_MARK)[2].strip().replace(",", "")
        prompt_id = str(record.get("id", f"{path.stem}/{index}"))
        prompt = prompt_template.format(question=record["question"])
        items.append(PromptItem(prompt_id=prompt_id, prompt=prompt, answer=answer, grader="gsm8k"))
    if not items:
        raise ValueError(f"dataset file {path} holds no records")
    return PromptDataset(path.stem, items)


def load_task(config: TaskConfig, split: Split) -> PromptDataset:
    """The dataset a run config names, for training (`train`) or evaluation (`test`)."""
    if config.name == "toy":
        size = config.train_size if split == "train" else config.test_size
        return load_toy_dataset(split, size, config.seed)
    path = config.path if split == "train" else (config.eval_path or config.path)
    if path is None:
        raise ValueError(f"task.path is required when task.name is {config.name!r}")
    dataset = load_file_dataset(path, config.prompt_template)
    return dataset if split == "train" else dataset.head(config.test_size)
