"""Graders: score a decoded response against a reference answer (1.0 correct, 0.0 not).

Registered by name; a `PromptItem` names its grader, so a consumer never needs to know which
task a prompt came from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

from asyncopd.tasks.toy import task as toy_task

GSM8K_MARK = "####"
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


class Grader(Protocol):
    @property
    def name(self) -> str:
        """The registry key a `PromptItem.grader` refers to."""
        ...

    def score(self, response: str, answer: str) -> float:
        """1.0 when `response` answers `answer` correctly, else 0.0 (malformed counts as wrong)."""
        ...


@dataclass(frozen=True)
class ToyExactMatch:
    """Toy task: the integer after the response's last `#` equals the answer."""

    name: str = "toy"

    def score(self, response: str, answer: str) -> float:
        return 1.0 if toy_task.is_correct(response, answer) else 0.0


def parse_gsm8k_number(text: str) -> float | None:
    """The number after the last `####` in `text` (commas, `$` and spaces ignored), or None."""
    head, mark, tail = text.rpartition(GSM8K_MARK)
    del head
    if not mark:
        return None
    match = _NUMBER.search(tail.replace(",", "").replace("$", ""))
    return float(match.group()) if match else None


@dataclass(frozen=True)
class GSM8KNumericMatch:
    """GSM8K style: the number after the response's last `####` equals the reference number."""

    name: str = "gsm8k"

    def score(self, response: str, answer: str) -> float:
        got = parse_gsm8k_number(response)
        want = parse_gsm8k_number(answer) if GSM8K_MARK in answer else _plain_number(answer)
        if got is None or want is None:
            return 0.0
        return 1.0 if abs(got - want) < 1e-6 else 0.0


def _plain_number(text: str) -> float | None:
    match = _NUMBER.fullmatch(text.strip().replace(",", "").replace("$", ""))
    return float(match.group()) if match else None


GRADERS: dict[str, Grader] = {g.name: g for g in (ToyExactMatch(), GSM8KNumericMatch())}


def get_grader(name: str) -> Grader:
    try:
        return GRADERS[name]
    except KeyError:
        raise KeyError(f"unknown grader {name!r}; registered graders: {sorted(GRADERS)}") from None
