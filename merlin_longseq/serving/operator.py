"""PredictLongSeq: the model step of a merlin-systems ensemble, run in-process by the executor model (python
backend) with PyTorch, our Triton kernels on GPU through the models' backend="auto".

Input columns (after the NVTabular workflow), one row per request:
    hist_item_id, hist_action, hist_timestamp  ragged lists (the user's history, most recent last)
    cand_item_id                               ragged list (N candidates, N >= 1)
    request_time, user_id                      scalars (user_id also keys the optional user-side cache)
Output columns: one ragged float32 list per task, `score_<task>` (`score` for an unnamed single task),
aligned with cand_item_id (raw logits).

The module is not pickled with the ensemble: save_artifacts writes its config and weights next to the
ensemble, load_artifacts rebuilds it when the executor model loads (on CUDA when the server sees a GPU).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np
import torch

import merlin.dtypes as md
from merlin.dag import BaseOperator, ColumnSelector
from merlin.schema import ColumnSchema, Schema, Tags
from merlin.table import TensorTable

from merlin_longseq.serving.scoring import RequestBatch, RequestRules, UserStateCache, make_scorer, \
    model_architecture

ARTIFACT_FILE = "merlin_longseq_model.pt"


@dataclass
class ServingColumns:
    """Column names of the request contract (workflows/request_grouping.py's output names by default)."""

    hist_item_id: str = "hist_item_id"
    hist_action: str | None = "hist_action"
    hist_timestamp: str | None = "hist_timestamp"
    request_time: str | None = "request_time"
    user_id: str | None = "user_id"
    cand_item_id: str = "cand_item_id"

    def list_columns(self) -> list[str]:
        return [c for c in (self.hist_item_id, self.hist_action, self.hist_timestamp, self.cand_item_id) if c]

    def scalar_columns(self) -> list[str]:
        return [c for c in (self.request_time, self.user_id) if c]


def model_state(model: torch.nn.Module) -> dict:
    """Everything needed to rebuild a served model: architecture, constructor arguments, weights."""
    arch = model_architecture(model)
    extra = {}
    if arch == "hstu":
        extra = {"num_items": model.num_items, "num_actions": model.tokenizer.action_embedding.num_embeddings - 1}
    return {"arch": arch, "config": model.cfg, "extra": extra,
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}


def build_model(state: dict) -> torch.nn.Module:
    arch, cfg = state["arch"], state["config"]
    if arch == "stca":
        from merlin_longseq.models.stca import STCAModel
        model = STCAModel(cfg)
    elif arch == "longer":
        from merlin_longseq.models.longer import LONGERModel
        model = LONGERModel(cfg)
    else:
        from merlin_longseq.models.hstu import HSTUNextItemModel
        model = HSTUNextItemModel(state["extra"]["num_items"], cfg, num_actions=state["extra"]["num_actions"])
    model.load_state_dict(state["state_dict"])
    return model.eval()


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    return device


class PredictLongSeq(BaseOperator):
    """Scores every request's candidates with an STCA, LONGER or HSTU model (user side once per request)."""

    def __init__(self, model: torch.nn.Module, rules: RequestRules, *, task_names=None,
                 columns: ServingColumns | None = None, device: str = "auto", cache_entries: int = 0,
                 cache_bytes: int = 1 << 30):
        super().__init__()
        self.arch = model_architecture(model)
        self.rules = rules
        self.columns = columns or ServingColumns()
        num_tasks = 1 if self.arch == "hstu" else model.cfg.num_tasks
        if self.arch == "stca" and task_names is None:
            task_names = model.cfg.tasks
        task_names = tuple(task_names or (["score"] if num_tasks == 1 else [f"task{i}" for i in range(num_tasks)]))
        if len(task_names) != num_tasks:
            raise ValueError(f"{len(task_names)} task names for a model with {num_tasks} tasks")
        if num_tasks < 1:
            raise ValueError("a served model needs at least one task head")
        self.task_names = task_names
        self.device = device
        self.cache_entries, self.cache_bytes = int(cache_entries), int(cache_bytes)
        if self.arch != "hstu":
            if not (self.columns.hist_action and self.columns.hist_timestamp and self.columns.request_time):
                raise ValueError(f"{self.arch} needs hist_action, hist_timestamp and request_time columns")
        if rules.needs_user_ids and not self.columns.user_id:
            raise ValueError("this model needs user ids: set columns.user_id")
        self._state = model_state(model)
        self._scorer = None

    # ---- schema -----------------------------------------------------------------------------------------
    @property
    def output_names(self) -> list[str]:
        return [t if t == "score" else f"score_{t}" for t in self.task_names]

    def compute_input_schema(self, root_schema, parents_schema, deps_schema, selector):
        schema = parents_schema + deps_schema
        needed = self.columns.list_columns() + self.columns.scalar_columns()
        missing = [c for c in needed if c not in schema.column_names]
        if missing:
            raise ValueError(f"PredictLongSeq needs column(s) {missing}; the workflow outputs "
                             f"{schema.column_names} (set `columns` to map the names)")
        return schema[needed]

    def compute_selector(self, input_schema, selector, parents_selector=None, dependencies_selector=None):
        return ColumnSelector(self.columns.list_columns() + self.columns.scalar_columns())

    def compute_output_schema(self, input_schema, col_selector, prev_output_schema=None):
        return Schema([ColumnSchema(name, dtype=md.float32, is_list=True, is_ragged=True,
                                    tags=[Tags.CONTINUOUS]) for name in self.output_names])

    # ---- artifacts ----------------------------------------------------------------------------------------
    def save_artifacts(self, artifact_path=None):
        if artifact_path:
            torch.save(self._state, os.path.join(artifact_path, ARTIFACT_FILE))

    def load_artifacts(self, artifact_path=None):
        state = self._state
        if state is None:
            state = torch.load(os.path.join(artifact_path, ARTIFACT_FILE), map_location="cpu", weights_only=False)
        self._build(state)

    def __getstate__(self):
        # the ensemble pickle holds the recipe only; weights travel in the artifact file
        return {k: (None if k in ("_state", "_scorer") else v) for k, v in self.__dict__.items()}

    def _build(self, state):
        cache = UserStateCache(self.cache_entries, self.cache_bytes) if self.cache_entries > 0 else None
        self._scorer = make_scorer(build_model(state), self.rules, device=resolve_device(self.device),
                                   cache=cache)

    @property
    def scorer(self):
        if self._scorer is None:
            if self._state is None:
                raise RuntimeError("PredictLongSeq has no model: load_artifacts was not called")
            self._build(self._state)
        return self._scorer

    # ---- inference -----------------------------------------------------------------------------------------
    def transform(self, col_selector, transformable):
        table = transformable if isinstance(transformable, TensorTable) else TensorTable.from_df(transformable)
        batch = RequestBatch.from_arrays(**self._arrays(table))
        logits = self.scorer.score(batch).numpy().astype(np.float32)  # [C, tasks]
        offsets = batch.cand_offsets.numpy().astype(np.int32)
        return TensorTable({name: (np.ascontiguousarray(logits[:, t]), offsets)
                            for t, name in enumerate(self.output_names)})

    def _arrays(self, table) -> dict:
        cols = self.columns

        def column(name):
            col = table[name].cpu()
            values = np.asarray(col.values)
            return values, (None if col.offsets is None else np.asarray(col.offsets))

        hist_items, hist_offsets = column(cols.hist_item_id)
        cand_items, cand_offsets = column(cols.cand_item_id)
        if hist_offsets is None or cand_offsets is None:
            raise ValueError(f"{cols.hist_item_id} and {cols.cand_item_id} must be ragged list columns")
        arrays = dict(hist_item_ids=hist_items, hist_offsets=hist_offsets, cand_item_ids=cand_items,
                      cand_offsets=cand_offsets)
        for field, name in (("hist_actions", cols.hist_action), ("hist_timestamps", cols.hist_timestamp)):
            if name:
                values, offsets = column(name)
                if offsets is not None and not np.array_equal(offsets, hist_offsets):
                    raise ValueError(f"{name} must have one value per history event (as {cols.hist_item_id})")
                arrays[field] = values
        for field, name in (("request_time", cols.request_time), ("user_ids", cols.user_id)):
            if name:
                arrays[field] = column(name)[0].reshape(-1)
        return arrays

    def describe(self) -> dict:
        return {"arch": self.arch, "tasks": list(self.task_names), "outputs": self.output_names,
                "columns": asdict(self.columns), "max_history": self.rules.max_history,
                "unknown_item_ids": list(self.rules.unknown_item_ids), "device": self.device,
                "cache_entries": self.cache_entries}
