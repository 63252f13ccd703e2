"""AUC, GAUC and logloss against brute-force definitions on tiny inputs (ties, single-class users)."""
import math

import numpy as np
import pytest
import torch

from merlin_longseq.metrics import auc, gauc, logloss


def pairwise_auc(scores, labels):
    """The definition: over every (positive, negative) pair, 1 if the positive scores higher, 1/2 on a tie."""
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def loop_gauc(scores, labels, users, weighted=False):
    total, weight = 0.0, 0
    for user in sorted(set(users)):
        s = [x for x, u in zip(scores, users) if u == user]
        y = [x for x, u in zip(labels, users) if u == user]
        if 0 < sum(y) < len(y):
            w = len(y) if weighted else 1
            total += w * pairwise_auc(s, y)
            weight += w
    return total / weight


def test_auc_known_answers():
    assert auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert auc([1, 1, 1], [0, 1, 0]) == 0.5  # all tied
    assert auc([3, 2, 1], [1, 0, 0]) == 1.0
    assert auc([3, 2, 1], [0, 0, 1]) == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_pairwise_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 40))
    scores = rng.integers(0, 4, size=n).astype(float)  # few distinct values: many ties
    labels = rng.integers(0, 2, size=n)
    labels[:2] = [0, 1]
    assert auc(scores, labels) == pytest.approx(pairwise_auc(scores, labels), abs=1e-12)
    # torch tensors in, same answer
    assert auc(torch.tensor(scores), torch.tensor(labels)) == pytest.approx(pairwise_auc(scores, labels), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_gauc_matches_loop_and_skips_single_class_users(seed):
    rng = np.random.default_rng(seed)
    n = 60
    users = rng.integers(0, 8, size=n)
    scores = rng.integers(0, 5, size=n).astype(float)
    labels = rng.integers(0, 2, size=n)
    labels[users == 3] = 1  # one user with positives only, one with negatives only: left out
    labels[users == 5] = 0
    for weighted in (False, True):
        assert gauc(scores, labels, users, weighted=weighted) == pytest.approx(
            loop_gauc(scores, labels, users, weighted), abs=1e-12)


def test_gauc_is_not_global_auc():
    # each user ranks perfectly but user B's scores sit below user A's negatives: GAUC 1, AUC lower
    scores = [0.9, 0.8, 0.2, 0.1]
    labels = [1, 0, 1, 0]
    users = ["a", "a", "b", "b"]
    assert gauc(scores, labels, users) == 1.0
    assert auc(scores, labels) == pytest.approx(pairwise_auc(scores, labels)) and auc(scores, labels) < 1.0


def test_logloss_matches_formula_and_clips():
    p, y = [0.9, 0.2, 0.6], [1, 0, 0]
    expected = -(math.log(0.9) + math.log(0.8) + math.log(0.4)) / 3
    assert logloss(p, y) == pytest.approx(expected)
    assert math.isfinite(logloss([0.0, 1.0], [1, 0]))  # clipped, not infinite
    assert logloss([1.0, 0.0], [1, 0]) == pytest.approx(-math.log(1 - 1e-7))


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="at least one positive and one negative"):
        auc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="differ in length"):
        auc([0.1, 0.2], [1])
    with pytest.raises(ValueError, match="0 or 1"):
        auc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="NaN"):
        auc([float("nan"), 0.2], [0, 1])
    with pytest.raises(ValueError, match="1-D"):
        auc([[0.1, 0.2]], [[0, 1]])
    with pytest.raises(ValueError, match="group with both"):
        gauc([0.1, 0.2], [1, 0], [1, 2])
    with pytest.raises(ValueError, match="one entry per score"):
        gauc([0.1, 0.2], [1, 0], [1])
    with pytest.raises(ValueError, match="probabilities in \\[0, 1\\]"):
        logloss([1.5, 0.2], [1, 0])
    with pytest.raises(ValueError, match="empty"):
        logloss([], [])
