import importlib.util
import os

import pytest
import torch

# Without CUDA, every Triton kernel runs under the interpreter. The variable is read when a kernel is
# decorated, so it must be set before any test module imports merlin_longseq.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


HAS_MERLIN = _has("transformers4rec") and _has("nvtabular")
HAS_TRITON = _has("triton")
HAS_CUDA = torch.cuda.is_available()


# Tests use small tensors: on a 2-core CI machine extra intra-op threads only add contention
# (measured here: a tiny forward+backward went from 2.5 s with 2 threads to 0.05 s with 1). Set per test, so a
# test that changes the thread count (a job, a training entry point) cannot leak it into the next one.
@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def pytest_collection_modifyitems(config, items):
    skip_merlin = pytest.mark.skip(reason="needs the merlin extra (transformers4rec, nvtabular)")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "merlin" in item.keywords and not HAS_MERLIN:
            item.add_marker(skip_merlin)
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
