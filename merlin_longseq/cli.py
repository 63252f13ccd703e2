"""Command line: `merlin-longseq demo` (also `python -m merlin_longseq.cli demo`)."""
from __future__ import annotations

import argparse
import datetime
import os
import sys

NEXT_ITEM_ARCHS = ("hstu", "hstu-50", "xlnet")
RANKING_ARCHS = ("stca", "mean-pool", "longer")


def _demo(args) -> int:
    run_dir = args.out or os.path.join("runs", datetime.datetime.now().strftime("demo-%Y%m%d-%H%M%S"))
    chosen = tuple(args.arch or NEXT_ITEM_ARCHS + RANKING_ARCHS)
    next_item_archs = tuple(a for a in chosen if a in NEXT_ITEM_ARCHS)
    ranking_archs = tuple(a for a in chosen if a in RANKING_ARCHS)
    print(f"merlin-longseq demo -> {run_dir}")
    if next_item_archs:
        from merlin_longseq.jobs import next_item

        cfg = next_item.NextItemJobConfig.quick() if args.quick else next_item.NextItemJobConfig()
        cfg.archs = next_item_archs
        print("== part 1: next-item prediction (HSTU / ULTRA-HSTU in a Transformers4Rec model) ==")
        next_item.run(os.path.join(run_dir, "next_item"), cfg)
    if ranking_archs:
        from merlin_longseq.jobs import ranking

        cfg = ranking.RankingJobConfig.quick() if args.quick else ranking.RankingJobConfig()
        cfg.archs = ranking_archs
        print("== part 2: ranking over request-grouped impressions (RLB, length extrapolation) ==")
        models = {}
        ranking.run(os.path.join(run_dir, "ranking"), cfg, models_out=models)
        if not args.no_serve:
            from merlin_longseq.jobs import serve_demo

            print("== part 3: export, serve (real Triton server on 127.0.0.1) and query the ranking models ==")
            serve_demo.run(os.path.join(run_dir, "serving"), cfg, models,
                           os.path.join(run_dir, "ranking", "etl", "workflow"))
    print(f"reports under {run_dir}/")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="merlin-longseq", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the main job end to end on built-in synthetic data")
    demo.add_argument("--out", help="run folder (default runs/demo-<time>)")
    demo.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    demo.add_argument("--arch", action="append", choices=NEXT_ITEM_ARCHS + RANKING_ARCHS,
                      help="architecture(s) to train (repeatable; default all). "
                           "hstu/hstu-50/xlnet run the next-item part, stca/mean-pool/longer the ranking part")
    demo.add_argument("--no-serve", action="store_true",
                      help="skip part 3 (export the ranking models, serve them with Triton, query, time)")
    from merlin_longseq.serving.cli import add_serving_commands  # serve / query (light import)

    serving_commands = add_serving_commands(sub)
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    if args.command in serving_commands:
        return serving_commands[args.command](args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
