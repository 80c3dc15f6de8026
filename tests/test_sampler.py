"""EpochSampler: deterministic per epoch, disjoint shards, padded only for training, skip for resume."""
from __future__ import annotations

from scaleseg.data.sampler import EpochSampler


def indices(sampler):
    return [i for _, i in sampler]


def test_same_seed_same_order_and_epochs_differ():
    a, b = EpochSampler(50, shuffle=True, seed=3), EpochSampler(50, shuffle=True, seed=3)
    assert indices(a) == indices(b)
    first = indices(a)
    a.set_epoch(1)
    assert indices(a) != first and sorted(indices(a)) == list(range(50))
    assert all(e == 1 for e, _ in a)


def test_eval_shards_are_disjoint_and_complete():
    shards = [indices(EpochSampler(10, shuffle=False, rank=r, world_size=3, pad=False)) for r in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert [len(EpochSampler(10, shuffle=False, rank=r, world_size=3, pad=False)) for r in range(3)] == [4, 3, 3]


def test_training_shards_are_padded_to_equal_length():
    shards = [EpochSampler(10, shuffle=True, seed=0, rank=r, world_size=4) for r in range(4)]
    got = [indices(s) for s in shards]
    assert all(len(g) == 3 == len(s) for g, s in zip(got, shards))
    assert set().union(*map(set, got)) == set(range(10))


def test_skip_drops_the_first_samples_once_consumed():
    s = EpochSampler(8, shuffle=True, seed=1)
    full = indices(s)
    s.skip = 3
    assert indices(s) == full[3:]
