"""The toy arithmetic task: generation, splits and the exact-match grader."""

from __future__ import annotations

import pytest
from asyncopd.tasks import get_grader, load_toy_dataset
from asyncopd.tasks.toy import task

pytestmark = pytest.mark.unit


def test_example_problem_renders_prompt_and_chain_of_thought() -> None:
    problem = task.Problem(operands=(7, 5, 3, 4), operators=("+", "*", "-"))
    assert problem.prompt == "Q:(7+5)*3-4=? A:"
    assert problem.response == "7+5=12;12*3=36;36-4=32#32"
    assert problem.answer == "32"


@pytest.mark.parametrize(
    ("operands", "operators", "expression", "answer"),
    [
        ((2, 3, 4), ("*", "+"), "2*3+4", 10),
        ((2, 3, 4), ("+", "*"), "(2+3)*4", 20),
        ((9, 3, 2), ("-", "-"), "9-3-2", 4),
        ((2, 3, 4, 5), ("*", "+", "*"), "(2*3+4)*5", 50),
    ],
)
def test_expression_parses_back_to_the_left_to_right_value(
    operands: tuple[int, ...], operators: tuple[str, ...], expression: str, answer: int
) -> None:
    problem = task.Problem(operands=operands, operators=operators)
    assert problem.expression == expression
    assert eval(expression) == answer == int(problem.answer)  # Python precedence agrees


def test_every_problem_keeps_values_in_range_and_response_short() -> None:
    parts = task.universe()
    for problem in parts["train"][:5000] + parts["test"][:5000]:
        assert all(0 <= v <= task.MAX_VALUE for v in problem.values)
        assert len(problem.response) <= task.MAX_RESPONSE_CHARS
        assert set(problem.prompt + problem.response) <= set(task.ALPHABET)
        assert eval(problem.expression) == int(problem.answer)


def test_generation_is_deterministic_for_a_seed_and_varies_across_seeds() -> None:
    a = task.sample_problems("train", 200, seed=3)
    b = task.sample_problems("train", 200, seed=3)
    c = task.sample_problems("train", 200, seed=4)
    assert a == b
    assert a != c
    assert len({p.prompt for p in a}) == 200


def test_train_and_test_splits_are_disjoint_for_any_seeds() -> None:
    parts = task.universe()
    assert not {p.prompt for p in parts["train"]} & {p.prompt for p in parts["test"]}
    train = {p.prompt for p in task.sample_problems("train", 5000, seed=0)}
    test = {p.prompt for p in task.sample_problems("test", 2000, seed=1)}
    assert not train & test
    assert all(task.split_of(prompt) == "test" for prompt in test)


def test_asking_for_more_problems_than_a_split_holds_fails() -> None:
    with pytest.raises(ValueError, match="holds only"):
        task.sample_problems("test", len(task.universe()["test"]) + 1, seed=0)


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("7+5=12;12*3=36;36-4=32#32", 1.0),
        ("wrong steps but#32", 1.0),
        ("7+5=12;12*3=36;36-4=32# 32", 1.0),
        ("7+5=12;12*3=36;36-4=31#31", 0.0),
        ("7+5=12;12*3=36;36-4=32", 0.0),
        ("#32#", 0.0),
        ("#3a", 0.0),
        ("", 0.0),
    ],
)
def test_toy_grader_matches_the_final_answer_exactly(response: str, expected: float) -> None:
    assert get_grader("toy").score(response, "32") == expected


def test_toy_dataset_items_carry_answers_and_grader() -> None:
    dataset = load_toy_dataset("test", 20, seed=0)
    assert len(dataset) == 20
    for item in dataset:
        assert item.grader == "toy"
        assert item.prompt.startswith(task.PROMPT_PREFIX) and item.prompt.endswith(task.PROMPT_SUFFIX)
        expression = item.prompt[len(task.PROMPT_PREFIX) : -len(task.PROMPT_SUFFIX)]
        assert eval(expression) == int(item.answer)
