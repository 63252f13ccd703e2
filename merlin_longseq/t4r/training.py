"""Train, evaluate and predict request models the Transformers4Rec way: tr.Trainer over request_dataloader.

    block = STCABlock.from_schema(schema, d_model=64)
    model = request_model(block, ["click", "like"])                       # AUC / GAUC / LogLoss per task
    stats = fit(model, "data/train", epochs=4, batch_size=64, learning_rate=1e-3,
                train_transform=RecentHistoryWindow(BetaLengthSampler(max_train_len=1024)))
    evaluate(model, "data/eval", batch_size=256)                           # {"auc_click": ..., "gauc_click": ...}
    evaluate(model, "data/eval", batch_size=256, max_history=64)           # the same, histories cut to 64
    predict(model, "data/eval", batch_size=256)                            # per-candidate probabilities

Every function takes plain arguments and leaves process state as it found it: no warning filters, no thread
settings, and evaluate restores the random state that building an HF Trainer reseeds (fit seeds it on purpose,
with its `seed`, as tr.Trainer does). The Trainer route is the stock one; what these helpers add is the loader
(request_dataloader: T4R's default loader cannot read request data) and, for the training loader only, the
optional transform (fresh length-extrapolation windows every epoch; evaluation reads full histories or a cap).

The conventional T4R route works as well, with the request loader engine named in the arguments:

    args = training_arguments(output_dir, epochs=4, batch_size=64)       # data_loader_engine="merlin_request"
    trainer = tr.Trainer(model=model, args=args, schema=dataset.schema, train_dataset_or_path="data/train",
                         eval_dataset_or_path="data/eval", compute_metrics=True)
"""
from __future__ import annotations

import contextlib
import random
import tempfile
import time
from typing import Callable, Sequence

import numpy as np
import torch
import transformers4rec.torch as tr
from tqdm.auto import tqdm
from transformers.trainer_callback import PrinterCallback

from merlin_longseq.extrapolation import RecentHistoryWindow
from merlin_longseq.t4r.metrics import ranking_metrics
from merlin_longseq.t4r.request import (RequestBinaryClassificationTask, RequestDataLoader, find_request_block,
                                        request_dataloader)

ENGINE = "merlin_request"  # RequestDataLoader's name in T4R's data loader registry


def request_model(block, labels: Sequence[str], metrics: Callable[[], list] | None = ranking_metrics):
    """tr.Model(tr.Head(block, [RequestBinaryClassificationTask(label) per label])).

    metrics: a factory of fresh metric objects per task (default AUC, GAUC, LogLoss); None keeps the task's
    defaults (Precision, Recall, Accuracy, AUROC).
    """
    labels = [labels] if isinstance(labels, str) else list(labels)
    if not labels:
        raise ValueError("a request model needs at least one label")
    tasks = [RequestBinaryClassificationTask(label, metrics=None if metrics is None else metrics())
             for label in labels]
    return tr.Model(tr.Head(block, tasks))


def model_labels(model) -> list[str]:
    """The target (label column) of every task of a request model, in task order."""
    find_request_block(model)
    return [task.target_name for head in model.heads for task in head.prediction_task_dict.values()]


def training_arguments(output_dir: str, *, epochs: float = 1, batch_size: int = 64, eval_batch_size: int | None = None,
                       learning_rate: float = 1e-3, seed: int = 0, progress: bool = True,
                       **overrides) -> tr.trainer.T4RecTrainingArguments:
    """T4RecTrainingArguments for request data.

    Differences from the defaults, and why: data_loader_engine="merlin_request" (the stock "merlin" engine fails
    on request data); report_to=[] and save_strategy="no" (nothing written unless asked); loss logged once per
    epoch; optim="adamw_torch" (HF's own AdamW is deprecated). Everything else is HF / T4R's default (linear
    learning-rate decay, gradient clipping at 1.0, ...); `overrides` sets any other field.
    """
    values = dict(output_dir=str(output_dir), num_train_epochs=epochs, per_device_train_batch_size=batch_size,
                  per_device_eval_batch_size=eval_batch_size or batch_size, learning_rate=learning_rate, seed=seed,
                  data_loader_engine=ENGINE, report_to=[], save_strategy="no", logging_strategy="epoch",
                  optim="adamw_torch", disable_tqdm=not progress, no_cuda=not torch.cuda.is_available())
    values.update(overrides)
    return tr.trainer.T4RecTrainingArguments(**values)


def request_trainer(model, args, *, train_data=None, eval_data=None, train_transform: Callable | None = None,
                    eval_transform: Callable | None = None, **trainer_kwargs) -> tr.Trainer:
    """A stock tr.Trainer whose loaders are request_dataloader's (labels: the model's tasks).

    train_data / eval_data: parquet path(s) or a merlin.io.Dataset of request-grouped rows. train_transform runs
    on the training batches only (e.g. RecentHistoryWindow(sampler): new windows every epoch), eval_transform
    on the evaluation batches (e.g. RecentHistoryWindow(max_len=L)). Without progress (args.disable_tqdm), the
    Trainer prints nothing.
    """
    labels = model_labels(model)
    train = None if train_data is None else request_dataloader(
        train_data, args.per_device_train_batch_size, labels, shuffle=True, drop_last=args.dataloader_drop_last,
        transform=train_transform)
    evaluation = None if eval_data is None else request_dataloader(
        eval_data, args.per_device_eval_batch_size, labels, transform=eval_transform)
    trainer_kwargs.setdefault("compute_metrics", True)
    trainer = tr.Trainer(model=model, args=args, train_dataloader=train, eval_dataloader=evaluation,
                         callbacks=list(trainer_kwargs.pop("callbacks", [])), **trainer_kwargs)
    if args.disable_tqdm:
        trainer.remove_callback(PrinterCallback)  # it prints every log line when the progress bar is off
    return trainer


class _Counter:
    """A loader step that counts the requests and real candidates it passes on (for throughput figures)."""

    def __init__(self, candidate_column: str):
        self.candidate_column, self.requests, self.candidates = candidate_column, 0, 0

    def __call__(self, inputs, targets=None):
        candidates = inputs[self.candidate_column]
        self.requests += int(candidates.shape[0])
        self.candidates += int((candidates != 0).sum())
        return inputs, targets


def fit(model, train_data, *, epochs: float = 1, batch_size: int = 64, learning_rate: float = 1e-3, seed: int = 0,
        train_transform: Callable | None = None, output_dir: str | None = None, progress: bool = True,
        **training_args) -> dict:
    """Trains `model` in place with tr.Trainer; returns figures of the run.

    training_args: any T4RecTrainingArguments field (lr_scheduler_type, max_grad_norm, weight_decay, ...).
    Returns epoch_losses (the Trainer's mean loss of each epoch), train_loss_first / train_loss_last (first and
    last epoch), train_seconds, train_requests_per_second and train_candidates_per_second (real candidates).
    The Trainer seeds Python, numpy and torch with `seed` when it is built, as tr.Trainer always does.
    """
    with _scratch_dir(output_dir) as out:
        args = training_arguments(out, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, seed=seed,
                                  progress=progress, **training_args)
        trainer = request_trainer(model, args, train_data=train_data, train_transform=train_transform)
        counter = _Counter(find_request_block(model).columns.cand_item_id)
        trainer.train_dataloader.dataset.map(counter)  # a merlin Loader step, after the transform
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    if not losses:
        raise RuntimeError("the Trainer logged no training loss (no training step ran?)")
    return {"epoch_losses": losses, "train_loss_first": losses[0], "train_loss_last": losses[-1],
            "train_seconds": round(seconds, 2), "train_requests_per_second": round(counter.requests / seconds, 1),
            "train_candidates_per_second": round(counter.candidates / seconds, 1)}


def evaluate(model, data, *, batch_size: int = 64, max_history: int | None = None, progress: bool = True,
             metric_key_prefix: str = "eval") -> dict:
    """tr.Trainer.evaluate over request data: {"loss": ..., "<metric>_<label>": ...}.

    The metrics are those of the model's tasks (request_model's default: auc, gauc, logloss), named by their
    `short_name` (else T4R's name for them). max_history: cut every history to its most recent max_history
    events (RecentHistoryWindow(max_len=...)); None reads full histories.
    """
    transform = None if max_history is None else RecentHistoryWindow(max_len=max_history)
    with _kept_random_state(), _scratch_dir(None) as out:
        args = training_arguments(out, batch_size=batch_size, progress=progress)
        trainer = request_trainer(model, args, eval_data=data, eval_transform=transform)
        raw = trainer.evaluate(metric_key_prefix=metric_key_prefix)
    results = {"loss": raw[f"{metric_key_prefix}_/loss"]}
    for head in model.heads:
        for task in head.prediction_task_dict.values():
            for metric in task.metrics:
                key = f"{metric_key_prefix}_/{task.metric_name(metric)}"
                name = getattr(metric, "short_name", "") or task.metric_name(metric).rsplit("/", 1)[-1]
                results[f"{name}_{task.target_name}"] = raw[key]
    return results


def predict(model, data, *, batch_size: int = 64, max_history: int | None = None, progress: bool = True) -> dict:
    """Probabilities of every real candidate, in data order: {"user_id", "p_<label>", "<label>"} numpy arrays.

    A plain loop rather than trainer.predict: T4R's prediction loop concatenates the [requests, candidates]
    outputs of batches of different widths with a -100 fill, returns no labels and truncates to the number of
    requests, so the real candidates could not be told from padding. user_id is present when the data has it.
    """
    labels = model_labels(model)
    block = find_request_block(model)
    transform = None if max_history is None else RecentHistoryWindow(max_len=max_history)
    loader = request_dataloader(data, batch_size, labels, transform=transform)
    names = {task.target_name: name for head in model.heads for name, task in head.prediction_task_dict.items()}
    out = {"user_id": [], **{f"p_{label}": [] for label in labels}, **{label: [] for label in labels}}
    model.eval()
    with torch.no_grad():
        for inputs, targets in tqdm(loader, desc="predict", disable=not progress, leave=False):
            scores = model(inputs)
            scores = scores if isinstance(scores, dict) else {names[labels[0]]: scores}
            real = block.candidate_mask
            for label in labels:
                out[f"p_{label}"].append(scores[names[label]][real].cpu().numpy())
                out[label].append(targets[label][real].cpu().numpy())
            if block.request_user_ids is not None:
                users = block.request_user_ids.reshape(-1, 1).expand_as(real)
                out["user_id"].append(users[real].cpu().numpy())
    if not out["user_id"]:
        del out["user_id"]
    return {key: np.concatenate(values) for key, values in out.items()}


@contextlib.contextmanager
def _scratch_dir(output_dir: str | None):
    """output_dir, or a temporary folder removed afterwards (HF needs an output_dir even when it saves nothing)."""
    if output_dir is not None:
        yield str(output_dir)
        return
    with tempfile.TemporaryDirectory(prefix="merlin_longseq_trainer_") as folder:
        yield folder


@contextlib.contextmanager
def _kept_random_state():
    """Restores Python's, numpy's and torch's random state (building an HF Trainer reseeds all three)."""
    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])


__all__ = ["ENGINE", "RequestDataLoader", "evaluate", "fit", "model_labels", "predict", "request_model",
           "request_trainer", "training_arguments"]
