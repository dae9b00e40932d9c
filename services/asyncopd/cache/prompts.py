"""The prompt side of admission: dataset positions -> tokenized `Prompt` records.

The store hands out dataset *positions* (a cursor in Redis); position p is item
`perm_e[p mod N]` of epoch e = p // N, where perm_e is the dataset shuffled with seed
`seed + e`. The permutation is a pure function of the dataset and the seed, so every cache
process derives the same prompt for a position without sharing anything but the cursor.

It knows datasets and tokenization; nothing about Redis or admission.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Sequence

import numpy as np

from asyncopd.models.files import Tokenize
from asyncopd.records import Prompt, TaskInfo
from asyncopd.tasks import PromptItem


class PromptCatalog:
    """Maps dataset positions to prompts, tokenizing each prompt once (ids checked < vocab)."""

    def __init__(self, items: Sequence[PromptItem], tokenize: Tokenize, vocab_size: int, seed: int = 0) -> None:
        if not items:
            raise ValueError("the prompt dataset is empty; the cache has nothing to hand out")
        self._items = list(items)
        self._tokenize = tokenize
        self.vocab_size = vocab_size
        self.seed = seed
        self._perms: dict[int, list[int]] = {}
        self._ids: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def _perm(self, epoch: int) -> list[int]:
        with self._lock:
            perm = self._perms.get(epoch)
            if perm is None:
                perm = list(range(len(self._items)))
                random.Random(self.seed + epoch).shuffle(perm)
                if len(self._perms) > 4:  # positions only move forward; keep recent epochs
                    self._perms.pop(min(self._perms))
                self._perms[epoch] = perm
            return perm

    def index_of(self, pos: int) -> tuple[int, int]:
        """(epoch, dataset index) of cursor position `pos`."""
        epoch, offset = divmod(pos, len(self._items))
        return epoch, self._perm(epoch)[offset]

    def _token_ids(self, index: int) -> np.ndarray:
        ids = self._ids.get(index)
        if ids is None:
            item = self._items[index]
            ids = np.asarray(self._tokenize(item.prompt), dtype=np.int64)
            if ids.ndim != 1 or ids.size == 0:
                raise ValueError(f"prompt {item.prompt_id!r} tokenizes to no tokens")
            if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
                raise ValueError(
                    f"prompt {item.prompt_id!r} has token id {int(ids.max())} outside the student vocabulary "
                    f"(size {self.vocab_size}); the tokenizer does not match the student model"
                )
            ids = ids.astype(np.int32)
            self._ids[index] = ids
        return ids

    def prompt(self, pos: int, ticket: str, version: int) -> Prompt:
        epoch, index = self.index_of(pos)
        item = self._items[index]
        return Prompt(
            prompt_id=item.prompt_id,
            prompt_ids=self._token_ids(index),
            task=TaskInfo(task=item.grader, answer=item.answer, prompt_text=item.prompt),
            epoch=epoch,
            ticket=ticket,
            admitted_version=version,
        )
