"""Deterministic batches of token windows (training) and contiguous windows (validation).

Training batches are a pure function of ``(seed, step)``: step ``s`` draws the global batch's
``batch * world`` window starts from a generator seeded with ``SeedSequence([seed, s])``, and rank
``r`` takes rows ``[r * batch, (r + 1) * batch)``. Hence

* resuming is exact: the state is just the step counter (:meth:`TokenBatcher.state_dict`), and a
  resumed batcher draws the very batches an uninterrupted one would;
* ranks are disjoint shards of one global batch: concatenating the ranks' batches (in rank order)
  gives the ``world = 1`` batch of size ``batch * world`` — so a DDP run sees the same data as one
  process with the global batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ..errors import DataError

__all__ = ["TokenBatcher", "step_seed", "val_batches"]


def step_seed(seed: int, step: int) -> int:
    """A 63-bit seed for step ``step`` of a run seeded ``seed`` (independent streams per step)."""
    return int(np.random.SeedSequence([int(seed), int(step)]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def _check_ids(ids, length: int, what: str) -> np.ndarray:
    arr = ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{what}: token ids must be a 1-D integer array, got shape {arr.shape} "
                        f"dtype {arr.dtype}", path="ids")
    if length < 1:
        raise DataError(f"{what}: length must be at least 1, got {length}", path="length")
    if arr.size < length + 1:
        raise DataError(f"{what}: the text has {arr.size} tokens, fewer than one window of "
                        f"length {length} + 1; use a shorter --length or a larger corpus", path="length")
    return arr


class TokenBatcher:
    """Random windows of ``ids`` as next-token batches, deterministic per step.

    Args:
        ids: the token ids of the training text, 1-D (numpy or torch, any integer dtype).
        batch: rows per rank (the global batch is ``batch * world``).
        length: tokens per row ``T``.
        seed: the run's data seed.
        rank, world: this process' rank and the number of processes.

    ``next()`` returns ``(x, y)``, both ``LongTensor[batch, length]`` on the CPU, with
    ``y[:, t] == x[:, t + 1]`` for ``t < length - 1`` (windows of ``length + 1`` tokens). Window
    starts are uniform over ``[0, len(ids) - length - 1]``, drawn with replacement.
    """

    def __init__(self, ids, batch: int, length: int, *, seed: int, rank: int = 0, world: int = 1) -> None:
        if batch < 1:
            raise DataError(f"batch must be at least 1, got {batch}", path="batch")
        if not 0 <= rank < world:
            raise DataError(f"rank {rank} is outside [0, world={world})", path="rank")
        self.ids = _check_ids(ids, length, "TokenBatcher")
        self.batch, self.length, self.seed, self.rank, self.world = batch, length, int(seed), rank, world
        self.step = 0
        self._offsets = np.arange(length + 1)

    @property
    def global_batch(self) -> int:
        return self.batch * self.world

    def starts(self, step: int) -> np.ndarray:
        """Window starts of this rank's rows at ``step``: ``int64[batch]``."""
        rng = np.random.default_rng(step_seed(self.seed, step))
        every = rng.integers(0, self.ids.size - self.length, size=self.global_batch)
        return every[self.rank * self.batch:(self.rank + 1) * self.batch]

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch ``(x, y)``: ``LongTensor[batch, length]`` each; advances the step."""
        win = self.ids[self.starts(self.step)[:, None] + self._offsets]
        self.step += 1
        w = torch.from_numpy(win.astype(np.int64, copy=False))
        return w[:, :-1], w[:, 1:]

    __next__ = next

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def state_dict(self) -> dict:
        """JSON-serialisable position: the step, plus the settings the batches depend on (checked
        by :meth:`load_state_dict`)."""
        return {"step": self.step, "seed": self.seed, "global_batch": self.global_batch,
                "length": self.length, "n_tokens": int(self.ids.size)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``. Refuses (``DataError``) a state drawn with another seed, global
        batch, length or text, since the resumed batches would differ from the uninterrupted run's;
        a different split of the same global batch over ranks is fine."""
        mine = self.state_dict()
        for key in ("seed", "global_batch", "length", "n_tokens"):
            if key in state and state[key] != mine[key]:
                raise DataError(f"the saved data position was drawn with {key}={state[key]}, this run "
                                f"has {key}={mine[key]}; resume with the same settings and corpus",
                                path=key)
        step = state.get("step")
        if not isinstance(step, int) or step < 0:
            raise DataError(f"the saved data position has no valid step ({step!r})", path="step")
        self.step = step


def val_batches(ids, batch: int, length: int, max_batches: int | None = None, *, rank: int = 0,
                world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Contiguous, non-overlapping windows of ``ids`` in order, for validation.

    Window ``i`` covers tokens ``[i * length, (i + 1) * length]`` (``length + 1`` tokens, so every
    token after the first is predicted once). Windows are grouped ``batch`` at a time (the last batch
    may be smaller); at most ``max_batches`` batches are yielded. With ``world > 1`` rank ``r`` gets
    batches ``r, r + world, ...`` of that sequence. Yields ``(x, y)``: ``LongTensor[b, length]``.
    """
    arr = _check_ids(ids, length, "val_batches")
    if batch < 1:
        raise DataError(f"batch must be at least 1, got {batch}", path="batch")
    n_win = (arr.size - 1) // length
    n_batches = -(-n_win // batch)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    offsets = np.arange(length + 1)
    for b in range(rank, n_batches, world):
        starts = np.arange(b * batch, min((b + 1) * batch, n_win)) * length
        w = torch.from_numpy(arr[starts[:, None] + offsets].astype(np.int64, copy=False))
        yield w[:, :-1], w[:, 1:]
