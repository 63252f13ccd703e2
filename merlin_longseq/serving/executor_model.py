"""The executor model of an exported repository (Triton python backend): runs the merlin-systems ensemble.

`export` writes this file as `<name>/1/model.py` in place of merlin-systems' own, which answers every failure
with a Python traceback (server paths included) and Triton's INTERNAL status. Here a request that breaks the
request contract (RequestError from the one validator) comes back as INVALID_ARG (HTTP 400 / gRPC
INVALID_ARGUMENT) with the validator's message, anything else as INTERNAL with the exception's type only; the
full traceback goes to the server log.

Before anything is converted, a request's input SHAPES are checked against the exported caps (max_history,
max_candidates, a byte cap: serving/admission.py), so an oversized request is refused in microseconds instead
of after decoding it, and requests that start after the server wrapper began a shutdown are refused as
UNAVAILABLE (the drain; a busy flag tells the wrapper when the requests accepted before it have finished).
"""
import os
import pathlib
import traceback

import triton_python_backend_utils as pb_utils
from merlin.dag import postorder_iter_nodes
from merlin.systems.dag import Ensemble
from merlin.systems.dag.runtimes.triton import TritonExecutorRuntime
from merlin.systems.triton.conversions import tensor_table_to_triton_response, triton_request_to_tensor_table

from merlin_longseq.request import RequestError
from merlin_longseq.serving.admission import MAX_BYTES_ENV, Drain, InputCaps, RequestTooLarge
from merlin_longseq.serving.operator import PredictLongSeq


class TritonPythonModel:
    def initialize(self, args):
        repository = pathlib.Path(args["model_repository"])
        if repository.suffix == ".py":  # Triton 22.06 passed the path of model.py
            repository = repository.parent.parent
        ensemble_path = repository.parent / args["model_name"] / str(args["model_version"]) / "ensemble"
        self.ensemble = Ensemble.load(str(ensemble_path))
        ops = [node.op for node in postorder_iter_nodes(self.ensemble.graph.output_node, flatten_subgraphs=True)]
        for op in ops:
            op.load_artifacts(str(ensemble_path))
        predict = next((op for op in ops if isinstance(op, PredictLongSeq)), None)
        override = int(os.environ.get(MAX_BYTES_ENV) or 0) or None  # `serve --max-request-bytes`
        self.caps = None if predict is None else InputCaps.from_manifest(predict.describe(), max_bytes=override)
        self.drain = Drain()

    def execute(self, requests):
        if not self.drain.enter():
            error = pb_utils.TritonError("the server is shutting down; send the request to another server",
                                         pb_utils.TritonError.UNAVAILABLE)
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        try:
            return [self._answer(request) for request in requests]
        finally:
            self.drain.leave()

    def _answer(self, request):
        try:
            if self.caps is not None:
                # as_numpy of a CPU input is a view of the shared memory it arrived in: no copy, no decoding
                self.caps.check({t.name(): t.as_numpy() for t in request.inputs() if t.is_cpu()})
            inputs = triton_request_to_tensor_table(request, self.ensemble.input_schema)
            outputs = self.ensemble.transform(inputs, runtime=TritonExecutorRuntime())
            return tensor_table_to_triton_response(outputs, self.ensemble.output_schema)
        except (RequestError, RequestTooLarge) as err:
            error = pb_utils.TritonError(f"bad request: {err}", pb_utils.TritonError.INVALID_ARG)
        except Exception as err:  # noqa: BLE001  (a server fault: logged whole, answered without internals)
            pb_utils.Logger.log_error(traceback.format_exc())
            error = pb_utils.TritonError(f"internal error ({type(err).__name__}); see the server log")
        return pb_utils.InferenceResponse(output_tensors=[], error=error)
