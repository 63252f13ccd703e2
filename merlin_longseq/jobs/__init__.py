"""Applications: the jobs behind `merlin-longseq` (demo parts, MovieLens tables). Thin: they call the library."""
from __future__ import annotations

import contextlib
import warnings


@contextlib.contextmanager
def job_scope(threads: int | None = None):
    """For the job's duration only: third-party warnings silenced (merlin / T4R / HF noise) and, when given,
    torch's intra-op threads set; both restored afterwards, so nothing leaks into the caller's process."""
    import torch

    previous = torch.get_num_threads()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if threads:
                torch.set_num_threads(threads)
            yield
    finally:
        torch.set_num_threads(previous)
