"""Training batches (windows, exact resume, rank sharding) and validation windows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nlgraph.data import TokenBatcher, val_batches
from nlgraph.errors import DataError

IDS = np.random.default_rng(0).integers(0, 256, size=5000)


def test_batches_are_windows_of_the_text_shifted_by_one():
    b = TokenBatcher(IDS, 4, 32, seed=1)
    starts = b.starts(0)
    x, y = b.next()
    assert x.dtype == y.dtype == torch.long and x.shape == y.shape == (4, 32)
    for row, s in enumerate(starts):
        assert x[row].tolist() == IDS[s:s + 32].tolist()
        assert y[row].tolist() == IDS[s + 1:s + 33].tolist()
    assert torch.equal(y[:, :-1], x[:, 1:])


def test_every_start_is_reachable_and_none_overruns():
    ids = np.arange(12)
    b = TokenBatcher(ids, 8, 9, seed=0)  # starts in {0, 1, 2}: 9 + 1 tokens must fit
    seen = set()
    for _ in range(20):
        x, y = b.next()
        seen.update(x[:, 0].tolist())
        assert int(y.max()) <= 11
    assert seen == {0, 1, 2}


def test_resume_draws_the_same_batches_as_an_uninterrupted_run():
    full = TokenBatcher(IDS, 3, 16, seed=7)
    reference = [full.next() for _ in range(10)]
    first = TokenBatcher(IDS, 3, 16, seed=7)
    for _ in range(4):
        first.next()
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    resumed = TokenBatcher(IDS, 3, 16, seed=7)
    resumed.load_state_dict(state)
    for want in reference[4:]:
        got = resumed.next()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_seeds_give_different_batches():
    a = TokenBatcher(IDS, 4, 16, seed=0).next()[0]
    b = TokenBatcher(IDS, 4, 16, seed=1).next()[0]
    assert not torch.equal(a, b)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_concatenate_to_the_single_process_global_batch(world):
    single = TokenBatcher(IDS, 2 * world, 16, seed=3)
    ranks = [TokenBatcher(IDS, 2, 16, seed=3, rank=r, world=world) for r in range(world)]
    for _ in range(5):
        want = single.next()
        got = [r.next() for r in ranks]
        assert torch.equal(torch.cat([g[0] for g in got]), want[0])
        assert torch.equal(torch.cat([g[1] for g in got]), want[1])


def test_a_rank_may_resume_a_single_process_position():
    single = TokenBatcher(IDS, 4, 16, seed=3)
    for _ in range(3):
        single.next()
    rank1 = TokenBatcher(IDS, 2, 16, seed=3, rank=1, world=2)
    rank1.load_state_dict(single.state_dict())  # same global batch, split over two ranks
    assert torch.equal(rank1.next()[0], single.next()[0][2:])


@pytest.mark.parametrize("change", [dict(seed=8), dict(batch=4), dict(length=8), dict(ids=IDS[:-1])])
def test_resuming_with_other_settings_is_refused(change):
    kw = dict(ids=IDS, batch=3, length=16, seed=7)
    state = TokenBatcher(kw.pop("ids"), **kw).state_dict()
    kw = dict(ids=IDS, batch=3, length=16, seed=7) | change
    other = TokenBatcher(kw.pop("ids"), **kw)
    with pytest.raises(DataError, match="resume with the same settings"):
        other.load_state_dict(state)


def test_bad_arguments():
    with pytest.raises(DataError, match="fewer than one window"):
        TokenBatcher(np.arange(10), 2, 10, seed=0)
    with pytest.raises(DataError, match="1-D integer"):
        TokenBatcher(np.zeros((4, 4)), 2, 2, seed=0)
    with pytest.raises(DataError, match="rank 2 is outside"):
        TokenBatcher(IDS, 2, 8, seed=0, rank=2, world=2)


def test_val_batches_cover_the_text_once_in_order():
    ids = np.arange(1000)
    batches = list(val_batches(ids, 4, 30))
    n_win = 999 // 30
    assert [x.shape[0] for x, _ in batches] == [4] * (n_win // 4) + [n_win % 4]
    x = torch.cat([x for x, _ in batches]).flatten()
    y = torch.cat([y for _, y in batches]).flatten()
    assert x.tolist() == list(range(n_win * 30)) and y.tolist() == list(range(1, n_win * 30 + 1))
    assert len(list(val_batches(ids, 4, 30, max_batches=2))) == 2


def test_val_batches_split_over_ranks():
    ids = np.arange(1000)
    every = [x for x, _ in val_batches(ids, 4, 30)]
    r0 = [x for x, _ in val_batches(ids, 4, 30, rank=0, world=2)]
    r1 = [x for x, _ in val_batches(ids, 4, 30, rank=1, world=2)]
    assert all(torch.equal(a, b) for a, b in zip(every[0::2], r0)) and len(r0) == len(every[0::2])
    assert all(torch.equal(a, b) for a, b in zip(every[1::2], r1)) and len(r1) == len(every[1::2])
