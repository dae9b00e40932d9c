"""A prompt dataset: an ordered list of prompts, each with its reference answer and grader."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import overload


@dataclass(frozen=True)
class PromptItem:
    """One prompt: a stable id, the text the model sees, the reference answer, the grader name."""

    prompt_id: str
    prompt: str
    answer: str
    grader: str


class PromptDataset(Sequence[PromptItem]):
    """An immutable, indexable list of prompts with a name (for logs and metrics)."""

    def __init__(self, name: str, items: Sequence[PromptItem]) -> None:
        ids = [it.prompt_id for it in items]
        if len(set(ids)) != len(ids):
            raise ValueError(f"dataset {name!r} has duplicate prompt ids; every prompt_id must be unique")
        self.name = name
        self._items: tuple[PromptItem, ...] = tuple(items)

    def __len__(self) -> int:
        return len(self._items)

    @overload
    def __getitem__(self, index: int) -> PromptItem: ...

    @overload
    def __getitem__(self, index: slice) -> PromptDataset: ...

    def __getitem__(self, index: int | slice) -> PromptItem | PromptDataset:
        if isinstance(index, slice):
            return PromptDataset(self.name, self._items[index])
        return self._items[index]

    def __iter__(self) -> Iterator[PromptItem]:
        return iter(self._items)

    def head(self, n: int) -> PromptDataset:
        """The first `n` items (all of them when n exceeds the size)."""
        return PromptDataset(self.name, self._items[:n])

    def shuffled(self, seed: int) -> PromptDataset:
        """The same items in an order drawn from `seed` (e.g. one epoch of a run)."""
        items = list(self._items)
        random.Random(seed).shuffle(items)
        return PromptDataset(self.name, items)

    def epochs(self, seed: int) -> Iterator[PromptItem]:
        """Items forever: epoch e is the dataset shuffled with seed `seed + e`."""
        epoch = 0
        while True:
            yield from self.shuffled(seed + epoch)
            epoch += 1
