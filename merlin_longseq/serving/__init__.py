"""Serving through the Merlin / Triton Inference Server ensemble path (docs/SERVING.md).

Torch-only parts import here directly; export (merlin-systems), the server and the client import their
dependencies when used.
"""
from merlin_longseq.serving.scoring import (  # noqa: F401
    RequestBatch,
    RequestError,
    RequestRules,
    UserStateCache,
    make_scorer,
)


def export(*args, **kwargs):
    """See merlin_longseq.serving.export.export."""
    from merlin_longseq.serving.export import export as _export

    return _export(*args, **kwargs)
