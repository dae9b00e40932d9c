"""Which models and task a run uses."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from asyncopd.config.base import Section


class ModelsConfig(Section):
    """The student (trained) and the teacher (frozen): HF directories or hub names."""

    student: str = Field("assets/toy-student", description="Student: HF model directory or hub name.")
    teacher: str = Field("assets/toy-teacher", description="Teacher: HF model directory or hub name.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Compute dtype of the student and teacher weights."
    )


class TaskConfig(Section):
    """The prompt dataset, how its records map to prompts and answers, and its grader.

    `source` names the data: a local `.jsonl`/`.parquet` file (`name: jsonl|parquet`) or a
    Hugging Face dataset (`name: hf`: a hub name, or a local dataset directory; offline it reads
    the local files and the HF cache). Whether a source is required is a rule across fields,
    checked when a run config is loaded (`asyncopd.config.run.cross_field_errors`).
    """

    name: Literal["toy", "wide", "jsonl", "parquet", "hf"] = Field(
        "toy",
        description="toy = the built-in arithmetic task; wide = the built-in long graph-walk task of the "
        "wide-vocabulary world (Qwen3 tokenizer); jsonl/parquet = a local file; "
        "hf = a Hugging Face dataset (needs the `data` extra).",
    )
    source: str | None = Field(
        None, description="jsonl/parquet: the dataset file; hf: the dataset's hub name or local directory."
    )
    path: str | None = Field(None, description="Older spelling of `source` for jsonl/parquet (either may be used).")
    subset: str | None = Field(None, description="hf: the dataset configuration (e.g. 'main' for GSM8K).")
    split: str = Field("train", min_length=1, description="hf: the split prompts are trained on.")
    eval_split: str = Field("test", min_length=1, description="hf: the split evaluated on.")
    eval_path: str | None = Field(None, description="jsonl/parquet: held-out file for evaluation (defaults to source).")
    prompt_key: str = Field("question", min_length=1, description="Record field holding the question.")
    answer_key: str = Field("answer", min_length=1, description="Record field holding the reference answer.")
    id_key: str = Field("id", min_length=1, description="Record field used as the prompt id when present.")
    max_samples: int | None = Field(
        None, ge=1, description="Files and hf: train on the first N records only (None = all)."
    )
    grader: Literal["auto", "toy", "wide", "gsm8k", "math"] = Field(
        "auto",
        description="How answers are scored: toy; wide = a complete allowed walk; gsm8k = the number after "
        "'####'; math = the last \\boxed{} checked for symbolic equivalence with math-verify (the `math` "
        "extra); auto = the built-in task's own grader (toy, wide), gsm8k otherwise.",
    )
    seed: int = Field(0, description="Seed of the toy task generator and of epoch shuffles.")
    train_size: int = Field(20000, ge=1, description="Built-in tasks (toy, wide): number of training prompts.")
    test_size: int = Field(
        500,
        ge=1,
        description="Evaluation prompts: built-in tasks' test-split size; for files and hf, the first N.",
    )
    prompt_template: str = Field(
        "{question}",
        description="Files and hf: how a record becomes a prompt; `{question}` is replaced by its prompt_key field.",
    )
    chat_template: bool = Field(
        False,
        description="Wrap each prompt in the student tokenizer's chat template (a user turn plus the "
        "generation prompt) before it is tokenized.",
    )
    enable_thinking: bool | None = Field(
        None,
        description="chat_template: passed to the template as enable_thinking (Qwen3: false = no <think> "
        "block); None = the template's default.",
    )
    system_prompt: str | None = Field(None, description="chat_template: a system turn before the question.")

    @field_validator("prompt_template")
    @classmethod
    def _template_has_question(cls, value: str) -> str:
        if "{question}" not in value:
            raise ValueError("prompt_template must contain the placeholder {question}")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> TaskConfig:
        if self.source is not None and self.path is not None and self.source != self.path:
            raise ValueError(f"source ({self.source!r}) and path ({self.path!r}) disagree; set only source")
        return self

    @property
    def data_source(self) -> str | None:
        """The dataset file or name, whichever spelling (`source` or `path`) the config used."""
        return self.source if self.source is not None else self.path

    @property
    def grader_name(self) -> str:
        """The grader the prompts carry (`auto` resolved)."""
        if self.grader != "auto":
            return self.grader
        return self.name if self.name in ("toy", "wide") else "gsm8k"
