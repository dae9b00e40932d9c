"""The student's chat template as a text -> text function, for `task.chat_template: true`.

A prompt becomes one user turn (after an optional system turn) rendered by the tokenizer's own
template with the generation prompt appended — what `apply_chat_template(...,
add_generation_prompt=True)` gives for an instruct model such as Qwen3. The result is text with
the template's special tokens written out (`<|im_start|>user ...`); tokenizing it without adding
special tokens gives the same ids as the template would (the tokenizer splits its special tokens
out of text), so the cache, the rollout engines and the evaluator all see one prompt.

It knows tokenizers and the task config's chat fields; nothing of datasets or services.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from asyncopd.config.model import TaskConfig

FormatPrompt = Callable[[str], str]


def chat_formatter(
    tokenizer: Any, *, system_prompt: str | None = None, enable_thinking: bool | None = None, model: str = "student"
) -> FormatPrompt:
    """A function rendering a user prompt with `tokenizer`'s chat template (ValueError if it has none)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"task.chat_template is true but the tokenizer of {model!r} has no chat template "
            "(tokenizer_config.json chat_template / chat_template.jinja); set task.chat_template: false"
        )
    extra: dict[str, Any] = {} if enable_thinking is None else {"enable_thinking": enable_thinking}

    def render(text: str) -> str:
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": text})
        out = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
        return str(out)

    return render


def prompt_formatter(student: str, task: TaskConfig) -> FormatPrompt | None:
    """The formatter `task` asks for with the `student` model's tokenizer, or None when
    `task.chat_template` is false (prompts are used as the task writes them)."""
    if not task.chat_template:
        return None
    from asyncopd.models.loading import load_tokenizer

    return chat_formatter(
        load_tokenizer(student), system_prompt=task.system_prompt, enable_thinking=task.enable_thinking, model=student
    )
