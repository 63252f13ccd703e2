"""Explicit backend choice for every op: auto / triton / pytorch.

auto    -> the Triton kernel when every tensor is on CUDA and Triton imports, the PyTorch reference otherwise.
triton  -> the Triton kernel; an error when it cannot run (no Triton, or CPU tensors outside the interpreter).
pytorch -> the PyTorch reference, always available (it needs torch alone).
"""
from __future__ import annotations

import enum
import functools
import importlib.util
import os

import torch


class Backend(str, enum.Enum):
    AUTO = "auto"
    TRITON = "triton"
    PYTORCH = "pytorch"

    @classmethod
    def parse(cls, value: "Backend | str") -> "Backend":
        if isinstance(value, Backend):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            choices = ", ".join(b.value for b in cls)
            raise ValueError(f"unknown backend {value!r}; choose one of: {choices}") from None


class BackendUnavailableError(RuntimeError):
    """Raised when the Triton backend is asked for where it cannot run."""


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # a broken Triton install is "not available", reported by resolve_backend
        return False
    return True


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: "Backend | str", *tensors: torch.Tensor | None) -> Backend:
    """Turn a requested backend into the concrete one (TRITON or PYTORCH) for these tensors."""
    choice = Backend.parse(backend)
    present = [t for t in tensors if t is not None]
    on_cuda = bool(present) and all(t.is_cuda for t in present)
    if choice is Backend.PYTORCH:
        return Backend.PYTORCH
    if choice is Backend.AUTO:
        return Backend.TRITON if on_cuda and triton_available() else Backend.PYTORCH
    if not triton_available():
        raise BackendUnavailableError(
            "backend='triton' was requested but Triton is not importable; install the 'triton' extra "
            "or use backend='pytorch'"
        )
    if not on_cuda and not triton_interpreter_enabled():
        raise BackendUnavailableError(
            "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter); "
            "got tensors on " + ", ".join(sorted({str(t.device) for t in present}) or ["no device"])
        )
    return Backend.TRITON
