"""Prompt datasets and graders: what a run asks the student and how an answer is scored.

Rollout, learner and eval all get prompts and rewards through this package, so a new task is
one loader plus one grader registered here. It knows task data and answer formats (local
files, Hugging Face datasets, the small math set the project generates); it knows nothing of
models, tokenizers or services (a chat template comes in as a `format_prompt` function).
"""

from asyncopd.tasks.dataset import PromptDataset, PromptItem
from asyncopd.tasks.graders import GRADERS, Grader, MissingExtraError, extract_boxed, get_grader
from asyncopd.tasks.loaders import (
    FormatPrompt,
    RecordFormat,
    load_file_dataset,
    load_hf_dataset,
    load_task,
    load_toy_dataset,
    load_wide_dataset,
)

__all__ = [
    "GRADERS",
    "FormatPrompt",
    "Grader",
    "MissingExtraError",
    "PromptDataset",
    "PromptItem",
    "RecordFormat",
    "extract_boxed",
    "get_grader",
    "load_file_dataset",
    "load_hf_dataset",
    "load_task",
    "load_toy_dataset",
    "load_wide_dataset",
]
