"""Training minibatches for reflection: epoch-shuffled, and a pure function of the mutation number.

gepa draws minibatches from one stateful sampler in iteration order. With many mutations in flight
we instead compute mutation ``k``'s minibatch directly, so a run's minibatches do not depend on which
mutation happened to be launched first.
"""

from __future__ import annotations

import random
from collections.abc import Sequence


class EpochShuffledSampler:
    def __init__(self, ids: Sequence[int], size: int, seed: int) -> None:
        if not ids:
            raise ValueError("cannot sample minibatches from an empty training set")
        self._ids = tuple(ids)
        self._size = min(size, len(self._ids))
        self._seed = seed
        self._epochs: dict[int, tuple[int, ...]] = {}

    def _epoch(self, e: int) -> tuple[int, ...]:
        if e not in self._epochs:
            order = list(self._ids)
            random.Random(f"minibatch:{self._seed}:{e}").shuffle(order)
            self._epochs[e] = tuple(order)
        return self._epochs[e]

    def batch(self, k: int) -> tuple[int, ...]:
        """The ``k``-th minibatch, never repeating an id within a batch.

        Each epoch is one shuffle of the ids, padded (as gepa pads) with ids from its own start up to a
        multiple of the minibatch size, so every id is drawn once per epoch and a few twice, and the
        batch of mutation ``k`` depends on nothing but ``k``.
        """
        n, size = len(self._ids), self._size
        per_epoch = -(-n // size)
        epoch, j = divmod(k, per_epoch)
        order = self._epoch(epoch)
        padded = order + order[: per_epoch * size - n]
        return tuple(padded[j * size : (j + 1) * size])
