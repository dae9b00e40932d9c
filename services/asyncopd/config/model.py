"""Which models and task a run uses."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from asyncopd.config.base import Section


class ModelsConfig(Section):
    """The student (trained) and the teacher (frozen): HF directories or hub names."""

    student: str = Field("assets/toy-student", description="Student: HF model directory or hub name.")
    teacher: str = Field("assets/toy-teacher", description="Teacher: HF model directory or hub name.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Compute dtype of the student and teacher weights."
    )


class TaskConfig(Section):
    """The prompt dataset and its grader."""

    name: Literal["toy", "jsonl", "parquet"] = Field(
        "toy", description="toy = the built-in arithmetic task; jsonl/parquet = a local GSM8K-style file."
    )
    path: str | None = Field(None, description="Dataset file for jsonl/parquet (fields: question, answer).")
    seed: int = Field(0, description="Seed of the toy task generator and of epoch shuffles.")
    train_size: int = Field(20000, ge=1, description="Toy task: number of training prompts.")
    test_size: int = Field(
        500, ge=1, description="Evaluation prompts: toy test-split size; for files, the first N of eval_path."
    )
    eval_path: str | None = Field(None, description="jsonl/parquet: held-out file for evaluation (defaults to path).")
    prompt_template: str = Field(
        "{question}",
        description="jsonl/parquet: how a record becomes a prompt; `{question}` is replaced by the question.",
    )

    @field_validator("prompt_template")
    @classmethod
    def _template_has_question(cls, value: str) -> str:
        if "{question}" not in value:
            raise ValueError("prompt_template must contain the placeholder {question}")
        return value
