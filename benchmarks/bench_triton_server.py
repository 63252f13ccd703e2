"""Serving through a REAL Triton Inference Server: p50 / p99 latency and requests/s under bounded concurrency
with Triton's dynamic batcher, against the in-process model time of the same requests.

The server is the nvidia-pytriton wheel's tritonserver (python backend), started by serving.server.TritonServer
on 127.0.0.1. It serves the MODEL STEP ALONE (serving/model_only.py): the NVTabular workflow step of the full
ensemble needs the Merlin stack, which the GPU machine's Python 3.12 image cannot install. Requests therefore
carry model ids.

    python benchmarks/bench_triton_server.py                           # every arch, 10,240 events x 512
    python benchmarks/bench_triton_server.py --arch stca --history 1024 --candidates 64 --requests 50   # CPU

Client: HTTP/REST with Triton's binary tensor extension, written here on http.client so that the benchmark
needs nothing beyond the server wheel (tritonclient's HTTP client pulls gevent, which the GPU image lacks);
one keep-alive connection per client thread, `--concurrency` threads each sending its next request as soon as
the previous one is answered. Latency = client wall time of one request (network stack, batching window,
queueing and the model's execution included).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import os
import sys
import tempfile
import threading
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_serving import ARCHS, models, one_request  # noqa: E402  (the same models and request as bench_serving)

from merlin_longseq.serving.model_only import export_model_only  # noqa: E402
from merlin_longseq.serving.scoring import make_scorer  # noqa: E402
from merlin_longseq.serving.server import TritonServer  # noqa: E402


def wire(batch) -> dict:
    """One request's inputs (name -> int array) in the model-only wire format, with the batch dim of 1."""
    n, c = int(batch.hist_offsets[-1]), int(batch.cand_offsets[-1])
    out = {}
    for column, values, size in (("hist_item_id", batch.hist_item_ids, n), ("hist_action", batch.hist_actions, n),
                                 ("hist_timestamp", batch.hist_timestamps, n),
                                 ("cand_item_id", batch.cand_item_ids, c)):
        out[f"{column}__values"] = values.numpy().astype(np.int64).reshape(1, -1)
        out[f"{column}__offsets"] = np.array([[0, size]], dtype=np.int32)
    out["request_time"] = batch.request_time.numpy().astype(np.int64).reshape(1, 1)
    out["user_id"] = batch.user_ids.numpy().astype(np.int64).reshape(1, 1)
    return out


_DTYPES = {np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32"}


def encode(arrays: dict, outputs: list[str]) -> tuple[bytes, int]:
    """(body, JSON header length) of a binary-extension inference request."""
    header = {"inputs": [{"name": k, "shape": list(v.shape), "datatype": _DTYPES[v.dtype],
                          "parameters": {"binary_data_size": v.nbytes}} for k, v in arrays.items()],
              "outputs": [{"name": o, "parameters": {"binary_data": True}} for o in outputs]}
    head = json.dumps(header).encode()
    return head + b"".join(np.ascontiguousarray(v).tobytes() for v in arrays.values()), len(head)


class Client:
    """One keep-alive HTTP connection; infer() -> {output: float32 array}."""

    def __init__(self, url: str, model: str):
        host, port = url.split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=120)
        self.path = f"/v2/models/{model}/infer"

    def infer(self, body: bytes, head_len: int) -> dict:
        self.conn.request("POST", self.path, body, {"Inference-Header-Content-Length": str(head_len),
                                                    "Content-Type": "application/octet-stream"})
        response = self.conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {data[:300]!r}")
        length = int(response.getheader("Inference-Header-Content-Length", len(data)))
        header, offset, out = json.loads(data[:length]), length, {}
        for tensor in header["outputs"]:
            size = tensor["parameters"]["binary_data_size"]
            out[tensor["name"]] = np.frombuffer(data[offset:offset + size], dtype=np.float32)
            offset += size
        return out


def stats(url: str, model: str) -> dict:
    conn = http.client.HTTPConnection(*url.split(":"), timeout=30)
    conn.request("GET", f"/v2/models/{model}/stats")
    data = json.loads(conn.getresponse().read())["model_stats"][0]
    return {"inference_count": int(data["inference_count"]), "execution_count": int(data["execution_count"])}


def load(url, model, bodies, concurrency, total) -> dict:
    """`total` requests from `concurrency` closed-loop clients: latencies and throughput."""
    latencies, lock, counter = [], threading.Lock(), iter(range(total))

    def worker(slot):
        client = Client(url, model)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            body, head = bodies[(slot + i) % len(bodies)]
            start = time.perf_counter()
            client.infer(body, head)
            with lock:
                latencies.append((time.perf_counter() - start) * 1e3)

    before = stats(url, model)
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    wall = time.perf_counter() - started
    after = stats(url, model)
    ms = np.array(latencies)
    executions = after["execution_count"] - before["execution_count"]
    return {"concurrency": concurrency, "requests": total, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "req_per_s": total / wall,
            "requests_per_execution": (after["inference_count"] - before["inference_count"]) / max(executions, 1)}


def in_process(model, requests, device, repeats) -> dict:
    scorer = make_scorer(model, max_history=int(requests[0].hist_offsets[-1]), device=device)
    for r in requests[:3]:
        scorer.score(r)
    ms = []
    for i in range(repeats):
        start = time.perf_counter()
        scorer.score(requests[i % len(requests)])
        ms.append((time.perf_counter() - start) * 1e3)
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", action="append", choices=ARCHS, help="repeatable; default stca, longer, ultra-hstu")
    parser.add_argument("--history", type=int, default=10_240)
    parser.add_argument("--candidates", type=int, default=512)
    parser.add_argument("--num-items", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, action="append", help="repeatable; default 1, 4, 16")
    parser.add_argument("--requests", type=int, default=200, help="timed requests per concurrency level")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--delay-us", type=int, default=500, help="dynamic batcher's max queue delay")
    parser.add_argument("--device", default="auto", help="where the served model runs: auto | cpu | cuda")
    parser.add_argument("--instance-kind", default="cpu", choices=("auto", "cpu", "gpu"),
                        help="Triton instance group kind of the served model")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args(argv)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else \
        ("cpu" if args.device == "auto" else args.device)
    levels = args.concurrency or [1, 4, 16]
    requests = [one_request(args.history, args.candidates, args.num_items, seed=s) for s in range(8)]
    bodies = [encode(wire(r), ["score_click__values"]) for r in requests]
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"# {name}, torch {torch.__version__}: one request = {args.history} events x {args.candidates} "
          f"candidates; dynamic batching max {args.max_batch_size}, delay {args.delay_us} us; {args.requests} "
          f"requests per level", flush=True)
    rows = []
    os.makedirs(args.out, exist_ok=True)
    for arch, model in models(args.num_items, "auto").items():
        if arch not in (args.arch or ("stca", "longer", "ultra-hstu")):
            continue
        model = model.eval()
        local = in_process(model, requests, device, repeats=50)
        print(f"{arch:11s} in-process        p50 {local['p50_ms']:8.2f} ms  p99 {local['p99_ms']:8.2f} ms", flush=True)
        try:
            rows += serve_and_load(arch, model, requests, bodies, device, local, levels, args, name)
        except Exception as err:  # noqa: BLE001  (one arch failing must not hide the others' numbers)
            print(f"{arch:11s} FAILED: {type(err).__name__}: {err}", flush=True)
            rows.append({"arch": arch, "device": name, "error": f"{type(err).__name__}: {err}"})
        with open(os.path.join(args.out, "bench_triton_server.json"), "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def serve_and_load(arch, model, requests, bodies, device, local, levels, args, name) -> list:
    """Export `model` alone, serve it, check one answer against the model, then load it at each level."""
    rows = []
    with tempfile.TemporaryDirectory() as repo:
        export_model_only(repo, model.cpu(), name=arch.replace("-", "_"), max_history=args.history,
                          device=device, max_batch_size=args.max_batch_size, max_queue_delay_us=args.delay_us,
                          instance_kind=args.instance_kind)
        server = TritonServer(repo, log_file=os.path.join(args.out, f"tritonserver_{arch}.log"), exit_timeout_s=20)
        with server.start(timeout_s=300):
            model_name = arch.replace("-", "_")
            client = Client(server.http_url, model_name)
            for body, head in bodies[:4]:  # warm-up: autotuning, CUDA context, first allocations
                client.infer(body, head)
            served = client.infer(*bodies[0])["score_click__values"]
            expected = make_scorer(model, max_history=args.history, device=device).score(requests[0])[:, 0]
            match = float(np.abs(served - expected.numpy()).max())
            for level in levels:
                row = {"arch": arch, "device": name, **load(server.http_url, model_name, bodies, level,
                                                             args.requests),
                       "in_process_p50_ms": local["p50_ms"], "in_process_p99_ms": local["p99_ms"],
                       "max_abs_diff_vs_in_process": match}
                rows.append(row)
                print(f"{arch:11s} concurrency {level:3d}  p50 {row['p50_ms']:8.2f} ms  p99 {row['p99_ms']:8.2f} "
                      f"ms  {row['req_per_s']:8.1f} req/s  {row['requests_per_execution']:.2f} req/exec  "
                      f"|served - in-process| {match:.1e}", flush=True)
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
