"""The toy reasoning task: multi-step integer arithmetic with a chain-of-thought answer.

A problem is a chain of 2–3 operations (+, -, *) on single-digit operands, evaluated left to
right. The prompt writes it with the usual precedence (parentheses only where left-to-right
order needs them); the response works it out step by step and ends with the answer:

    prompt   Q:(7+5)*3-4=? A:
    response 7+5=12;12*3=36;36-4=32#32        (then the tokenizer's EOS token)

Every intermediate result stays within 0..20 (a small table of arithmetic facts, so a ~1M-param
model learns the task in minutes on a CPU) and a response is at most 25 characters. Problems
are drawn uniformly from all valid chains, so about 96% have three operations.

The universe of valid problems is enumerated once and split by a hash of the prompt text, so
the train and test splits are disjoint for every seed and every size; a seed only picks which
problems of a split are drawn and in what order.

This module knows strings only: no tokenizer, no model, no files.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from dataclasses import dataclass
from functools import cache
from typing import Literal

Split = Literal["train", "test"]

OPERATORS: tuple[str, ...] = ("+", "-", "*")
OPERANDS: tuple[int, ...] = tuple(range(1, 10))
MIN_OPS = 2
MAX_OPS = 3
# Largest intermediate result; 99 works too but needs many more training steps.
MAX_VALUE = 20
# One problem in TEST_BUCKETS (by prompt hash) belongs to the test split.
TEST_BUCKETS = 10
ANSWER_MARK = "#"
STEP_SEPARATOR = ";"
PROMPT_PREFIX = "Q:"
PROMPT_SUFFIX = "=? A:"
# Longest response (e.g. `4*5=20;20-9=11;11+9=20#20`) is 25 characters; generation stops at EOS.
MAX_RESPONSE_CHARS = 25
# Every character a prompt or response can contain; the tokenizer is built from this.
ALPHABET: str = "0123456789+-*()=?;#QA: "

_PRECEDENCE = {"+": 1, "-": 1, "*": 2}


@dataclass(frozen=True)
class Problem:
    """One arithmetic chain: `operands[0] op[0] operands[1] op[1] ...` evaluated left to right."""

    operands: tuple[int, ...]
    operators: tuple[str, ...]

    @property
    def expression(self) -> str:
        """The chain in usual precedence, parenthesised where left-to-right order needs it."""
        text = str(self.operands[0])
        last_precedence = 3  # a bare number never needs parentheses
        for op, operand in zip(self.operators, self.operands[1:], strict=True):
            if _PRECEDENCE[op] > last_precedence:
                text = f"({text})"
            text = f"{text}{op}{operand}"
            last_precedence = _PRECEDENCE[op]
        return text

    @property
    def prompt(self) -> str:
        return f"{PROMPT_PREFIX}{self.expression}{PROMPT_SUFFIX}"

    @property
    def values(self) -> tuple[int, ...]:
        """Intermediate results, one per operator (the last one is the answer)."""
        out = []
        acc = self.operands[0]
        for op, operand in zip(self.operators, self.operands[1:], strict=True):
            acc = _apply(acc, op, operand)
            out.append(acc)
        return tuple(out)

    @property
    def answer(self) -> str:
        return str(self.values[-1])

    @property
    def response(self) -> str:
        """The chain-of-thought target, without EOS (the tokenizer appends it)."""
        steps = []
        acc = self.operands[0]
        for op, operand, value in zip(self.operators, self.operands[1:], self.values, strict=True):
            steps.append(f"{acc}{op}{operand}={value}")
            acc = value
        return f"{STEP_SEPARATOR.join(steps)}{ANSWER_MARK}{value}"


def _apply(left: int, op: str, right: int) -> int:
    if op == "+":
        return left + right
    if op == "-":
        return left - right
    if op == "*":
        return left * right
    raise ValueError(f"unknown operator {op!r}; allowed: {OPERATORS}")


def _is_valid(problem: Problem) -> bool:
    return all(0 <= v <= MAX_VALUE for v in problem.values)


def split_of(prompt: str) -> Split:
    """Which split a problem belongs to: a pure function of its prompt text."""
    digest = hashlib.sha256(prompt.encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") % TEST_BUCKETS == 0 else "train"


@cache
def universe() -> dict[Split, tuple[Problem, ...]]:
    """Every valid problem, in a fixed order, partitioned into the two splits."""
    parts: dict[Split, list[Problem]] = {"train": [], "test": []}
    for n_ops in range(MIN_OPS, MAX_OPS + 1):
        for operators in itertools.product(OPERATORS, repeat=n_ops):
            for operands in itertools.product(OPERANDS, repeat=n_ops + 1):
                problem = Problem(operands=operands, operators=operators)
                if _is_valid(problem):
                    parts[split_of(problem.prompt)].append(problem)
    return {"train": tuple(parts["train"]), "test": tuple(parts["test"])}


def sample_problems(split: Split, n: int, seed: int) -> list[Problem]:
    """`n` distinct problems of `split`, drawn deterministically from `seed`."""
    pool = universe()[split]
    if n > len(pool):
        raise ValueError(f"asked for {n} {split} problems but the {split} split holds only {len(pool)}")
    return random.Random(f"{seed}:{split}").sample(pool, n)


def parse_answer(response: str) -> str | None:
    """The final answer of a response (text after the last `#`), or None when it has none."""
    head, mark, tail = response.rpartition(ANSWER_MARK)
    del head
    if not mark:
        return None
    answer = tail.strip()
    return answer if answer.isdigit() else None


def is_correct(response: str, answer: str) -> bool:
    """Exact match of the final `#<answer>` (the steps before it are not graded)."""
    got = parse_answer(response)
    return got is not None and int(got) == int(answer)
