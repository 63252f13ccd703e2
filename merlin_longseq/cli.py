"""Command line: `merlin-longseq demo` (also `python -m merlin_longseq.cli demo`)."""
from __future__ import annotations

import argparse
import datetime
import os
import sys


def _demo(args) -> int:
    from merlin_longseq.jobs import next_item

    run_dir = args.out or os.path.join("runs", datetime.datetime.now().strftime("demo-%Y%m%d-%H%M%S"))
    cfg = next_item.NextItemJobConfig()
    if args.quick:
        cfg.data.num_users, cfg.data.min_history, cfg.data.max_history = 80, 60, 120
        cfg.max_seq_len, cfg.epochs = 120, 1
    if args.arch:
        cfg.archs = tuple(args.arch)
    print(f"merlin-longseq demo -> {run_dir}")
    next_item.run(run_dir, cfg)
    print(f"report: {os.path.join(run_dir, 'report.md')}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="merlin-longseq", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the main job end to end on built-in synthetic data")
    demo.add_argument("--out", help="run folder (default runs/demo-<time>)")
    demo.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    demo.add_argument("--arch", action="append", choices=["hstu", "hstu-50", "xlnet"],
                      help="sequence block(s) to train (repeatable; default all)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
