"""Export a trained model plus its NVTabular item encoding as a Triton model repository (merlin-systems).

    repo/
      0_transformworkflowtriton/   the serving workflow (python backend, NVTabular): raw ids -> model ids
      executor_model/              the ensemble entry point (python backend): runs the DAG, and in it our
                                   PredictLongSeq step (PyTorch; Triton kernels on GPU)
      merlin_longseq.json          what the client needs: input columns, outputs, architecture, limits

The serving workflow. Training workflows group an impression log (workflows/request_grouping.py) or an
event log (workflows/sequences.py); a request at serving time already carries the user's raw history and
its candidates. `serving_workflow` therefore takes the FITTED item Categorify out of the training
workflow and applies its vocabulary, unchanged, jointly to the history and candidate item lists; every
other column passes through. Raw ids the vocabulary does not know become Categorify's null / OOV ids
(1, 2), which the model step rejects with a clear error.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from typing import Sequence

import numpy as np
import torch
from merlin.systems.dag import Ensemble
from merlin.systems.dag.ops.workflow import TransformWorkflow
from merlin.systems.dag.runtimes.triton import TritonExecutorRuntime
from merlin.systems.dag.runtimes.triton.ops.workflow import TransformWorkflowTriton

from merlin_longseq import registry
from merlin_longseq.request import RequestColumns
from merlin_longseq.serving.admission import MANIFEST
from merlin_longseq.serving.operator import PredictLongSeq
from merlin_longseq.serving.scoring import serving_limits

ENTRY_MODEL = "executor_model"
# Categorify (NVTabular 23.08) encodes 0 = padding, 1 = null, 2 = out of vocabulary, 3.. = vocabulary
CATEGORIFY_UNKNOWN_IDS = (1, 2)


def _categorify_ops(workflow):
    import nvtabular as nvt
    from merlin.dag import postorder_iter_nodes

    return [node.op for node in postorder_iter_nodes(workflow.output_node) if isinstance(node.op, nvt.ops.Categorify)]


def find_item_vocabulary(workflow, item_column: str | None = None) -> tuple[str, str]:
    """(storage name, parquet path) of the fitted Categorify vocabulary of the item ids in `workflow`.

    item_column None: the joint hist_item_id/cand_item_id vocabulary of a request workflow, else `item_id`.
    """
    candidates = [item_column] if item_column else ["hist_item_id", "cand_item_id", "item_id"]
    for op in _categorify_ops(workflow):
        for column in candidates:
            storage = op.storage_name.get(column, column)
            if storage in op.categories:
                return storage, op.categories[storage]
    found = {name for op in _categorify_ops(workflow) for name in op.categories}
    raise ValueError(f"no fitted Categorify of {candidates} in this workflow (fitted vocabularies: "
                     f"{sorted(found) or 'none'}); fit the workflow first or pass item_column")


def serving_workflow(workflow, *, columns: RequestColumns | None = None, item_column: str | None = None,
                     out_path: str, user_dtype=None):
    """A fitted nvt.Workflow over the raw request columns: history and candidate item lists encoded with
    the training workflow's item vocabulary (jointly), the other request columns passed through.

    out_path receives a copy of the vocabulary (Workflow.save copies it again into the repository).
    """
    import merlin.dtypes as md
    import nvtabular as nvt
    import pandas as pd
    from merlin.schema import ColumnSchema, Schema, Tags

    columns = columns or RequestColumns()
    storage, path = find_item_vocabulary(workflow, item_column)
    joint = f"{columns.hist_item_id}_{columns.cand_item_id}"
    # the same vocabulary (same row index = same encoded id) under the joint name Categorify looks up
    vocab = pd.read_parquet(path)
    vocab = vocab.rename(columns={storage: joint, f"{storage}_size": f"{joint}_size"})
    os.makedirs(out_path, exist_ok=True)
    joint_path = os.path.join(out_path, f"unique.{joint}.parquet")
    vocab.to_parquet(joint_path)

    encode = nvt.ops.Categorify(encode_type="joint", out_path=out_path)
    # a pre-fitted op: its vocabulary is the training one, so this workflow needs no fit
    encode.categories = {joint: joint_path}
    encode.storage_name = {columns.hist_item_id: joint, columns.cand_item_id: joint}
    encoded = [[columns.hist_item_id, columns.cand_item_id]] >> encode
    passthrough = [c for c in columns.all if c not in (columns.hist_item_id, columns.cand_item_id)]
    flow = nvt.Workflow(encoded + passthrough if passthrough else encoded)

    def list_col(name, tags=()):
        return ColumnSchema(name, dtype=md.int64, is_list=True, is_ragged=True, tags=list(tags))
    inputs = [list_col(columns.hist_item_id, [Tags.ITEM, Tags.ID]),
              list_col(columns.cand_item_id, [Tags.ITEM, Tags.ID])]
    inputs += [list_col(c) for c in (columns.hist_action, columns.hist_timestamp) if c]
    inputs += [ColumnSchema(c, dtype=user_dtype or md.int64) for c in columns.scalars]
    flow.fit_schema(Schema(inputs))
    return flow


def _named_runtime(name: str):
    """merlin-systems' Triton runtime, except that the workflow model is called `<name>_<n>_transformworkflow`
    (stock: `<n>_transformworkflowtriton`), so several ensembles can share one repository."""
    runtime = TritonExecutorRuntime()
    runtime.op_table = {**runtime.op_table, TransformWorkflow: lambda op: NamedTransformWorkflowTriton(op, name)}
    return runtime


class NamedTransformWorkflowTriton(TransformWorkflowTriton):
    """TransformWorkflowTriton whose Triton model is `<prefix>_<n>_transformworkflowtriton`."""

    def __init__(self, op, prefix: str = ""):
        super().__init__(op)
        self.prefix = prefix

    def export(self, path, input_schema, output_schema, params=None, node_id=None, version=1):
        return super().export(path, input_schema, output_schema, params=params,
                              node_id=f"{self.prefix}_{node_id}", version=version)


def servable(model, task_names: Sequence[str] | None = None):
    """(core model to serve, task names) for a registered core model or a trained Transformers4Rec model.

    A tr.Model over a request block (STCABlock, LONGERBlock, ...) becomes the block's model with the T4R task
    heads folded in as its task head (the served logits are the T4R model's pre-sigmoid scores).
    """
    try:
        spec = registry.of_model(model)
    except ValueError:
        spec = None
    if spec is not None:
        if spec.kind == registry.RANKING and model.cfg.num_tasks == 0:
            raise ValueError(f"this {type(model).__name__} is headless; export the Transformers4Rec model that "
                             "holds its heads")
        return model, (tuple(task_names) if task_names else None)
    if not hasattr(model, "heads") or not hasattr(model, "modules"):
        raise ValueError(f"cannot serve a {type(model).__name__}: expected a Transformers4Rec model or a core model "
                         f"of a registered architecture ({', '.join(registry.names())})")
    from merlin_longseq.t4r.request import RequestBlock, headed_core_model

    if any(isinstance(m, RequestBlock) for m in model.modules()):
        core, names = headed_core_model(model, task_names)
        return core, names
    from merlin_longseq.t4r.hstu import HSTUBlock

    if any(isinstance(m, HSTUBlock) for m in model.modules()):
        from merlin_longseq.t4r.hstu import next_item_servable

        return next_item_servable(model), None
    raise ValueError("this Transformers4Rec model holds no merlin-longseq block (STCABlock, LONGERBlock, ...)")


def item_vocabulary(workflow, item_column: str | None = None):
    """Raw item id of every encoded id (row index = encoded id) from the workflow's fitted Categorify."""
    import pandas as pd

    storage, path = find_item_vocabulary(workflow, item_column)
    values = pd.read_parquet(path)[storage].dropna()
    if values.dtype.kind not in "iu":
        raise ValueError(f"top-k decoding needs integer raw item ids; the vocabulary holds {values.dtype}")
    # the parquet's index is the encoded id (Categorify 23.08 starts at 3: 0 pad, 1 null, 2 OOV, which have no
    # raw id and map to 0 here; they are never recommended)
    codes = values.index.to_numpy(np.int64)
    table = np.zeros(int(codes.max()) + 1 if codes.size else 1, dtype=np.int64)
    table[codes] = values.to_numpy(np.int64)
    return table


def export(repo_dir: str, workflow, model: torch.nn.Module, *, max_history: int | None = None,
           task_names: Sequence[str] | None = None, columns: RequestColumns | None = None,
           item_column: str | None = None, device: str = "auto", cache_entries: int = 0,
           cache_bytes: int = 1 << 30, check_unknown_items: bool = True, name: str = ENTRY_MODEL,
           top_k: int = 0, exclude_history: bool = False, max_candidates: int | None = None) -> dict:
    """Write a Triton model repository serving `model` behind the item encoding of `workflow`.

    workflow: a fitted training workflow holding the item Categorify (build_request_workflow's, or
              sequences.build_encode_workflow's), or None when the request already carries model ids.
    model:    the trained Transformers4Rec model (tr.Model over STCABlock, LONGERBlock, MeanPoolBlock or
              DINBlock with RequestBinaryClassificationTask heads), or a core model of a registered
              architecture (STCAModel, LONGERModel, ..., HSTUNextItemModel) trained on that encoding.
    max_history: longest history accepted (HSTU: at most its max_seq_len; required for ranking models).
    columns:  request column names; next-item models default to item lists and user id only (set
              hist_action / hist_timestamp to use them).
    cache_entries > 0 turns on the per-user cache of encoded user sides (bounded by cache_bytes too).
    top_k > 0 (next-item models): every answer also holds the k best items of the catalogue (raw ids,
              decoded through the workflow's vocabulary) with their scores; exclude_history leaves out
              items already in the request's history. Candidates are then optional.
    name:     the entry model's name; export several models under different names into one repository
              to serve them from one server.
    Returns the manifest entry (also merged into repo_dir/merlin_longseq.json under "models"/name).
    """
    if not name or not all(ch.isalnum() or ch in "_-" for ch in name):
        raise ValueError(f"model name must be letters, digits, _ or -, got {name!r}")
    model, task_names = servable(model, task_names)
    spec = registry.of_model(model)
    if columns is None:
        # next-item requests: the item history (and timestamps when the model has a time bias) and a user id
        # (the cache key); no request time, no candidates required with top_k
        columns = RequestColumns() if spec.kind == registry.RANKING else RequestColumns(
            hist_action=None, request_time=None, user_id="user_id",
            hist_timestamp="hist_timestamp" if getattr(model, "uses_timestamps", False) else None)
    model = copy.deepcopy(model).cpu().eval()
    unknown = CATEGORIFY_UNKNOWN_IDS if (workflow is not None and check_unknown_items) else ()
    limits = serving_limits(model, max_history, unknown, max_candidates=max_candidates)
    vocabulary = item_vocabulary(workflow, item_column) if (top_k and workflow is not None) else None
    predict = PredictLongSeq(model, limits, task_names=task_names, columns=columns, device=device,
                             cache_entries=cache_entries, cache_bytes=cache_bytes, top_k=top_k,
                             exclude_history=exclude_history, item_vocabulary=vocabulary)
    final = os.path.abspath(repo_dir)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    # written whole into a staging folder beside the repository, then swapped in: a killed export leaves the
    # previous release as it was and nothing partial under the repository's name
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.export-", dir=os.path.dirname(final))
    try:
        if os.path.isdir(final):  # other models of the repository stay
            shutil.copytree(final, staging, dirs_exist_ok=True, symlinks=True)
        with tempfile.TemporaryDirectory() as scratch:  # Workflow.save copies the vocabulary into the repo
            if workflow is not None:
                flow = serving_workflow(workflow, columns=columns, item_column=item_column, out_path=scratch)
                graph = flow.input_schema.column_names >> TransformWorkflow(flow) >> predict
                input_schema = flow.input_schema
            else:
                input_schema = _raw_input_schema(columns)
                graph = input_schema.column_names >> predict
            ensemble = Ensemble(graph, input_schema)
            ensemble.export(staging, name=name, runtime=_named_runtime(name))
        # our executor: client mistakes answered as INVALID_ARG with the validator's message, no tracebacks
        shutil.copyfile(os.path.join(os.path.dirname(os.path.abspath(__file__)), "executor_model.py"),
                        os.path.join(staging, name, "1", "model.py"))
        manifest = {
            "model_name": name,
            "inputs": {"lists": columns.lists, "scalars": columns.scalars},
            **predict.describe(),
        }
        path = os.path.join(staging, MANIFEST)
        everything = read_manifest(staging) if os.path.exists(path) else {"models": {}}
        everything["models"][name] = manifest
        with open(path, "w", encoding="utf-8") as f:
            json.dump(everything, f, indent=2)
        _swap_in(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # after a swap: the previous release
    return manifest


_RENAME_EXCHANGE = 2  # renameat2 flag: swap two paths atomically (Linux >= 3.15)


def _swap_in(staging: str, final: str) -> None:
    """Put the staged repository at `final`; the old one ends up at `staging` (the caller removes it).

    With an existing repository the two folders are exchanged in one atomic renameat2 call where the kernel
    offers it, so `final` always holds one complete release; elsewhere two renames leave a short window in
    which `final` is missing (never half-written).
    """
    if not os.path.exists(final):
        os.rename(staging, final)
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        at_fdcwd = -100
        if libc.renameat2(at_fdcwd, staging.encode(), at_fdcwd, final.encode(), _RENAME_EXCHANGE) == 0:
            return
    except (AttributeError, OSError):
        pass
    previous = f"{staging}.previous"
    os.rename(final, previous)
    os.rename(staging, final)
    os.rename(previous, staging)


def _raw_input_schema(columns: RequestColumns):
    import merlin.dtypes as md
    from merlin.schema import ColumnSchema, Schema

    return Schema([ColumnSchema(c, dtype=md.int64, is_list=True, is_ragged=True) for c in columns.lists]
                  + [ColumnSchema(c, dtype=md.int64) for c in columns.scalars])


def read_manifest(repo_dir: str) -> dict:
    path = os.path.join(repo_dir, MANIFEST)
    if not os.path.exists(path):
        raise ValueError(f"{repo_dir} is not a merlin-longseq model repository (no {MANIFEST}); "
                         "write one with merlin_longseq.serving.export")
    with open(path, encoding="utf-8") as f:
        return json.load(f)
