"""Command line: `merlin-longseq <command>` (also `python -m merlin_longseq.cli <command>`).

    demo        the main job end to end on built-in synthetic data (next-item, ranking, serving)
    ranking     the ranking job alone (flags: every simple field of RankingJobConfig)
    next-item   the next-item job alone (flags: every simple field of NextItemJobConfig)
    movielens   the MovieLens tables (next-item | ranking; the job's own flags follow)
    train       distributed / single-process training (merlin_longseq.train_ddp's flags follow)
    export      a trained Transformers4Rec model (tr.Model.save folder) + its workflow -> Triton repository
    serve       serve a repository with a real Triton server on 127.0.0.1
    query       score one request against a running server
    bench       run a benchmark script of the source checkout (benchmarks/bench_<name>.py)

Applications stay thin: every command parses its flags and calls the library or a job's run().
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import subprocess
import sys
import typing

NEXT_ITEM_ARCHS = ("hstu", "hstu-50", "xlnet")


# ---- flags derived from a job's config dataclass -------------------------------------------------------------
def _field_type(cls, f: dataclasses.Field):
    hints = typing.get_type_hints(cls)
    return hints.get(f.name, f.type)


def add_config_flags(parser: argparse.ArgumentParser, config_cls, skip: tuple[str, ...] = ()) -> list[str]:
    """--<field-name> for every int / float / str / bool / tuple field of a config dataclass (None = keep the
    config's default). Returns the field names that got a flag."""
    names = []
    defaults = config_cls()
    for f in dataclasses.fields(config_cls):
        if f.name in skip:
            continue
        default = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        kind = _field_type(config_cls, f)
        origin = typing.get_origin(kind)
        if isinstance(default, bool):
            parser.add_argument(flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction,
                                help=f"(default {default})")
        elif isinstance(default, (int, float, str)) and not isinstance(default, bool):
            parser.add_argument(flag, dest=f.name, type=type(default), default=None, help=f"(default {default})")
        elif isinstance(default, tuple) and (origin in (tuple, None) or kind is tuple):
            element = type(default[0]) if default else str
            parser.add_argument(flag, dest=f.name, type=element, nargs="+", default=None,
                                help=f"(default {' '.join(map(str, default))})")
        else:
            continue  # nested configs and dicts stay Python-only
        names.append(f.name)
    return names


def config_from_flags(base, args, names: list[str]):
    changes = {name: (tuple(v) if isinstance(v, list) else v) for name in names
               if (v := getattr(args, name, None)) is not None}
    return dataclasses.replace(base, **changes)


def _run_dir(args, prefix: str) -> str:
    """A new run folder: an existing non-empty one is refused (a run never appends to another one's report)."""
    run_dir = args.out or os.path.join("runs", datetime.datetime.now().strftime(f"{prefix}-%Y%m%d-%H%M%S"))
    if os.path.isdir(run_dir) and os.listdir(run_dir):
        raise SystemExit(f"merlin-longseq: {run_dir} exists and is not empty; choose a new --out")
    return run_dir


COMPLETE_MARKER = "COMPLETE.json"


def _mark_complete(run_dir: str, args) -> None:
    """Written last: a run folder without it was interrupted (its reports may be partial)."""
    import json

    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, COMPLETE_MARKER), "w", encoding="utf-8") as f:
        json.dump({"command": args.command, "argv": sys.argv[1:],
                   "finished": datetime.datetime.now().isoformat(timespec="seconds")}, f, indent=2)


# ---- commands ---------------------------------------------------------------------------------------------------
def _demo(args) -> int:
    from merlin_longseq import registry

    run_dir = _run_dir(args, "demo")
    ranking_names = registry.names(registry.RANKING)
    from merlin_longseq.jobs.ranking import DEFAULT_ARCHS

    chosen = tuple(args.arch or NEXT_ITEM_ARCHS + DEFAULT_ARCHS)
    next_item_archs = tuple(a for a in chosen if a in NEXT_ITEM_ARCHS)
    ranking_archs = tuple(a for a in chosen if a in ranking_names)
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
        cfg = dataclasses.replace(cfg, archs=ranking_archs)
        print("== part 2: ranking over request-grouped impressions (RLB, length extrapolation) ==")
        models = {}
        ranking.run(os.path.join(run_dir, "ranking"), cfg, models_out=models)
        if not args.no_serve:
            from merlin_longseq.jobs import serve_demo

            print("== part 3: export, serve (real Triton server on 127.0.0.1) and query the ranking models ==")
            serve_demo.run(os.path.join(run_dir, "serving"), cfg, models,
                           os.path.join(run_dir, "ranking", "etl", "workflow"))
    _mark_complete(run_dir, args)
    print(f"reports under {run_dir}/")
    return 0


def _job(args) -> int:
    """ranking / next-item: the job's preset, edited by the flags, run into a new folder."""
    import importlib

    job = importlib.import_module(f"merlin_longseq.jobs.{args.job_module}")
    config_cls = getattr(job, args.config_class)
    base = config_cls.quick() if args.quick else config_cls()
    cfg = config_from_flags(base, args, args.config_fields)
    run_dir = _run_dir(args, args.command)
    print(f"{args.command} job -> {run_dir}")
    job.run(run_dir, cfg)
    _mark_complete(run_dir, args)
    return 0


def _movielens(args) -> int:
    if args.table == "next-item":
        from merlin_longseq.jobs.movielens import main

        return main(args.rest)
    from merlin_longseq.jobs.request_ranking import main

    return main(args.rest, dataset="ml-100k")


def _train(args) -> int:
    from merlin_longseq.train_ddp import main

    return main(args.rest)


def _export(args) -> int:
    import nvtabular as nvt
    import transformers4rec.torch as tr
    from tqdm.auto import tqdm

    from merlin_longseq.serving.repository import export

    for what, path, marker in (("model", args.model, "t4rec_model_class.pkl"), ("workflow", args.workflow,
                                                                              "workflow.pkl")):
        if not os.path.isfile(os.path.join(path, marker)):
            print(f"merlin-longseq export: {path} is not a saved {what} folder (no {marker}; write it with "
                  f"{'tr.Model.save' if what == 'model' else 'Workflow.save'})", file=sys.stderr)
            return 2
    with tqdm(total=3, desc="export", leave=False) as bar:
        # tr.Model.load unpickles the folder's model file: load only models you trained yourself
        model = tr.Model.load(args.model)
        bar.update()
        workflow = nvt.Workflow.load(args.workflow)
        bar.update()
        manifest = export(args.repo, workflow, model, max_history=args.max_history, name=args.name,
                          task_names=args.labels, top_k=args.top_k, exclude_history=args.exclude_history,
                          device=args.device, cache_entries=args.cache_entries)
        bar.update()
    print(f"exported {manifest['arch']} as {args.name!r} -> {args.repo} (outputs {', '.join(manifest['outputs'])})")
    return 0


def _bench(args) -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "benchmarks", f"bench_{args.name.replace('-', '_')}.py")
    if not os.path.isfile(script):
        available = sorted(f[len("bench_"):-3] for f in os.listdir(os.path.join(root, "benchmarks"))
                           if f.startswith("bench_") and f.endswith(".py")) if os.path.isdir(
            os.path.join(root, "benchmarks")) else []
        print(f"merlin-longseq bench: no benchmark {args.name!r} (the benchmarks live in the source checkout; "
              f"found: {', '.join(available) or 'none'})", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, script, *args.rest])


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    from merlin_longseq import registry

    parser = argparse.ArgumentParser(prog="merlin-longseq", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    handlers = {}

    demo = sub.add_parser("demo", help="run the main job end to end on built-in synthetic data")
    demo.add_argument("--out", help="run folder (default runs/demo-<time>; an existing non-empty one is refused)")
    demo.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    demo.add_argument("--arch", action="append", choices=NEXT_ITEM_ARCHS + registry.names(registry.RANKING),
                      help="architecture(s) to train (repeatable; default hstu, hstu-50, xlnet, stca, mean-pool, "
                           "longer, ultra-hstu; din on request). hstu/hstu-50/xlnet run the next-item part, the others the ranking part")
    demo.add_argument("--no-serve", action="store_true",
                      help="skip part 3 (export the ranking models, serve them with Triton, query, time)")
    handlers["demo"] = _demo

    from merlin_longseq.jobs.next_item import NextItemJobConfig
    from merlin_longseq.jobs.ranking import RankingJobConfig

    for name, module, cls in (("ranking", "ranking", RankingJobConfig), ("next-item", "next_item", NextItemJobConfig)):
        job = sub.add_parser(name, help=f"the {name} job")
        job.add_argument("--out", help="run folder (default runs/<job>-<time>)")
        job.add_argument("--quick", action="store_true", help="start from the tiny preset")
        job.set_defaults(config_fields=add_config_flags(job, cls), job_module=module, config_class=cls.__name__)
        handlers[name] = _job

    movielens = sub.add_parser("movielens", help="MovieLens tables (the job's own flags follow the table name)")
    movielens.add_argument("table", choices=["next-item", "ranking"])
    handlers["movielens"] = _movielens

    sub.add_parser("train", help="(distributed) training; see `merlin-longseq train --help`", add_help=False)
    handlers["train"] = _train

    export = sub.add_parser("export", help="export a trained T4R model and its workflow for Triton")
    export.add_argument("model", help="folder written by tr.Model.save (loading it runs its pickled code)")
    export.add_argument("workflow", help="folder of the fitted NVTabular workflow (Workflow.save)")
    export.add_argument("repo", help="Triton model repository to write into")
    export.add_argument("--max-history", type=int, help="longest history accepted (required for ranking models)")
    export.add_argument("--name", default="executor_model", help="entry model name")
    export.add_argument("--labels", nargs="+", help="task order (default: the model's)")
    export.add_argument("--top-k", type=int, default=0, help="next-item models: also answer the k best items")
    export.add_argument("--exclude-history", action="store_true", help="top-k leaves out items already seen")
    export.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    export.add_argument("--cache-entries", type=int, default=0, help="per-user cache of encoded user sides")
    handlers["export"] = _export

    from merlin_longseq.serving.cli import add_serving_commands  # serve / query (light import)

    handlers.update(add_serving_commands(sub))

    bench = sub.add_parser("bench", help="run benchmarks/bench_<name>.py (its flags follow)")
    bench.add_argument("name", help="e.g. kernels, serving, longer, rlb, stca-layer, group-attention")
    handlers["bench"] = _bench
    return parser, handlers


# commands whose flags belong to the program they hand over to: everything after the command goes there verbatim
# (argparse's REMAINDER would try to read a leading --flag itself)
_PASS_THROUGH = {"train": 0, "movielens": 1, "bench": 1}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, handlers = build_parser()
    if argv and argv[0] in _PASS_THROUGH:
        fixed = _PASS_THROUGH[argv[0]]
        args = parser.parse_args(argv[:1 + fixed])
        args.rest = argv[1 + fixed:]
        return handlers[args.command](args)
    args = parser.parse_args(argv)
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
