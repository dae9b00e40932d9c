"""Prompt datasets and graders: what a run asks the student and how an answer is scored.

Rollout, learner and eval all get prompts and rewards through this package, so a new task is
one loader plus one grader registered here. It knows task data and answer formats; it knows
nothing of models, tokenizers or services.
"""

from asyncopd.tasks.dataset import PromptDataset, PromptItem
from asyncopd.tasks.graders import GRADERS, Grader, get_grader
from asyncopd.tasks.loaders import load_file_dataset, load_task, load_toy_dataset

__all__ = [
    "GRADERS",
    "Grader",
    "PromptDataset",
    "PromptItem",
    "get_grader",
    "load_file_dataset",
    "load_task",
    "load_toy_dataset",
]
