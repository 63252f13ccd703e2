"""The Triton kernel modules behind the op dispatchers, looked up once per process."""
from __future__ import annotations

import importlib.util

from merlin_longseq.backend import Backend, BackendUnavailableError


# op -> its kernel module (None: not installed). A plain dict, not lru_cache: torch.compile traces the dispatchers,
# and reads a dict without a warning.
_MODULES: dict = {}


def _find(op: str):
    # Look the module up instead of catching ImportError, so a broken kernel fails loudly (on every call: no
    # exception is kept). The parent is checked first: from a checkout that is not pip-installed,
    # merlin_longseq.kernels does not exist.
    if (importlib.util.find_spec("merlin_longseq.kernels") is None
            or importlib.util.find_spec(f"merlin_longseq.kernels.triton_{op}") is None):
        return None
    # import statements, not importlib.import_module: torch.compile traces these when it compiles a cold call
    if op == "hstu_attention":
        from merlin_longseq.kernels import triton_hstu_attention as module
    elif op == "target_attention":
        from merlin_longseq.kernels import triton_target_attention as module
    elif op == "group_attention":
        from merlin_longseq.kernels import triton_group_attention as module
    elif op == "history_projection":
        from merlin_longseq.kernels import triton_history_projection as module
    else:
        raise ValueError(f"no kernel module is known for op {op!r}")
    return module


def kernel_module(op: str, backend: Backend | str):
    """merlin_longseq.kernels.triton_<op>, or None where it is not installed; an explicit backend='triton'
    raises BackendUnavailableError instead of falling back."""
    if op not in _MODULES:
        _MODULES[op] = _find(op)
    module = _MODULES[op]
    if module is None and Backend.parse(backend) is Backend.TRITON:
        raise BackendUnavailableError(f"no Triton kernel for {op} is installed")
    return module
