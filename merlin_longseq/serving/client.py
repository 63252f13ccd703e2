"""A small client for a served merlin-longseq repository (tritonclient, HTTP or gRPC).

    client = ScoringClient("127.0.0.1:8000", protocol="http")
    scores = client.score(hist_item_id=[12, 7, 7, 40], hist_action=[1, 2, 1, 1],
                          hist_timestamp=[...], request_time=1700000000, user_id=3,
                          cand_item_id=[5, 12, 99])       # -> {"score_click": array([...3 logits])}

Item ids are RAW ids (the served workflow encodes them). The client learns the input names and types from
the server's model metadata, so it sends exactly what the ensemble declares: a list column X as
X__values [n] (int64) + X__offsets [2] (int32), a scalar column as shape [1]. A server-side error comes
back as ScoringError with the server's message.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

ENTRY_MODEL = "executor_model"  # export()'s default entry model name

_NUMPY_OF = {"INT64": np.int64, "INT32": np.int32, "FP32": np.float32, "FP64": np.float64, "INT16": np.int16,
             "INT8": np.int8, "UINT64": np.uint64, "UINT32": np.uint32, "BOOL": np.bool_}


class ScoringError(RuntimeError):
    """The server refused or failed the request; the message is the server's, `status` its status (HTTP code
    such as "400", or a gRPC status such as "StatusCode.INVALID_ARGUMENT")."""

    def __init__(self, message: str, status: str | None = None):
        super().__init__(message)
        self.status = status


class ScoringClient:
    def __init__(self, url: str, protocol: str = "http", model_name: str = ENTRY_MODEL, timeout_s: float = 60):
        if protocol not in ("http", "grpc"):
            raise ValueError(f"protocol must be http or grpc, got {protocol!r}")
        self.protocol, self.model_name, self.timeout_s = protocol, model_name, timeout_s
        if protocol == "http":
            import tritonclient.http as tc
            self._client = tc.InferenceServerClient(url, network_timeout=timeout_s, connection_timeout=timeout_s)
        else:
            import tritonclient.grpc as tc
            self._client = tc.InferenceServerClient(url)
        self._tc = tc
        metadata = self._client.get_model_metadata(model_name)
        if protocol == "grpc":
            inputs = [(t.name, t.datatype, len(t.shape)) for t in metadata.inputs]
            outputs = [t.name for t in metadata.outputs]
        else:
            inputs = [(t["name"], t["datatype"], len(t["shape"])) for t in metadata["inputs"]]
            outputs = [t["name"] for t in metadata["outputs"]]
        self.input_types = {name: dtype for name, dtype, _ in inputs}
        # a model with Triton's dynamic batcher (max_batch_size > 0) declares a leading batch dimension: one
        # request is then a batch of 1 (serving/model_only.py); the ensemble declares none
        self.batched = any(rank == 2 for _, _, rank in inputs)
        self.list_columns = sorted({n[: -len("__values")] for n in self.input_types if n.endswith("__values")})
        self.scalar_columns = sorted(n for n in self.input_types if "__" not in n)
        self.output_columns = sorted({n.rsplit("__", 1)[0] for n in outputs})

    def close(self) -> None:
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def is_ready(self) -> bool:
        return bool(self._client.is_model_ready(self.model_name))

    def build_inputs(self, features: Mapping[str, object], strict_types: bool = True) -> list:
        """Triton input tensors for ONE request: list columns as values + offsets, scalars as [1].

        strict_types=False sends arrays in whatever dtype they hold (to see how the server answers).
        """
        inputs = []
        for name, value in features.items():
            array = np.asarray(value)
            if name in self.list_columns:
                tensors = {f"{name}__values": array.reshape(-1),
                           f"{name}__offsets": np.array([0, array.size], dtype=np.int32)}
            else:
                tensors = {name: array.reshape(-1)}
            for tensor_name, data in tensors.items():
                declared = self.input_types.get(tensor_name)
                if strict_types and declared in _NUMPY_OF and not tensor_name.endswith("__offsets"):
                    data = data.astype(_NUMPY_OF[declared])  # offsets are int32 already
                if self.batched:
                    data = data.reshape(1, -1)
                tensor = self._tc.InferInput(tensor_name, list(data.shape), _triton_type(data.dtype))
                tensor.set_data_from_numpy(np.ascontiguousarray(data))
                inputs.append(tensor)
        return inputs

    def score(self, strict_types: bool = True, **features) -> dict[str, np.ndarray]:
        """Scores (raw logits) of the request's candidates, one array per task output."""
        missing = [c for c in self.list_columns + self.scalar_columns if c not in features]
        if missing and strict_types:
            raise ValueError(f"missing request feature(s) {missing}; the model takes "
                             f"{self.list_columns + self.scalar_columns}")
        return self.infer(self.build_inputs(features, strict_types))

    def infer(self, inputs: Sequence) -> dict[str, np.ndarray]:
        outputs = [self._tc.InferRequestedOutput(f"{c}__values") for c in self.output_columns]
        try:
            result = self._client.infer(self.model_name, list(inputs), outputs=outputs)
        except self._exception_type() as err:
            raise ScoringError(str(err), status=err.status()) from None
        return {c: result.as_numpy(f"{c}__values").reshape(-1) for c in self.output_columns}

    def _exception_type(self):
        from tritonclient.utils import InferenceServerException
        return InferenceServerException


def _triton_type(dtype) -> str:
    from tritonclient.utils import np_to_triton_dtype
    return np_to_triton_dtype(np.dtype(dtype))
