"""Labeled / validation / unlabeled splits: balance, disjointness, determinism, bad budgets."""

from __future__ import annotations

import numpy as np
import pytest

from fewlabels.config import PipelineError
from fewlabels.data import class_balanced_split

# An unbalanced tiny training set: class c has 30 + 3c images.
LABELS = np.concatenate([np.full(30 + 3 * c, c) for c in range(10)])
np.random.default_rng(0).shuffle(LABELS)


def split(n_labeled=50, n_val=20, seed=0, pool_size=0):
    return class_balanced_split(LABELS, n_labeled, n_val, seed, pool_size)


def test_labeled_and_validation_sets_are_class_balanced():
    parts = split(n_labeled=50, n_val=20)
    assert np.bincount(LABELS[parts["labeled_idx"]]).tolist() == [5] * 10
    assert np.bincount(LABELS[parts["val_idx"]]).tolist() == [2] * 10


def test_parts_are_disjoint_and_cover_the_training_set():
    parts = split()
    all_idx = np.concatenate(list(parts.values()))
    assert len(np.unique(all_idx)) == len(all_idx) == len(LABELS)


def test_same_seed_same_split_and_other_seed_another():
    a, b, c = split(seed=3), split(seed=3), split(seed=4)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["labeled_idx"], c["labeled_idx"])


def test_budgets_are_nested_and_validation_does_not_move():
    small, large = split(n_labeled=20), split(n_labeled=100)
    assert set(small["labeled_idx"]) <= set(large["labeled_idx"])
    np.testing.assert_array_equal(small["val_idx"], large["val_idx"])


def test_pool_size_restricts_every_part_to_a_subset():
    parts = split(n_labeled=10, n_val=0, pool_size=200)
    total = sum(len(v) for v in parts.values())
    assert total == 200
    assert np.bincount(LABELS[parts["labeled_idx"]]).tolist() == [1] * 10


@pytest.mark.parametrize(
    ("n_labeled", "n_val", "message"),
    [
        (0, 0, "labels=0 must be a positive multiple of the 10 classes"),
        (-10, 0, "labels=-10 must be a positive multiple"),
        (105, 0, "labels=105 must be a positive multiple of the 10 classes"),
        (50, 15, "split.val_size=15 must be a non-negative multiple"),
        (310, 0, "asks for 31 images of class 0, but the training pool has only 30"),
        (300, 10, "asks for 31 images of class 0"),
    ],
)
def test_bad_budgets_stop_with_a_clear_message(n_labeled, n_val, message):
    with pytest.raises(PipelineError, match=message):
        split(n_labeled=n_labeled, n_val=n_val)
