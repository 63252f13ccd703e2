"""Serving through the Merlin / Triton Inference Server ensemble path (docs/SERVING.md).

Torch-only parts import here directly; export (merlin-systems), the server and the client import their
dependencies when used.
"""
from merlin_longseq.request import RequestBatch, RequestError, RequestLimits  # noqa: F401
from merlin_longseq.serving.scoring import UserStateCache, make_scorer, serving_limits  # noqa: F401


def export(*args, **kwargs):
    """See merlin_longseq.serving.repository.export (a function here: the module is `repository`)."""
    from merlin_longseq.serving.repository import export as _export

    return _export(*args, **kwargs)
