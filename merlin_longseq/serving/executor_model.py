"""The executor model of an exported repository (Triton python backend): runs the merlin-systems ensemble.

`export` writes this file as `<name>/1/model.py` in place of merlin-systems' own, which answers every failure
with a Python traceback (server paths included) and Triton's INTERNAL status. Here a request that breaks the
request contract (RequestError from the one validator) comes back as INVALID_ARG (HTTP 400 / gRPC
INVALID_ARGUMENT) with the validator's message, anything else as INTERNAL with the exception's type only; the
full traceback goes to the server log.
"""
import pathlib
import traceback

import triton_python_backend_utils as pb_utils
from merlin.dag import postorder_iter_nodes
from merlin.systems.dag import Ensemble
from merlin.systems.dag.runtimes.triton import TritonExecutorRuntime
from merlin.systems.triton.conversions import tensor_table_to_triton_response, triton_request_to_tensor_table

from merlin_longseq.request import RequestError


class TritonPythonModel:
    def initialize(self, args):
        repository = pathlib.Path(args["model_repository"])
        if repository.suffix == ".py":  # Triton 22.06 passed the path of model.py
            repository = repository.parent.parent
        ensemble_path = repository.parent / args["model_name"] / str(args["model_version"]) / "ensemble"
        self.ensemble = Ensemble.load(str(ensemble_path))
        for node in list(postorder_iter_nodes(self.ensemble.graph.output_node, flatten_subgraphs=True)):
            node.op.load_artifacts(str(ensemble_path))

    def execute(self, requests):
        return [self._answer(request) for request in requests]

    def _answer(self, request):
        try:
            inputs = triton_request_to_tensor_table(request, self.ensemble.input_schema)
            outputs = self.ensemble.transform(inputs, runtime=TritonExecutorRuntime())
            return tensor_table_to_triton_response(outputs, self.ensemble.output_schema)
        except RequestError as err:
            error = pb_utils.TritonError(f"bad request: {err}", pb_utils.TritonError.INVALID_ARG)
        except Exception as err:  # noqa: BLE001  (a server fault: logged whole, answered without internals)
            pb_utils.Logger.log_error(traceback.format_exc())
            error = pb_utils.TritonError(f"internal error ({type(err).__name__}); see the server log")
        return pb_utils.InferenceResponse(output_tensors=[], error=error)
