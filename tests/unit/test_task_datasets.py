"""Prompt datasets from local GSM8K-style files, the gsm8k grader, and task loading by config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from asyncopd.config.model import TaskConfig
from asyncopd.tasks import PromptDataset, PromptItem, get_grader, load_file_dataset, load_task

pytestmark = pytest.mark.unit

RECORDS = [
    {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3+4=7\n#### 7"},
    {"question": "A shop sells 1,200 pens twice. Total?", "answer": "2*1200=2400\n#### 2,400"},
    {"id": "q-neg", "question": "5 minus 8?", "answer": "#### -3"},
]


def _write_jsonl(path: Path, records: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_jsonl_dataset_reads_questions_answers_and_ids(tmp_path: Path) -> None:
    dataset = load_file_dataset(_write_jsonl(tmp_path / "gsm.jsonl", RECORDS), "Question: {question}\nAnswer:")
    assert len(dataset) == 3
    assert dataset[0].prompt == "Question: Tom has 3 apples and buys 4. How many?\nAnswer:"
    assert [it.answer for it in dataset] == ["7", "2400", "-3"]
    assert [it.prompt_id for it in dataset] == ["gsm/0", "gsm/1", "q-neg"]
    assert {it.grader for it in dataset} == {"gsm8k"}


def test_parquet_dataset_matches_jsonl(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [{"question": r["question"], "answer": r["answer"]} for r in RECORDS]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "gsm.parquet")
    from_parquet = load_file_dataset(tmp_path / "gsm.parquet")
    from_jsonl = load_file_dataset(_write_jsonl(tmp_path / "gsm.jsonl", rows))
    assert [(it.prompt, it.answer) for it in from_parquet] == [(it.prompt, it.answer) for it in from_jsonl]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"question": "q"}, "field 'answer'"),
        ({"question": "q", "answer": "no marker 7"}, "must end with '#### <number>'"),
        ({"question": 3, "answer": "#### 1"}, "field 'question'"),
    ],
)
def test_malformed_records_are_rejected_with_the_record_named(
    tmp_path: Path, record: dict[str, object], message: str
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(ValueError, match="record 1") as err:
        load_file_dataset(path)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("so 3+4=7\n#### 7", 1.0),
        ("#### 7.0", 1.0),
        ("####   $7", 1.0),
        ("#### 8", 0.0),
        ("the answer is 7", 0.0),
        ("#### seven", 0.0),
        ("#### 7 #### 9", 0.0),
    ],
)
def test_gsm8k_grader_matches_the_number_after_the_last_marker(response: str, expected: float) -> None:
    assert get_grader("gsm8k").score(response, "7") == expected


def test_gsm8k_grader_normalises_thousands_separators() -> None:
    assert get_grader("gsm8k").score("#### 2,400", "2400") == 1.0


def test_unknown_grader_names_the_registered_ones() -> None:
    with pytest.raises(KeyError, match="gsm8k"):
        get_grader("nope")


def test_load_task_follows_the_config(tmp_path: Path) -> None:
    toy_test = load_task(TaskConfig(name="toy", seed=1, test_size=30), "test")
    assert len(toy_test) == 30 and toy_test.name == "toy-test"
    path = _write_jsonl(tmp_path / "gsm.jsonl", RECORDS)
    file_test = load_task(TaskConfig(name="jsonl", path=str(path), test_size=2), "test")
    assert [it.answer for it in file_test] == ["7", "2400"]
    with pytest.raises(ValueError, match=r"task\.path is required"):
        load_task(TaskConfig(name="jsonl"), "train")


def test_dataset_rejects_duplicate_ids_and_shuffles_deterministically() -> None:
    items = [PromptItem(prompt_id=str(i), prompt=f"p{i}", answer="1", grader="toy") for i in range(10)]
    dataset = PromptDataset("d", items)
    assert list(dataset.shuffled(1)) == list(dataset.shuffled(1))
    assert sorted(it.prompt_id for it in dataset.shuffled(1)) == sorted(it.prompt_id for it in items)
    stream = dataset.epochs(5)
    first_two_epochs = [next(stream) for _ in range(20)]
    assert first_two_epochs[:10] == list(dataset.shuffled(5))
    assert first_two_epochs[10:] == list(dataset.shuffled(6))
    with pytest.raises(ValueError, match="duplicate prompt ids"):
        PromptDataset("d", [*items, items[0]])
