"""The `math` grader (\\boxed{} extraction + symbolic equivalence through math-verify), with and
without math-verify installed, and the `gsm8k` grader it sits beside."""

from __future__ import annotations

import sys

import pytest
from asyncopd.tasks import MissingExtraError, extract_boxed, get_grader
from asyncopd.tasks.graders import require_math_verify

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so the answer is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("\\boxed{1} then \\boxed{ 2 }", "2"),  # the last box, stripped
        ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),  # nested braces
        ("no box here: 0.5", None),
        ("\\boxed{\\frac{1}{2}", None),  # never closed
    ],
)
def test_extract_boxed_takes_the_last_balanced_box(text: str, expected: str | None) -> None:
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    ("response", "answer", "expected"),
    [
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0),
        ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
        ("\\boxed{1/2}", "\\frac{1}{2}", 1.0),
        ("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}", 1.0),
        ("thus \\boxed{\\pi/4}", "\\frac{\\pi}{4}", 1.0),
        ("\\boxed{\\frac{2\\pi}{8}}", "\\frac{\\pi}{4}", 1.0),
        ("\\boxed{3\\sqrt{2}}", "\\sqrt{18}", 1.0),
        ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}", 0.0),
        ("\\boxed{-24}", "-24", 1.0),
        ("\\boxed{24}", "-24", 0.0),
        ("the answer is 0.5", "\\frac{1}{2}", 0.0),  # no box: wrong, not guessed
        ("\\boxed{}", "1", 0.0),
        ("\\boxed{\\frac{{}", "1", 0.0),  # malformed
    ],
)
def test_math_grader_checks_symbolic_equivalence(response: str, answer: str, expected: float) -> None:
    pytest.importorskip("math_verify")
    assert get_grader("math").score(response, answer) == expected


def test_math_grader_without_math_verify_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes `import math_verify` raise ImportError, as if not installed.
    monkeypatch.setitem(sys.modules, "math_verify", None)
    with pytest.raises(MissingExtraError, match=r"asyncopd\[math\]"):
        require_math_verify()
    with pytest.raises(MissingExtraError, match="math-verify"):
        get_grader("math").score("\\boxed{1}", "1")


def test_gsm8k_grader_is_still_registered_beside_math() -> None:
    assert get_grader("gsm8k").score("#### 7", "7") == 1.0
    assert get_grader("gsm8k").score("\\boxed{7}", "7") == 0.0
