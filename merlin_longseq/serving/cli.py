"""`merlin-longseq serve REPO` and `merlin-longseq query URL` (hooked into merlin_longseq/cli.py).

Nothing heavy is imported here at module level: the server and the client load their dependencies when run.
"""
from __future__ import annotations

import argparse
import sys


def serve_command(args) -> int:
    """Run tritonserver on 127.0.0.1 until SIGTERM / SIGINT, then stop it letting in-flight requests finish.

    Exits 1 when tritonserver ends on its own (a crash, SIGKILL from outside): its process group and shared
    memory are cleaned up first (serving/server.py)."""
    import logging
    import signal
    import threading

    from merlin_longseq.serving.server import ServerError, TritonServer

    # the server wrapper reports an unexpected exit and its clean-up through logging
    logging.basicConfig(level=logging.WARNING, format="merlin-longseq serve: %(message)s", stream=sys.stderr)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server = None
    try:
        server = TritonServer(args.repo, http_port=args.http_port, grpc_port=args.grpc_port,
                              metrics_port=args.metrics_port, exit_timeout_s=args.exit_timeout,
                              log_file=args.log_file, open_admin_apis=args.open_admin_apis,
                              max_request_bytes=args.max_request_bytes)
        server.start(timeout_s=args.start_timeout, progress=True, cancel=stop)
    except ServerError as err:
        if server is not None:
            server.close()
        print(f"merlin-longseq serve: {err}", file=sys.stderr)
        return 1
    try:
        cap = f"{server.request_byte_cap} bytes" if server.request_byte_cap else "none"
        print(f"ready: http {server.http_url} grpc {server.grpc_url} (repository {server.repo_dir}; tritonserver "
              f"pid {server.process.pid}, shm prefix {server.shm_prefix}, request byte cap {cap})", flush=True)
        while not stop.is_set() and not server.exited.is_set():
            stop.wait(0.2)
        code = server.stop()
    finally:
        server.close()  # also on an exception: never leave the server's group or files behind
    if server.unexpected_exit:  # logged by the wrapper
        return 1
    if server.forced:
        print("merlin-longseq serve: tritonserver was drained (nothing in flight) but still running after SIGTERM "
              "(clients keeping connections open, or a slow unload); its process group was killed", file=sys.stderr)
    print(f"stopped (tritonserver exit status {code})", flush=True)
    return 0


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def query_command(args) -> int:
    import json
    import time

    import numpy as np

    from merlin_longseq.serving.client import ScoringClient, ScoringError

    features = {}
    if args.json:
        with (sys.stdin if args.json == "-" else open(args.json, encoding="utf-8")) as f:
            features.update(json.load(f))
    for name, value in (("hist_item_id", args.history), ("hist_action", args.actions),
                        ("hist_timestamp", args.timestamps), ("cand_item_id", args.candidates),
                        ("request_time", args.request_time), ("user_id", args.user_id)):
        if value is not None:
            features[name] = value
    with ScoringClient(args.url, protocol=args.protocol, model_name=args.model) as client:
        try:
            latencies = []
            for _ in range(max(1, args.repeat)):
                start = time.perf_counter()
                scores = client.score(**features)
                latencies.append((time.perf_counter() - start) * 1e3)
        except (ScoringError, ValueError) as err:
            print(f"merlin-longseq query: {err}", file=sys.stderr)
            return 1
    print(json.dumps({name: values.tolist() for name, values in scores.items()}))
    if args.repeat > 1:
        print(f"latency over {args.repeat} requests: p50 {np.percentile(latencies, 50):.2f} ms, "
              f"p99 {np.percentile(latencies, 99):.2f} ms", file=sys.stderr)
    return 0


def add_serving_commands(sub) -> dict:
    """Add `serve` and `query` to an argparse subparsers object; returns {command: handler}."""
    serve = sub.add_parser("serve", help="serve a model repository with Triton on 127.0.0.1 until SIGTERM")
    serve.add_argument("repo", help="model repository written by merlin_longseq.serving.export")
    serve.add_argument("--http-port", type=int, default=8000)
    serve.add_argument("--grpc-port", type=int, default=8001)
    serve.add_argument("--metrics-port", type=int, default=8002)
    serve.add_argument("--exit-timeout", type=int, default=30,
                       help="seconds in-flight requests and open client connections get at shutdown")
    serve.add_argument("--max-request-bytes", type=int, default=None,
                       help="byte cap of one request's inputs (default: derived from the repository's exported "
                            "max_history / max_candidates)")
    serve.add_argument("--start-timeout", type=float, default=180, help="seconds to wait for readiness")
    serve.add_argument("--log-file", help="server log (default: kept in a temporary file)")
    serve.add_argument("--open-admin-apis", action="store_true",
                       help="let any client use the shared-memory, repository, model-config, trace and logging APIs "
                            "(default: only requests with this run's admin header, which no client is given)")
    query = sub.add_parser("query", help="score one request against a running server")
    query.add_argument("url", help="host:port of the server (its HTTP or gRPC port, see --protocol)")
    query.add_argument("--protocol", choices=["http", "grpc"], default="http")
    query.add_argument("--model", default="executor_model", help="entry model name given to export")
    query.add_argument("--json", help="request features as a JSON object (a file, or - for stdin)")
    query.add_argument("--history", type=_int_list, help="raw history item ids, oldest first: 1,2,3")
    query.add_argument("--actions", type=_int_list, help="history action ids")
    query.add_argument("--timestamps", type=_int_list, help="history timestamps (seconds)")
    query.add_argument("--candidates", type=_int_list, help="raw candidate item ids")
    query.add_argument("--request-time", type=int)
    query.add_argument("--user-id", type=int)
    query.add_argument("--repeat", type=int, default=1, help="send the request N times and print p50/p99")
    return {"serve": serve_command, "query": query_command}
