"""Graders: score a decoded response against a reference answer (1.0 correct, 0.0 not).

Registered by name; a `PromptItem` names its grader, so a consumer never needs to know which
task a prompt came from.

- `toy`: the integer after the last `#` (the toy task).
- `wide`: a complete, allowed continuation of the wide task's walk (`asyncopd.tasks.wide.task`);
  the reference answer is the animal it continues from.
- `gsm8k`: the number after the last `####`.
- `math`: the content of the response's last `\\boxed{...}` (braces matched), checked for
  symbolic equivalence with the reference by `math-verify` (`\\frac{1}{2}` = `0.5` = `1/2`,
  `\\frac{\\pi}{4}` = `\\pi/4`). A response without `\\boxed{}` is wrong: the grader does not
  guess which number in free text was meant. math-verify is an optional extra
  (`pip install 'asyncopd[math]'`); without it the grader raises `MissingExtraError` naming it.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Protocol

from asyncopd.tasks.toy import task as toy_task
from asyncopd.tasks.wide import task as wide_task

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


@dataclass(frozen=True)
class WideWalk:
    """Wide task: every line labelled, every animal allowed after the one before, the end line right."""

    name: str = "wide"

    def score(self, response: str, answer: str) -> float:
        return 1.0 if wide_task.is_correct(response, answer) else 0.0


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


BOXED = "\\boxed"
# Seconds math-verify may spend parsing or comparing one answer. Its timeout is SIGALRM, which
# only the main thread can use; elsewhere (a learner's evaluation thread) it runs untimed.
_MATH_VERIFY_TIMEOUT_S = 5


class MissingExtraError(ImportError):
    """An optional dependency a configured feature needs is not installed; names the extra."""


def extract_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` in `text` (nested braces matched), or None when
    there is none or its braces never close."""
    start = text.rfind(BOXED + "{")
    if start < 0:
        return None
    i = start + len(BOXED) + 1
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None


def require_math_verify() -> None:
    """Raise `MissingExtraError` (naming the extra to install) unless math-verify imports."""
    try:
        import math_verify  # noqa: F401
    except ImportError as err:
        raise MissingExtraError(
            "the 'math' grader needs math-verify: pip install 'asyncopd[math]' (or pip install math-verify)"
        ) from err


@dataclass(frozen=True)
class MathBoxedEquivalence:
    """The last `\\boxed{}` of the response is symbolically equal to the reference (math-verify)."""

    name: str = "math"

    def score(self, response: str, answer: str) -> float:
        require_math_verify()
        from math_verify import parse, verify

        got = extract_boxed(response)
        if got is None or not got:
            return 0.0
        want = extract_boxed(answer) or answer.strip()
        if _normalized(got) == _normalized(want):
            return 1.0
        timeout = _MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
        try:
            gold = parse(f"${want}$", parsing_timeout=timeout)  # type: ignore[arg-type]
            pred = parse(f"${got}$", parsing_timeout=timeout)  # type: ignore[arg-type]
            if not gold or not pred:
                return 0.0
            return 1.0 if verify(gold, pred, timeout_seconds=timeout) else 0.0
        except Exception:  # math-verify's own parse/compare failures and timeouts: a malformed answer is wrong
            return 0.0


def _normalized(text: str) -> str:
    return re.sub(r"\s+", "", text).replace("\\left", "").replace("\\right", "").replace("\\dfrac", "\\frac")


GRADERS: dict[str, Grader] = {
    g.name: g for g in (ToyExactMatch(), WideWalk(), GSM8KNumericMatch(), MathBoxedEquivalence())
}


def get_grader(name: str) -> Grader:
    try:
        return GRADERS[name]
    except KeyError:
        raise KeyError(f"unknown grader {name!r}; registered graders: {sorted(GRADERS)}") from None
