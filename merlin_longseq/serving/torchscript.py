"""The standard merlin-systems TorchScript route: `PredictPyTorch` on Triton's libtorch backend.

For users whose Triton has the libtorch ("pytorch") backend; the python-backend route of export.py stays
the default (and the only one the pytriton wheel can serve: it carries no libtorch backend).

    traced = trace_stca(model)                              # TorchScript, PyTorch reference ops only
    export_torchscript("repo", traced, task_names=model.cfg.tasks, name="stca_ts")

The traced module has one fixed, tensor-only signature: the Triton inputs that merlin-systems derives from
the request schema, in its order (a ragged list column `c` becomes `c__values` + `c__offsets`, int32
offsets [R + 1]), and returns per task `score_<task>__values` (logits [C], float32) and
`score_<task>__offsets` (the candidate offsets, int32). Its forward arguments carry the Triton input names,
so the libtorch backend can bind them by name.

What the traced graph does not keep: the model's input checks run in Python at trace time only (a bad
request is not refused with a message as PredictLongSeq does; check requests before sending them), and
no user-side cache. Eval mode is frozen in (no length sampling, no dropout).

LONGER does not trace: its reference path pads to the batch's longest history and merged-group counts as
Python ints (jagged_to_padded, group_history), so a trace would freeze those sizes. It is served by
export.py's python-backend route.
"""
from __future__ import annotations

import copy
import os
from typing import Sequence

import torch
from torch import nn

from merlin_longseq import registry
from merlin_longseq.models.stca import STCAModel

TORCHSCRIPT_FILE = "model.pt"  # the file merlin-systems writes into <node>/1/
LIST_COLUMNS = ("hist_item_id", "hist_action", "hist_timestamp", "cand_item_id")
SCALAR_COLUMNS = ("request_time", "user_id")


class STCATorchScriptWrapper(nn.Module):
    """STCAModel behind the merlin-systems Triton input names; argument order = the config's input order."""

    def __init__(self, model: STCAModel):
        super().__init__()
        self.model = model
        self.uses_users = bool(model.cfg.num_users)

    def forward(self, hist_item_id__values, hist_item_id__offsets, hist_action__values, hist_action__offsets,
                hist_timestamp__values, hist_timestamp__offsets, cand_item_id__values, cand_item_id__offsets,
                request_time, user_id):
        # Triton sends int32 offsets and may send [R, 1] scalars; the model wants int64 [R + 1] and [R]
        # (hist_action/hist_timestamp offsets repeat hist_item_id's: the request contract says one per event)
        hist_offsets = hist_item_id__offsets.reshape(-1).to(torch.int64)
        cand_offsets = cand_item_id__offsets.reshape(-1).to(torch.int64)
        logits = self.model(hist_item_id__values.reshape(-1).to(torch.int64),
                            hist_action__values.reshape(-1).to(torch.int64),
                            hist_timestamp__values.reshape(-1).to(torch.int64), hist_offsets,
                            request_time.reshape(-1).to(torch.int64),
                            cand_item_id__values.reshape(-1).to(torch.int64), cand_offsets,
                            user_id.reshape(-1).to(torch.int64) if self.uses_users else None)
        offsets = cand_offsets.to(torch.int32)
        out = []
        for task in range(logits.shape[1]):
            out += [logits[:, task].contiguous(), offsets]
        return tuple(out)


def example_request(model: STCAModel) -> tuple[torch.Tensor, ...]:
    """A small valid request batch in the wrapper's argument order (two requests, 3 and 2 events)."""
    cfg = model.cfg
    hist_offsets = torch.tensor([0, 3, 5], dtype=torch.int32)
    hist_items = torch.arange(5, dtype=torch.int64) % cfg.num_items + 1
    actions = torch.arange(5, dtype=torch.int64) % (cfg.num_actions + 1)
    timestamps = torch.tensor([100, 200, 300, 50, 400], dtype=torch.int64)
    cand_offsets = torch.tensor([0, 2, 5], dtype=torch.int32)
    cands = torch.arange(5, dtype=torch.int64) % cfg.num_items + 1
    request_time = torch.tensor([1_000, 2_000], dtype=torch.int64)
    users = torch.ones(2, dtype=torch.int64) if cfg.num_users else torch.zeros(2, dtype=torch.int64)
    return (hist_items, hist_offsets, actions, hist_offsets, timestamps, hist_offsets, cands, cand_offsets,
            request_time, users)


def trace_stca(model: STCAModel, example: Sequence[torch.Tensor] | None = None) -> torch.jit.ScriptModule:
    """torch.jit.trace of a CPU eval copy of `model` with backend "pytorch" (no Triton op in the graph).

    example: the wrapper's arguments (see STCATorchScriptWrapper.forward); a small built-in request when
    None. The trace does not depend on the example's lengths or request count (tests/test_torchscript.py).
    """
    spec = registry.of_model(model)
    if not spec.traceable:
        raise ValueError(f"{type(model).__name__} does not trace: its reference path pads to Python-int lengths that "
                         "a trace would freeze; serve it with merlin_longseq.serving.export (python backend)")
    if not isinstance(model, STCAModel):
        raise ValueError(f"trace_stca needs an STCAModel, got {type(model).__name__}")
    if model.heads is None:
        raise ValueError("this STCAModel is headless (tasks=()): there are no scores to serve")
    model = copy.deepcopy(model).cpu().eval()
    model.cfg.backend = "pytorch"  # the copy's own cfg (deepcopy), shared by all its layers
    model.cfg.length_sampler = None
    wrapper = STCATorchScriptWrapper(model).eval()
    example = tuple(example) if example is not None else example_request(model)
    if len(example) != 10:
        raise ValueError(f"example must hold the wrapper's 10 tensors, got {len(example)}")
    with torch.no_grad():
        # check_trace would re-run on the same example only: the real check is a different request (tests)
        return torch.jit.trace(wrapper, example, check_trace=False)


def torchscript_schemas(task_names: Sequence[str]):
    """(input schema, output schema) of the PredictPyTorch step, matching STCATorchScriptWrapper."""
    import merlin.dtypes as md
    from merlin.schema import ColumnSchema, Schema, Tags

    if not task_names:
        raise ValueError("task_names must name at least one task (the model's cfg.tasks)")
    inputs = Schema(
        [ColumnSchema(c, dtype=md.int64, is_list=True, is_ragged=True,
                      tags=[Tags.ITEM, Tags.ID] if c.endswith("item_id") else []) for c in LIST_COLUMNS]
        + [ColumnSchema(c, dtype=md.int64) for c in SCALAR_COLUMNS])
    outputs = Schema([ColumnSchema(f"score_{t}", dtype=md.float32, is_list=True, is_ragged=True)
                      for t in task_names])
    return inputs, outputs


def export_torchscript(repo_dir: str, traced: torch.jit.ScriptModule, task_names: Sequence[str],
                       name: str = "stca_torchscript") -> str:
    """Write a merlin-systems ensemble `inputs >> PredictPyTorch(traced)` into a Triton model repository.

    repo_dir gets `<name>/` (the executor model, python backend) and `0_predictpytorchtriton/` (platform
    pytorch_libtorch, the TorchScript file in 1/model.pt). Inputs are model ids (no item encoding step).
    Returns the path of the saved TorchScript file.
    """
    from merlin.systems.dag import Ensemble
    from merlin.systems.dag.ops.pytorch import PredictPyTorch

    if not isinstance(traced, torch.jit.ScriptModule):
        raise ValueError(f"traced must be a TorchScript module (trace_stca's result), got {type(traced).__name__}")
    if not name or not all(ch.isalnum() or ch in "_-" for ch in name):
        raise ValueError(f"model name must be letters, digits, _ or -, got {name!r}")
    inputs, outputs = torchscript_schemas(task_names)
    graph = inputs.column_names >> PredictPyTorch(traced, inputs, outputs)
    os.makedirs(repo_dir, exist_ok=True)
    ensemble = Ensemble(graph, inputs)
    ensemble.export(repo_dir, name=name)
    return os.path.join(repo_dir, "0_predictpytorchtriton", "1", TORCHSCRIPT_FILE)
