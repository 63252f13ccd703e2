"""Ranking metrics with numpy only: AUC, GAUC (per-user AUC averaged), logloss.

AUC is the Mann-Whitney statistic: the probability that a random positive scores above a random negative,
ties counting one half. It is computed from average ranks in O(n log n).
"""
from __future__ import annotations

import numpy as np


def _as_array(values, name: str, dtype=np.float64) -> np.ndarray:
    if hasattr(values, "detach"):  # torch tensors without importing torch
        values = values.detach().cpu().numpy()
    array = np.asarray(values, dtype=dtype)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    return array


def _scores_labels(scores, labels):
    scores = _as_array(scores, "scores")
    labels = _as_array(labels, "labels")
    if scores.shape != labels.shape:
        raise ValueError(f"scores and labels differ in length: {scores.shape[0]} vs {labels.shape[0]}")
    if not np.isin(labels, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    return scores, labels.astype(bool)


def _rank_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    # average 1-based rank of every block of equal scores
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(scores)]
    ranks = np.empty(len(scores))
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    positives = int(labels.sum())
    negatives = len(labels) - positives
    return float((ranks[labels].sum() - positives * (positives + 1) / 2.0) / (positives * negatives))


def auc(scores, labels) -> float:
    """Area under the ROC curve; ties count one half. Needs both classes."""
    scores, labels = _scores_labels(scores, labels)
    if labels.all() or not labels.any():
        raise ValueError("AUC needs at least one positive and one negative label")
    return _rank_auc(scores, labels)


def gauc(scores, labels, groups, weighted: bool = False) -> float:
    """Group AUC: the AUC of every group (user) that has both classes, averaged over those groups.

    weighted=False: plain mean over users; weighted=True: weighted by each user's number of impressions
    (the variant of the DIN paper). Users with one class only are left out: their AUC is undefined.
    """
    scores, labels = _scores_labels(scores, labels)
    groups = np.asarray(groups.detach().cpu().numpy() if hasattr(groups, "detach") else groups)
    if groups.shape != scores.shape:
        raise ValueError(f"groups must have one entry per score: {groups.shape} vs {scores.shape}")
    order = np.argsort(groups, kind="mergesort")
    sorted_groups = groups[order]
    bounds = np.r_[0, np.flatnonzero(sorted_groups[1:] != sorted_groups[:-1]) + 1, len(groups)]
    values, weights = [], []
    for start, end in zip(bounds[:-1], bounds[1:]):
        index = order[start:end]
        group_labels = labels[index]
        if group_labels.all() or not group_labels.any():
            continue
        values.append(_rank_auc(scores[index], group_labels))
        weights.append(end - start)
    if not values:
        raise ValueError("GAUC needs at least one group with both a positive and a negative label")
    return float(np.average(values, weights=weights if weighted else None))


def logloss(probabilities, labels, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities (clipped to [eps, 1 - eps]) against 0/1 labels."""
    probabilities, labels = _scores_labels(probabilities, labels)
    if len(labels) == 0:
        raise ValueError("logloss of an empty set")
    if (probabilities < 0).any() or (probabilities > 1).any():
        raise ValueError("logloss needs probabilities in [0, 1] (apply a sigmoid to logits first)")
    p = np.clip(probabilities, eps, 1.0 - eps)
    return float(-np.mean(np.where(labels, np.log(p), np.log1p(-p))))


def binary_metrics(probabilities, labels, groups=None) -> dict:
    """{"auc", "gauc", "logloss"} of one label's probabilities (gauc only when groups, the user ids, are given)."""
    out = {"auc": auc(probabilities, labels)}
    if groups is not None:
        out["gauc"] = gauc(probabilities, labels, groups)
    out["logloss"] = logloss(probabilities, labels)
    return out
