"""PredictLongSeq: the model step of a merlin-systems ensemble, run in-process by the executor model (python
backend) with PyTorch, our Triton kernels on GPU through the models' backend="auto".

Input columns (after the NVTabular workflow; names from the request core's RequestColumns), one row per request:
    hist_item_id, hist_action, hist_timestamp  ragged lists (the user's history, oldest first)
    cand_item_id                               ragged list (N candidates; N >= 1, or N >= 0 with top_k)
    request_time, user_id                      scalars (user_id also keys the optional user-side cache)
Output columns: one ragged float32 list per task, `score_<task>` (`score` for an unnamed single task),
aligned with cand_item_id (raw logits). A next-item model exported with top_k = k also returns
`topk_item_id` (k raw item ids per request, best first) and `topk_score` (their logits).

The module is not pickled with the ensemble: save_artifacts writes the model's description as JSON and its
weights as a state dict; load_artifacts rebuilds it from the registry when the executor model loads (weights
read with weights_only=True; on CUDA when the server sees a GPU).
"""
from __future__ import annotations

import dataclasses
import io
import os

import numpy as np
import torch

import merlin.dtypes as md
from merlin.dag import BaseOperator, ColumnSelector
from merlin.schema import ColumnSchema, Schema, Tags
from merlin.table import TensorTable

from merlin_longseq import registry
from merlin_longseq.request import RequestBatch, RequestColumns, RequestLimits
from merlin_longseq.serving.artifacts import (VOCABULARY_FILE, WEIGHTS_FILE, _sha256, load_model, model_files,
                                              resolve_device)
from merlin_longseq.serving.scoring import UserStateCache, make_scorer

TOPK_IDS, TOPK_SCORES = "topk_item_id", "topk_score"


class PredictLongSeq(BaseOperator):
    """Scores every request's candidates with a registered model (user side once per request)."""

    def __init__(self, model: torch.nn.Module, limits: RequestLimits, *, task_names=None,
                 columns: RequestColumns | None = None, device: str = "auto", cache_entries: int = 0,
                 cache_bytes: int = 1 << 30, top_k: int = 0, exclude_history: bool = False,
                 item_vocabulary: np.ndarray | None = None):
        super().__init__()
        spec = registry.of_model(model)
        self.arch = spec.name
        self.kind = spec.kind
        self.columns = columns or RequestColumns()
        num_tasks = 1 if spec.kind == registry.NEXT_ITEM else model.cfg.num_tasks
        if num_tasks < 1:
            raise ValueError("a served model needs at least one task head")
        if task_names is None and getattr(model.cfg, "tasks", None):
            task_names = model.cfg.tasks
        task_names = tuple(task_names or (["score"] if num_tasks == 1 else [f"task{i}" for i in range(num_tasks)]))
        if len(task_names) != num_tasks:
            raise ValueError(f"{len(task_names)} task names for a model with {num_tasks} tasks")
        self.task_names = task_names
        if top_k and spec.kind != registry.NEXT_ITEM:
            raise ValueError(f"top_k needs a next-item model; {spec.name} scores given candidates only")
        if top_k < 0 or (top_k and top_k > model.num_items):
            raise ValueError(f"top_k must lie in [0, {getattr(model, 'num_items', 0)}], got {top_k}")
        self.top_k, self.exclude_history = int(top_k), bool(exclude_history)
        if top_k:
            limits = dataclasses.replace(limits, min_candidates=0)  # a top-k request needs no candidates
        self.limits = limits
        self.device = device
        self.cache_entries, self.cache_bytes = int(cache_entries), int(cache_bytes)
        if spec.kind == registry.RANKING:
            missing = [f for f in ("hist_timestamp", "request_time") if getattr(self.columns, f) is None]
            if missing:
                raise ValueError(f"{self.arch} needs the request columns {missing}")
        if limits.needs_user_ids and not self.columns.user_id:
            raise ValueError("this model needs user ids: set columns.user_id")
        self._description = registry.model_to_dict(model)
        self._vocabulary = None if item_vocabulary is None else np.asarray(item_vocabulary)
        self._scorer = None
        # the artifact files' bytes are fixed here, so their checksums travel in the pickled recipe and the
        # server can tell a damaged or replaced file from the one exported
        self._files = model_files(model)
        if self._vocabulary is not None:
            buffer = io.BytesIO()
            np.save(buffer, self._vocabulary, allow_pickle=False)
            self._files[VOCABULARY_FILE] = buffer.getvalue()
        self.checksums = {name: _sha256(data) for name, data in self._files.items()}

    # ---- schema -----------------------------------------------------------------------------------------
    @property
    def output_names(self) -> list[str]:
        scores = [t if t == "score" else f"score_{t}" for t in self.task_names]
        return scores + ([TOPK_IDS, TOPK_SCORES] if self.top_k else [])

    def compute_input_schema(self, root_schema, parents_schema, deps_schema, selector):
        schema = parents_schema + deps_schema
        missing = [c for c in self.columns.all if c not in schema.column_names]
        if missing:
            raise ValueError(f"PredictLongSeq needs column(s) {missing}; the workflow outputs "
                             f"{schema.column_names} (set `columns` to map the names)")
        return schema[self.columns.all]

    def compute_selector(self, input_schema, selector, parents_selector=None, dependencies_selector=None):
        return ColumnSelector(self.columns.all)

    def compute_output_schema(self, input_schema, col_selector, prev_output_schema=None):
        columns = [ColumnSchema(name, dtype=md.float32, is_list=True, is_ragged=True, tags=[Tags.CONTINUOUS])
                   for name in self.output_names if name != TOPK_IDS]
        if self.top_k:
            columns.append(ColumnSchema(TOPK_IDS, dtype=md.int64, is_list=True, is_ragged=True,
                                        tags=[Tags.ITEM, Tags.ID]))
        return Schema(columns)

    # ---- artifacts ----------------------------------------------------------------------------------------
    def save_artifacts(self, artifact_path=None):
        if not artifact_path:
            return
        for name, data in self._files.items():
            with open(os.path.join(artifact_path, name), "wb") as f:
                f.write(data)

    def load_artifacts(self, artifact_path=None):
        if self._files is None:  # in the server: the recipe came unpickled, the model comes from the files
            model = load_model(artifact_path, self.checksums)
            vocabulary_path = os.path.join(artifact_path, VOCABULARY_FILE)
            if os.path.exists(vocabulary_path):
                self._vocabulary = np.load(vocabulary_path, allow_pickle=False)
        else:  # in-process: the same bytes the files would hold
            model = registry.model_from_dict(self._description)
            model.load_state_dict(torch.load(io.BytesIO(self._files[WEIGHTS_FILE]), weights_only=True))
        self._build(model.eval())

    def __getstate__(self):
        # the ensemble pickle holds the recipe only; the model travels in the artifact files
        return {k: (None if k in ("_scorer", "_vocabulary", "_files") else v)
                for k, v in self.__dict__.items()}

    def _build(self, model):
        cache = UserStateCache(self.cache_entries, self.cache_bytes) if self.cache_entries > 0 else None
        self._scorer = make_scorer(model, self.limits, device=resolve_device(self.device), cache=cache)

    @property
    def scorer(self):
        if self._scorer is None:
            if self._files is None:
                raise RuntimeError("PredictLongSeq has no model: load_artifacts was not called")
            self.load_artifacts()
        return self._scorer

    # ---- inference -----------------------------------------------------------------------------------------
    def transform(self, col_selector, transformable):
        table = transformable if isinstance(transformable, TensorTable) else TensorTable.from_df(transformable)
        batch = RequestBatch.from_columns(self._column(table), self.columns)
        logits = self.scorer.score(batch).numpy().astype(np.float32)  # [C, tasks]
        if not np.isfinite(logits).all():  # never send a NaN score to a client as if it were one
            raise RuntimeError(f"the {self.arch} model produced non-finite scores for this batch")
        offsets = batch.cand_offsets.numpy().astype(np.int32)
        out = {name: (np.ascontiguousarray(logits[:, t]), offsets)
               for t, name in enumerate(self.output_names[:len(self.task_names)])}
        if self.top_k:
            ids, scores = self.scorer.top_k(batch, self.top_k, exclude_history=self.exclude_history,
                                            never=self.limits.unknown_item_ids)
            ids = ids.numpy()
            if self._vocabulary is not None:
                ids = self._vocabulary[ids]  # encoded -> raw item ids
            k_offsets = (np.arange(batch.num_requests + 1) * self.top_k).astype(np.int32)
            out[TOPK_IDS] = (np.ascontiguousarray(ids.reshape(-1).astype(np.int64)), k_offsets)
            out[TOPK_SCORES] = (np.ascontiguousarray(scores.numpy().reshape(-1).astype(np.float32)), k_offsets)
        return TensorTable(out)

    @staticmethod
    def _column(table):
        def column(name):
            col = table[name].cpu()
            return np.asarray(col.values), (None if col.offsets is None else np.asarray(col.offsets))

        return column

    def describe(self) -> dict:
        return {"arch": self.arch, "kind": self.kind, "tasks": list(self.task_names), "outputs": self.output_names,
                "columns": dataclasses.asdict(self.columns), "max_history": self.limits.max_history,
                "max_candidates": self.limits.max_candidates, "top_k": self.top_k,
                "exclude_history": self.exclude_history, "unknown_item_ids": list(self.limits.unknown_item_ids),
                "device": self.device, "cache_entries": self.cache_entries, "checksums": dict(self.checksums)}
