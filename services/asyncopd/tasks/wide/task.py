"""The wide task: continue a long walk on a word graph, with a free choice at every word.

A fixed graph (drawn once from `GRAPH_SEED`) gives every animal twelve allowed next animals
with unequal probabilities. The prompt is the walk's first line; the response continues it for
25 more lines, labelled B to Z, eight animals a line, each allowed after the one before it (the
first after the prompt's last), then names where the walk ended:

    prompt   Continue the walk:
             A: cat owl hen bee cow yak fox ram
    response B: ant dog ...
             ...
             Z: ... bat
             end: bat

Under the Qwen3 tokenizer every animal is one token (with its leading space), a line is 11
tokens and a response 279 (with the end-of-turn token): long, like the responses the project
is built for, and uncertain at 200 of its positions, where a model that knows the task spreads
its mass over twelve animals (weights (rank + 1)^-1/2: a top-8 list misses 22 % of it there).
Everything else in a response is determined by what came before.

A response is correct when every line has its label and eight allowed animals and the last
line names the walk's last animal. The reference answer a prompt carries is the prompt's last
animal (where the walk continues from): what the grader needs besides the graph.

Prompts are split by a hash of their text, so train and test are disjoint for every seed; a
seed only picks which first lines are drawn. This module knows strings only: no tokenizer, no
model, no files.
"""

from __future__ import annotations

import hashlib
import random
import string
from dataclasses import dataclass
from functools import cache
from typing import Literal

Split = Literal["train", "test"]

ANIMALS: tuple[str, ...] = (
    "cat", "dog", "fox", "owl", "bee", "ant", "cow", "pig", "hen", "elk",
    "bat", "rat", "ram", "yak", "ape", "bear", "deer", "duck", "frog", "goat",
    "hawk", "lion", "mole", "seal", "wolf", "crab", "crow", "dove", "fish", "hare",
    "lamb", "moth", "slug", "tiger", "whale", "horse", "mouse", "sheep", "camel", "eagle",
)  # fmt: skip
GRAPH_SEED = "asyncopd-wide-graph-v1"
SUCCESSORS = 12
"""Allowed next animals per animal."""
WEIGHT_EXPONENT = 0.5
"""The i-th successor (0-based) has weight (i + 1)^-WEIGHT_EXPONENT."""
LABELS: tuple[str, ...] = tuple(string.ascii_uppercase)
WORDS_PER_LINE = 8
END_MARK = "end"
PROMPT_HEADER = "Continue the walk:"
TEST_BUCKETS = 10
"""One prompt in TEST_BUCKETS (by hash) belongs to the test split."""
RESPONSE_STEPS = (len(LABELS) - 1) * WORDS_PER_LINE
"""Animals a response adds to the walk: 200."""


@cache
def successors(animal: str) -> dict[str, float]:
    """The animals allowed after `animal`, with their probabilities."""
    if animal not in ANIMALS:
        raise KeyError(f"{animal!r} is not an animal of the wide task's graph")
    rng = random.Random(f"{GRAPH_SEED}:{animal}")
    chosen = rng.sample([a for a in ANIMALS if a != animal], SUCCESSORS)
    weights = [(i + 1) ** -WEIGHT_EXPONENT for i in range(SUCCESSORS)]
    total = sum(weights)
    return {a: w / total for a, w in zip(chosen, weights, strict=True)}


def _line(label: str, animals: list[str] | tuple[str, ...]) -> str:
    return f"{label}: " + " ".join(animals)


def walk(after: str, steps: int, rng: random.Random) -> list[str]:
    """`steps` animals drawn from the graph's probabilities, the first allowed after `after`."""
    out: list[str] = []
    current = after
    for _ in range(steps):
        options = successors(current)
        current = rng.choices(list(options), weights=list(options.values()))[0]
        out.append(current)
    return out


@dataclass(frozen=True)
class Problem:
    """One prompt: the walk's first line (line A)."""

    first_line: tuple[str, ...]

    @property
    def prompt(self) -> str:
        return f"{PROMPT_HEADER}\n{_line(LABELS[0], self.first_line)}"

    @property
    def answer(self) -> str:
        """The animal the response continues from (what the grader needs besides the graph)."""
        return self.first_line[-1]

    @property
    def prompt_id(self) -> str:
        return "wide/" + "-".join(self.first_line)

    def sample_response(self, rng: random.Random) -> str:
        """A correct response drawn from the graph's probabilities (without end-of-turn)."""
        return response_text(walk(self.answer, RESPONSE_STEPS, rng))


def response_text(animals: list[str]) -> str:
    """The response for the RESPONSE_STEPS animals that continue a walk."""
    if len(animals) != RESPONSE_STEPS:
        raise ValueError(f"a response adds {RESPONSE_STEPS} animals, got {len(animals)}")
    lines = [_line(label, animals[i * WORDS_PER_LINE : (i + 1) * WORDS_PER_LINE]) for i, label in enumerate(LABELS[1:])]
    lines.append(f"{END_MARK}: {animals[-1]}")
    return "\n".join(lines)


def walk_of(response: str, after: str) -> list[str] | None:
    """The animals of a well-formed, allowed continuation of a walk whose last animal is `after`
    (every line labelled B to Z, eight animals a line, each allowed after the one before, the end
    line naming the last), else None."""
    if after not in ANIMALS:
        raise ValueError(f"not a wide-task reference answer (an animal of the graph): {after!r}")
    lines = response.strip().split("\n")
    if len(lines) != len(LABELS):
        return None
    animals: list[str] = []
    current = after
    for label, line in zip(LABELS[1:], lines, strict=False):
        head, colon, rest = line.partition(":")
        words = rest.split(" ")[1:]
        if head != label or not colon or len(words) != WORDS_PER_LINE or rest != " " + " ".join(words):
            return None
        for word in words:
            if word not in successors(current):
                return None
            current = word
            animals.append(word)
    if lines[-1] != f"{END_MARK}: {current}":
        return None
    return animals


def is_correct(response: str, answer: str) -> bool:
    """Whether `response` correctly continues a walk whose reference answer (last animal) is `answer`."""
    return walk_of(response, answer.strip()) is not None


def split_of(prompt: str) -> Split:
    """Which split a prompt belongs to: a pure function of its text."""
    digest = hashlib.sha256(prompt.encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") % TEST_BUCKETS == 0 else "train"


def sample_problems(split: Split, n: int, seed: int) -> list[Problem]:
    """`n` distinct problems of `split`, drawn deterministically from `seed`: first lines walked
    from a uniformly drawn animal, kept when their prompt hashes into `split`."""
    rng = random.Random(f"wide:{seed}:{split}")
    seen: set[tuple[str, ...]] = set()
    out: list[Problem] = []
    while len(out) < n:
        first = rng.choice(ANIMALS)
        line = (first, *walk(first, WORDS_PER_LINE - 1, rng))
        problem = Problem(line)
        if line not in seen and split_of(problem.prompt) == split:
            seen.add(line)
            out.append(problem)
    return out


def topk_missing_mass(k: int) -> float:
    """The mass a top-`k` list misses at a walk position, under the task's own distribution."""
    weights = sorted(successors(ANIMALS[0]).values(), reverse=True)
    return float(sum(weights[k:]))
