"""The model step alone as a Triton model (python backend), with Triton's dynamic batcher: no Merlin import.

Where the Merlin stack cannot be installed (the GPU machine's Python 3.12 image has no merlin-systems or
NVTabular), `export_model_only` writes a repository that serves a ranking model by itself:

    repo/<name>/config.pbtxt            python backend, max_batch_size, dynamic_batching, ragged inputs
    repo/<name>/1/model.py              imports TritonPythonModel below (the stub runs Python isolated, so the
                                        package's folder is put on sys.path there)
    repo/<name>/1/artifacts/            merlin_longseq_model.json / .pt (serving/artifacts.py)
    repo/<name>/1/model_only.json       limits, columns, tasks, checksums, device, cache size

Requests carry MODEL ids (there is no NVTabular workflow in front to encode raw ids; export() does that) in the
ensemble's wire format, so ScoringClient(model_name=<name>) talks to both: a list column X as X__values and
X__offsets (int32 [0, n]), scalars (request_time, user_id) as one value; with max_batch_size > 0 every input
has a leading batch dimension of 1. Outputs: `score_<task>__values` (float32 [1, C]) per task.

Dynamic batching: Triton hands `execute` every request its batcher gathered (up to max_batch_size, waiting at
most max_queue_delay_us). Each request is checked on its own (shape caps first, then the one request
validator), so a bad request gets its own 400 (INVALID_ARG) and the others are still scored; the good ones
are scored together as ONE RequestBatch (request-level batching across clients), then split per request.
"""
from __future__ import annotations

import json
import os
import traceback

import numpy as np
import torch

from merlin_longseq import registry
from merlin_longseq.request import RequestBatch, RequestColumns, RequestError, validate_request
from merlin_longseq.serving.admission import DEFAULT_MAX_CANDIDATES, InputCaps, RequestTooLarge
from merlin_longseq.serving.artifacts import load_model, model_files, resolve_device, write_files
from merlin_longseq.serving.scoring import UserStateCache, make_scorer, serving_limits

SETTINGS = "model_only.json"
ARTIFACTS = "artifacts"
MODEL_PY = '''# written by merlin_longseq.serving.model_only.export_model_only
import sys

sys.path[:0] = [p for p in {paths!r} if p not in sys.path]  # the python-backend stub ignores PYTHONPATH
from merlin_longseq.serving.model_only import TritonPythonModel  # noqa: E402,F401
'''
def _columns(with_users: bool) -> RequestColumns:
    """The request columns served: the contract's names, user_id only when the model reads user ids."""
    return RequestColumns() if with_users else RequestColumns().without("user_id")


def _task_outputs(model) -> list[str]:
    tasks = tuple(getattr(model.cfg, "tasks", ()) or ())
    return [f"score_{t}" for t in tasks] if tasks else ["score"]


def export_model_only(repo_dir: str, model: torch.nn.Module, *, name: str = "longseq", max_history: int,
                      max_candidates: int = DEFAULT_MAX_CANDIDATES, device: str = "auto", max_batch_size: int = 16,
                      max_queue_delay_us: int = 500, instances: int = 1, cache_entries: int = 0,
                      instance_kind: str = "cpu") -> dict:
    """Write a one-model Triton repository serving a ranking `model` (see the module docstring); its settings.

    max_batch_size: requests the dynamic batcher may hand over at once (0 turns batching off).
    instance_kind: Triton's instance group kind, "cpu" or "gpu" ("auto": gpu when the model runs on cuda). The
                   python backend runs the model where `device` says either way; the kind sets what Triton
                   does around it (one instance per GPU, where input buffers live). Default "cpu": on the H100
                   machine a KIND_GPU instance received a request's int32 offsets as zeros (docs/PERFORMANCE.md).
    """
    if instance_kind not in ("auto", "cpu", "gpu"):
        raise ValueError(f"instance_kind must be auto, cpu or gpu, got {instance_kind!r}")
    spec = registry.of_model(model)
    if spec.kind != registry.RANKING:
        raise ValueError(f"export_model_only serves ranking models; {spec.name} is {spec.kind} (use export())")
    if model.cfg.num_tasks < 1:
        raise ValueError("a served model needs at least one task head")
    if max_batch_size < 0 or instances < 1 or max_queue_delay_us < 0:
        raise ValueError("need max_batch_size >= 0, instances >= 1 and max_queue_delay_us >= 0")
    limits = serving_limits(model, max_history, max_candidates=max_candidates)
    columns = _columns(limits.needs_user_ids)
    folder = os.path.join(repo_dir, name)
    version = os.path.join(folder, "1")
    checksums = write_files(os.path.join(version, ARTIFACTS), model_files(model))
    settings = {"arch": spec.name, "outputs": _task_outputs(model), "columns": columns.all,
                "lists": columns.lists, "scalars": columns.scalars, "max_history": limits.max_history,
                "max_candidates": limits.max_candidates, "device": device, "cache_entries": int(cache_entries),
                "max_batch_size": int(max_batch_size), "checksums": checksums}
    with open(os.path.join(version, SETTINGS), "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=1)
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(version, "model.py"), "w", encoding="utf-8") as f:
        f.write(MODEL_PY.format(paths=[package_root]))
    with open(os.path.join(folder, "config.pbtxt"), "w", encoding="utf-8") as f:
        f.write(_config(name, settings, max_queue_delay_us, instances, device, instance_kind))
    return settings


def _config(name, settings, delay_us, instances, device, instance_kind) -> str:
    batched = settings["max_batch_size"] > 0
    ragged = "\n    allow_ragged_batch: true" if batched else ""

    def tensor(tensor_name, dtype, extra=""):
        return f'  {{\n    name: "{tensor_name}"\n    data_type: {dtype}\n    dims: [ -1 ]{extra}\n  }}'

    inputs = []
    for column in settings["lists"]:
        inputs += [tensor(f"{column}__values", "TYPE_INT64", ragged), tensor(f"{column}__offsets", "TYPE_INT32", ragged)]
    inputs += [tensor(column, "TYPE_INT64", ragged) for column in settings["scalars"]]
    outputs = [tensor(f"{out}__values", "TYPE_FP32") for out in settings["outputs"]]
    gpu = instance_kind == "gpu" or (instance_kind == "auto" and resolve_device(device) == "cuda")
    kind = "KIND_GPU" if gpu else "KIND_CPU"
    text = (f'name: "{name}"\nbackend: "python"\nmax_batch_size: {settings["max_batch_size"]}\n'
            f'input [\n{",".join(inputs)}\n]\noutput [\n{",".join(outputs)}\n]\n'
            f'instance_group [ {{ count: {instances}\n kind: {kind} }} ]\n')
    if batched:
        text += f"dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}\n"
    return text


def request_arrays(get, settings) -> dict:
    """{name: flat numpy array} of one Triton request (get(name) -> array or None)."""
    names = [c + part for c in settings["lists"] for part in ("__values", "__offsets")] + list(settings["scalars"])
    arrays = {}
    for name in names:
        value = get(name)
        if value is not None:
            arrays[name] = np.asarray(value).reshape(-1)
    return arrays


def batch_from_arrays(arrays: dict, columns: RequestColumns) -> RequestBatch:
    """The RequestBatch of one Triton request's flat arrays (model ids; offsets checked by the validator)."""
    def column(name):
        values = arrays.get(f"{name}__values", arrays.get(name))
        if values is None:
            raise RequestError(f"the request lacks the input {name}")
        return values, arrays.get(f"{name}__offsets")

    return RequestBatch.from_columns(column, columns)


class ModelOnlyScorer:
    """What one model instance does with the requests Triton hands it, without Triton: testable in-process."""

    def __init__(self, version_dir: str):
        with open(os.path.join(version_dir, SETTINGS), encoding="utf-8") as f:
            self.settings = settings = json.load(f)
        model = load_model(os.path.join(version_dir, ARTIFACTS), settings["checksums"])
        limits = serving_limits(model, settings["max_history"], max_candidates=settings["max_candidates"])
        cache = UserStateCache(settings["cache_entries"]) if settings["cache_entries"] > 0 else None
        self.scorer = make_scorer(model, limits, device=resolve_device(settings["device"]), cache=cache)
        self.limits = limits
        lists = settings["lists"]
        self.columns = _columns("user_id" in settings["columns"])
        self.caps = InputCaps(history=tuple(c for c in lists if c != "cand_item_id"), candidates="cand_item_id",
                              scalars=tuple(settings["scalars"]), max_history=settings["max_history"],
                              max_candidates=settings["max_candidates"])

    def score_requests(self, requests: list[dict]) -> list:
        """One entry per request: {output: float32 [1, C]} or the RequestError / RequestTooLarge refusing it."""
        results, good = [None] * len(requests), []
        for i, arrays in enumerate(requests):
            try:
                self.caps.check(arrays)
                batch = batch_from_arrays(arrays, self.columns)
                if batch.num_requests != 1:
                    raise RequestError(f"one request per Triton request here, got {batch.num_requests} (offsets)")
                validate_request(batch, self.limits)
                good.append((i, batch))
            except (RequestError, RequestTooLarge) as err:
                results[i] = err
        if good:
            # each request was validated above, and the merged batch holds exactly those requests
            logits = self.scorer.score(RequestBatch.concat([b for _, b in good]), validate=False).numpy()
            logits = logits.astype(np.float32)
            if not np.isfinite(logits).all():
                raise RuntimeError(f"the {self.settings['arch']} model produced non-finite scores")
            start = 0
            for i, batch in good:
                count = int(batch.cand_offsets[-1])
                results[i] = {f"{out}__values": np.ascontiguousarray(logits[start:start + count, t][None, :])
                              for t, out in enumerate(self.settings["outputs"])}
                start += count
        return results


class TritonPythonModel:
    """The python-backend model (pb_utils is importable only inside Triton's stub)."""

    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        self.core = ModelOnlyScorer(version_dir)

    def execute(self, requests):
        pb = self.pb
        arrays = []
        for request in requests:
            def get(name, request=request):
                tensor = pb.get_input_tensor_by_name(request, name)
                return None if tensor is None else tensor.as_numpy()

            arrays.append(request_arrays(get, self.core.settings))
        if os.environ.get("MERLIN_LONGSEQ_LOG_INPUTS"):  # diagnostics: what the stub hands over, per request
            for a in arrays:
                print({k: (v.dtype.str, v.shape, v[:3].tolist(), v[-2:].tolist()) for k, v in a.items()}, flush=True)
        try:
            results = self.core.score_requests(arrays)
        except Exception as err:  # noqa: BLE001  (a server fault: every request of the batch gets it)
            traceback.print_exc()
            return [pb.InferenceResponse(error=pb.TritonError(f"internal error ({type(err).__name__})"))
                    for _ in requests]
        responses = []
        for result in results:
            if isinstance(result, Exception):
                code = getattr(pb.TritonError, "INVALID_ARG", None)
                error = pb.TritonError(str(result), code) if code is not None else pb.TritonError(str(result))
                responses.append(pb.InferenceResponse(error=error))
            else:
                responses.append(pb.InferenceResponse(
                    output_tensors=[pb.Tensor(name, value) for name, value in result.items()]))
        return responses


__all__ = ["ModelOnlyScorer", "TritonPythonModel", "batch_from_arrays", "export_model_only"]
