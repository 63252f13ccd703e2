"""Reproduce the MovieLens tables of docs/RESULTS.md (one command per table).

    python examples/movielens.py next-item            # HSTU vs SASRec-style (GPT-2) vs XLNet, 3 seeds, ML-100K
    python examples/movielens.py next-item --quick    # 200 users, 1 epoch, 1 seed: a smoke run
    python examples/movielens.py ranking              # STCA, LONGER, mean pooling, DIN on day requests, 3 seeds
    python examples/movielens.py ranking --quick      # 300 users, 1 epoch, 1 seed, small models: a smoke run

The data is read from ../shared/data/ml-100k beside the repository, or from $MERLIN_LONGSEQ_ML100K, or from
--data (any MovieLens folder: u.data, ratings.dat or ratings.csv). --download fetches it from GroupLens when
it is missing (the MovieLens license forbids redistributing it, so the repository never holds a copy).
The same ranking job on Taobao UserBehavior: examples/taobao.py.
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", choices=["next-item", "ranking"], help="which table to reproduce")
    args, rest = parser.parse_known_args(argv)
    if args.table == "next-item":
        from merlin_longseq.jobs import movielens

        return movielens.main(rest)
    if args.table == "ranking":
        from merlin_longseq.jobs import request_ranking

        return request_ranking.main(rest, dataset="ml-100k")
    return 2


if __name__ == "__main__":
    sys.exit(main())
