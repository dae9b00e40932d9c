"""A small math problem set the project generates itself (nothing downloaded), with symbolic
answers in LaTeX: fractions (`\\frac{3}{4}`), surds (`3\\sqrt{2}`), multiples of pi (`9\\pi`,
`\\frac{\\pi}{4}`), negative and plain integers. It exercises what real math sets need — the
`math` grader's `\\boxed{}` extraction and symbolic equivalence — at a size tests can afford.

`generate(n, seed)` is a pure function of its arguments; `assets/math-small.jsonl` is
`write_jsonl(path)` with the defaults (a test checks the committed file still matches). Records
are `{"id", "question", "answer"}`, the layout `task.name: jsonl` reads with `task.grader: math`.

This module knows strings and fractions only: no tokenizer, no model, no files beyond the one
it is asked to write.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

DEFAULT_SIZE = 200
DEFAULT_SEED = 0
INSTRUCTION = "Put the final answer in \\boxed{}."


def latex_fraction(value: Fraction) -> str:
    """`\\frac{p}{q}` (sign in front), or the integer when q = 1."""
    if value.denominator == 1:
        return str(value.numerator)
    sign = "-" if value < 0 else ""
    return f"{sign}\\frac{{{abs(value.numerator)}}}{{{value.denominator}}}"


def _fraction_sum(rng: random.Random) -> tuple[str, str]:
    a, b = Fraction(rng.randint(1, 9), rng.randint(2, 9)), Fraction(rng.randint(1, 9), rng.randint(2, 9))
    op = rng.choice("+-")
    value = a + b if op == "+" else a - b
    return f"Compute ${latex_fraction(a)} {op} {latex_fraction(b)}$.", latex_fraction(value)


def _linear_equation(rng: random.Random) -> tuple[str, str]:
    a, b, c = rng.randint(2, 9), rng.randint(-9, 9), rng.randint(-9, 9)
    sign = "+" if b >= 0 else "-"
    return f"Solve for $x$: ${a}x {sign} {abs(b)} = {c}$.", latex_fraction(Fraction(c - b, a))


def _simplify_surd(rng: random.Random) -> tuple[str, str]:
    k, m = rng.randint(2, 6), rng.choice((2, 3, 5, 6, 7))
    return f"Simplify $\\sqrt{{{k * k * m}}}$.", f"{k}\\sqrt{{{m}}}"


def _circle_area(rng: random.Random) -> tuple[str, str]:
    r = rng.randint(2, 12)
    return f"What is the area of a circle of radius {r}? Give the exact value.", f"{r * r}\\pi"


def _angle_radians(rng: random.Random) -> tuple[str, str]:
    degrees = rng.choice((30, 45, 60, 90, 120, 135, 150, 270))
    value = Fraction(degrees, 180)
    if value.denominator == 1:
        answer = "\\pi" if value.numerator == 1 else f"{value.numerator}\\pi"
    elif value.numerator == 1:
        answer = f"\\frac{{\\pi}}{{{value.denominator}}}"
    else:
        answer = f"\\frac{{{value.numerator}\\pi}}{{{value.denominator}}}"
    return f"Convert {degrees} degrees to radians.", answer


def _product(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(-15, 15), rng.randint(2, 15)
    return f"Compute ${a} \\times {b}$.", str(a * b)


KINDS: tuple[Callable[[random.Random], tuple[str, str]], ...] = (
    _fraction_sum,
    _linear_equation,
    _simplify_surd,
    _circle_area,
    _angle_radians,
    _product,
)


def generate(n: int = DEFAULT_SIZE, seed: int = DEFAULT_SEED) -> list[dict[str, str]]:
    """`n` problems (kinds in rotation, values drawn with `seed`), each asking for a boxed answer."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        question, answer = KINDS[i % len(KINDS)](rng)
        records.append({"id": f"math-small/{i}", "question": f"{question} {INSTRUCTION}", "answer": answer})
    return records


def write_jsonl(path: str | Path, n: int = DEFAULT_SIZE, seed: int = DEFAULT_SEED) -> Path:
    """Write `generate(n, seed)` as jsonl at `path` (one record per line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in generate(n, seed)), encoding="utf-8")
    return path


if __name__ == "__main__":
    import sys

    print(write_jsonl(sys.argv[1] if len(sys.argv) > 1 else "assets/math-small.jsonl"))
