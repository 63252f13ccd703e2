"""Reproduce the Taobao ranking table of docs/RESULTS.md: ULTRA-HSTU, STCA, LONGER, DIN, mean pooling and the
references on day requests of Taobao UserBehavior, 5 seeds, against the eval history length.

    python examples/taobao.py                     # the table (runs/taobao-ranking)
    python examples/taobao.py --quick             # 150 users, 1 epoch, 1 seed, small models: a smoke run
    python examples/taobao.py --item-key item     # tokens = item ids instead of the preset's choice
    python examples/taobao.py --tune              # score a validation split carved from train (eval never read)

The request task (a request = one user's Beijing-time day, candidates = the items viewed that day, positive =
carted, favourited or bought that day, history = every earlier event) is stated in workflows/taobao.py. The
data is read from ../shared/data/taobao-userbehavior-head/ beside the repository, from $MERLIN_LONGSEQ_TAOBAO or
from --data (any UserBehavior CSV: user,item,category,behavior,timestamp, no header). It is research-only:
the repository never holds a copy.
"""
from __future__ import annotations

import sys


def main(argv=None) -> int:
    from merlin_longseq.jobs import request_ranking

    return request_ranking.main(argv, dataset="taobao")


if __name__ == "__main__":
    sys.exit(main())
