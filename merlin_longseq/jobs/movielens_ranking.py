"""The ML-100K ranking job under its first name (the commands and docs/RESULTS.md name it): the job itself is
merlin_longseq.jobs.request_ranking, whose default dataset is ml-100k; MovieLensRankingConfig() is its
RequestRankingConfig() with the same ML-100K defaults.

Run: python examples/movielens.py ranking [--quick] [--out DIR]   (or python -m merlin_longseq.jobs.movielens_ranking)
"""
from __future__ import annotations

from merlin_longseq.jobs.request_ranking import *  # noqa: F401,F403  (the job's public names)
from merlin_longseq.jobs.request_ranking import RequestRankingConfig as MovieLensRankingConfig  # noqa: F401
from merlin_longseq.jobs.request_ranking import main as _main


def main(argv=None) -> int:
    return _main(argv, dataset="ml-100k")


if __name__ == "__main__":
    raise SystemExit(main())
