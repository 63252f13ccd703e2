"""AUC, per-user GAUC and logloss as torchmetrics metrics of a Transformers4Rec task.

Pass them to a request task, and `tr.Trainer.evaluate`, `tr.Model.evaluate` and `tr.Model.fit` report them:

    task = RequestBinaryClassificationTask("click", metrics=ranking_metrics())   # [AUC(), GAUC(), LogLoss()]
    trainer.evaluate()["eval_/click/request_binary_classification_task/gauc"]

The formulas live in merlin_longseq.metrics (numpy) and only there: these classes collect the predictions of
every batch and hand them to it at compute(), so a number from trainer.evaluate equals the number
merlin_longseq.metrics gives on the same predictions.

GAUC groups candidates by user: RequestBinaryClassificationTask hands it the user id of every real candidate
(the request block records the batch's user ids; the input dict must hold the user column, which
request_dataloader loads whenever the data has one, even for a model that does not read it).
"""
from __future__ import annotations

import torch
import torchmetrics as tm

from merlin_longseq import metrics as formulas


class _CollectingMetric(tm.Metric):
    """Keeps every prediction and label of the evaluation; the value is computed once, over all of them."""

    is_differentiable = False
    full_state_update = False
    short_name = ""  # the metric's key in merlin_longseq.t4r.training.evaluate ("auc" -> "auc_click")

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        preds, target = _flat("preds", preds), _flat("target", target)
        if preds.shape != target.shape:
            raise ValueError(f"{type(self).__name__}: {preds.numel()} predictions but {target.numel()} labels")
        self.preds.append(preds.float())
        self.target.append(target.float())

    def forward(self, *args, **kwargs):
        # torchmetrics' forward also computes the value of the batch alone; for a ranking metric that value is
        # meaningless (and undefined for a batch with one class), and T4R discards it: only accumulate
        self.update(*args, **kwargs)
        return None

    def _collected(self):
        if not self.preds:
            raise ValueError(f"{type(self).__name__}: no predictions were collected (update was never called)")
        return torch.cat(self.preds).cpu().numpy(), torch.cat(self.target).cpu().numpy()


class AUC(_CollectingMetric):
    """Area under the ROC curve over every collected candidate (merlin_longseq.metrics.auc; ties count 1/2)."""

    higher_is_better = True
    short_name = "auc"

    def compute(self) -> torch.Tensor:
        return torch.tensor(formulas.auc(*self._collected()), dtype=torch.float64)


class LogLoss(_CollectingMetric):
    """Mean binary cross-entropy of probabilities (merlin_longseq.metrics.logloss)."""

    higher_is_better = False
    short_name = "logloss"

    def compute(self) -> torch.Tensor:
        return torch.tensor(formulas.logloss(*self._collected()), dtype=torch.float64)


class GAUC(_CollectingMetric):
    """Per-user AUC averaged over users with both labels (merlin_longseq.metrics.gauc).

    update(preds, target, groups): groups holds the user id of every candidate. weighted=True weights each
    user by its number of candidates (the DIN paper's variant).
    """

    higher_is_better = True
    short_name = "gauc"
    needs_groups = True  # RequestBinaryClassificationTask.calculate_metrics passes the user ids

    def __init__(self, weighted: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.weighted = bool(weighted)
        self.add_state("groups", default=[], dist_reduce_fx="cat")

    def update(self, preds: torch.Tensor, target: torch.Tensor, groups: torch.Tensor | None = None) -> None:
        if groups is None:
            raise ValueError("GAUC needs the user id of every candidate: update(preds, target, groups)")
        groups = _flat("groups", groups)
        if groups.numel() != _flat("preds", preds).numel():
            raise ValueError(f"GAUC: {groups.numel()} user ids for {preds.numel()} predictions")
        super().update(preds, target)
        self.groups.append(groups.to(torch.int64))

    def compute(self) -> torch.Tensor:
        preds, target = self._collected()
        groups = torch.cat(self.groups).cpu().numpy()
        return torch.tensor(formulas.gauc(preds, target, groups, weighted=self.weighted), dtype=torch.float64)


def _flat(name: str, values) -> torch.Tensor:
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(values).__name__}")
    return values.detach().reshape(-1)


def ranking_metrics(weighted_gauc: bool = False) -> list:
    """Fresh AUC, GAUC and LogLoss metrics for one task (a task needs its own metric objects)."""
    return [AUC(), GAUC(weighted=weighted_gauc), LogLoss()]


__all__ = ["AUC", "GAUC", "LogLoss", "ranking_metrics"]
