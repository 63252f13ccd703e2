"""The main job, part 3: export the trained ranking models, serve them with a real Triton Inference Server,
query them with real requests, check the scores and report latency.

    models = {}
    ranking.run(run_dir, cfg, models_out=models)                      # part 2 trains the T4R models
    serve_demo.run(serve_dir, cfg, models, f"{run_dir}/etl/workflow")  # part 3

Steps:
1. Servable models: export takes the trained T4R model itself. Its request block holds a HEADLESS core model;
   the heads are the T4R tasks (RequestBinaryClassificationTask: Linear(hidden, 1) + sigmoid), which
   merlin_longseq.serving.repository.servable folds into the core model's task head, so the served logits are
   exactly the pre-sigmoid scores of the trained T4R model. Every registered ranking architecture serves.
2. Export (merlin_longseq.serving.export) of every servable model with the fitted eval-side NVTabular
   workflow (full histories, the training item vocabulary) into <run_dir>/repo, one ensemble per arch.
3. A real tritonserver (TritonServer: the nvidia-pytriton wheel's server) on free 127.0.0.1 ports.
4. Requests from the RAW synthetic eval data (ranking.make_data is deterministic), grouped by the
   RequestGrouping operator on the raw logs (raw item ids: what a client sends).
5. Check: served logits against the headed core model on the WORKFLOW-encoded request (the fitted workflow
   transforms the same impressions), and sigmoid(served) against the trained T4R model's probabilities;
   the largest absolute difference must stay within `tolerance`.
6. Latency over HTTP: sequential requests, then `concurrency` clients at once (p50 / p99, requests/s).
   serving_latency.json, a section in <run_dir>/report.md, and the server stopped with SIGTERM.

Without the `serve` extra (nvidia-pytriton, tritonclient, merlin-systems), run() logs one line and returns None.
"""
from __future__ import annotations

import importlib
import json
import os
import platform
import shutil
import threading
import time

import numpy as np

from merlin_longseq import registry

DEFAULT_TOLERANCE = 1e-4
REQUEST_FEATURES = ("hist_item_id", "hist_action", "hist_timestamp", "cand_item_id", "request_time", "user_id")
# Categorify (NVTabular 23.08): 1 = null, 2 = out of vocabulary. The served ensemble refuses such ids.
UNKNOWN_ITEM_IDS = (1, 2)


class ServingCheckError(RuntimeError):
    """Served scores differ from the in-process scores of the same model on the same request."""


def serve_extra_missing() -> str | None:
    """None when the serve extra is usable, else what is missing (one line)."""
    for module in ("pytriton", "tritonclient.http", "merlin.systems"):
        try:
            importlib.import_module(module)
        except ImportError as err:
            return f"{module} does not import ({err})"
    from merlin_longseq.serving.server import ServerError, find_tritonserver

    try:
        find_tritonserver()
    except ServerError as err:
        return str(err).splitlines()[0]
    return None


# ---- 4. requests from the raw logs ------------------------------------------------------------------------------
def raw_requests(events, impressions, request_ids, max_history: int) -> list[dict]:
    """Raw request features (what a client sends) for `request_ids`: the raw logs grouped by the
    RequestGrouping operator itself (its rules, no second implementation), item ids left raw."""
    from merlin.dag import ColumnSelector

    from merlin_longseq.workflows.request_grouping import RequestGrouping

    wanted = impressions[impressions["request_id"].isin(list(request_ids))]
    missing = sorted(set(int(r) for r in request_ids) - set(int(r) for r in wanted["request_id"].unique()))
    if missing:
        raise ValueError(f"request(s) {missing} are not in the impressions")
    selected = ["user_id", "request_id", "request_time", "item_id"]
    grouping = RequestGrouping(events, label_columns=[], max_history=max_history)
    frame = grouping.transform(ColumnSelector(selected), wanted[selected].reset_index(drop=True))
    by_id = {int(row["request_id"]): row for _, row in frame.iterrows()}
    return [{**{name: np.asarray(by_id[int(r)][name], dtype=np.int64) for name in REQUEST_FEATURES},
             "request_id": int(r)} for r in request_ids]


def encoded_requests(workflow, impressions, request_ids) -> dict:
    """{request_id: encoded row (numpy arrays)} of `request_ids` through the fitted request workflow."""
    wanted = impressions[impressions["request_id"].isin(list(request_ids))]
    frame = workflow.transform(wanted)
    frame = frame.to_pandas() if hasattr(frame, "to_pandas") else frame
    out = {}
    for _, row in frame.iterrows():
        out[int(row["request_id"])] = {name: np.asarray(row[name], dtype=np.int64) for name in REQUEST_FEATURES}
    return out


def _check_same_request(raw: dict, encoded: dict) -> None:
    """The raw request and the workflow's row must describe the same events (timestamps pass through)."""
    same = (np.array_equal(raw["hist_timestamp"], encoded["hist_timestamp"])
            and np.array_equal(raw["hist_action"], encoded["hist_action"])
            and raw["cand_item_id"].size == encoded["cand_item_id"].size
            and int(raw["request_time"]) == int(encoded["request_time"]))
    if not same:
        raise RuntimeError(f"request {raw['request_id']}: the raw request built from the logs "
                           f"({raw['hist_timestamp'].size} events, {raw['cand_item_id'].size} candidates) is not "
                           f"the workflow's row ({encoded['hist_timestamp'].size} events, "
                           f"{encoded['cand_item_id'].size} candidates)")


# ---- 5. in-process references --------------------------------------------------------------------------------
def core_logits(core, row: dict) -> np.ndarray:
    """[C, tasks] logits of the headed core model on one encoded request."""
    import torch

    from merlin_longseq.request import RequestBatch

    batch = RequestBatch.from_lengths(
        hist_lengths=[row["hist_item_id"].size], cand_lengths=[row["cand_item_id"].size],
        hist_item_ids=row["hist_item_id"], hist_actions=row["hist_action"], hist_timestamps=row["hist_timestamp"],
        cand_item_ids=row["cand_item_id"], request_time=row["request_time"], user_ids=row["user_id"])
    if not core.cfg.uses_users:
        batch.user_ids = None
    with torch.no_grad():
        return core(**batch.model_inputs).numpy()


def t4r_probabilities(model, row: dict, labels) -> np.ndarray:
    """[C, tasks] probabilities of the trained T4R model on one encoded request (a padded batch of one)."""
    import torch

    inputs = {name: torch.as_tensor(row[name], dtype=torch.int64).reshape(1, -1) for name in REQUEST_FEATURES}
    inputs["request_time"], inputs["user_id"] = inputs["request_time"].reshape(1), inputs["user_id"].reshape(1)
    model.eval()
    with torch.no_grad():
        out = model(inputs)
    out = out if isinstance(out, dict) else {labels[0]: out}
    columns = []
    for label in labels:
        [key] = [k for k in out if k == label or k.split("/")[0] == label]
        columns.append(out[key][0].numpy())
    return np.stack(columns, axis=1)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


# ---- 6. traffic -------------------------------------------------------------------------------------------------
def _latency_stats(seconds: list[float], wall: float) -> dict:
    ms = np.asarray(seconds) * 1e3
    return {"requests": int(ms.size), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "max_ms": float(ms.max()), "wall_s": round(wall, 3),
            "requests_per_s": float(ms.size / wall) if wall > 0 else float("nan")}


def _send(url, arch, requests, indices, expected_logits, task_names, served_out=None):
    """Send requests[i] for i in indices over one HTTP client; -> (latencies, max |served - expected|)."""
    from merlin_longseq.serving.client import ScoringClient

    latencies, worst = [], 0.0
    with ScoringClient(url, protocol="http", model_name=arch) as client:
        for i in indices:
            features = {name: requests[i][name] for name in REQUEST_FEATURES}
            start = time.perf_counter()
            served = client.score(**features)
            latencies.append(time.perf_counter() - start)
            logits = np.stack([served[_output_name(t)] for t in task_names], axis=1)
            if logits.shape != expected_logits[i].shape:
                raise ServingCheckError(f"{arch}: request {requests[i]['request_id']} came back with "
                                        f"{logits.shape} scores, expected {expected_logits[i].shape}")
            worst = max(worst, float(np.abs(logits - expected_logits[i]).max()))
            if served_out is not None:
                served_out[i] = logits
    return latencies, worst


def _output_name(task: str) -> str:
    return task if task == "score" else f"score_{task}"


def _concurrent(url, arch, requests, expected, task_names, clients: int) -> tuple[dict, float]:
    """`clients` threads, each with its own connection, sharing the requests round-robin."""
    results, errors = [None] * clients, []

    def worker(k):
        try:
            results[k] = _send(url, arch, requests, range(k, len(requests), clients), expected, task_names)
        except Exception as err:  # re-raised in the caller's thread
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if errors:
        raise errors[0]
    latencies = [s for r in results if r for s in r[0]]
    return _latency_stats(latencies, wall), max(r[1] for r in results if r)


# ---- the job ------------------------------------------------------------------------------------------------------
def run(run_dir: str, ranking_cfg, models: dict, workflow_path: str, log=print, num_requests: int = 32,
        concurrency: int = 4, tolerance: float = DEFAULT_TOLERANCE, device: str = "cpu", cache_entries: int = 0,
        start_timeout_s: float = 300) -> dict | None:
    """Export, serve, query and time the servable models of `models` (arch -> trained T4R model).

    ranking_cfg: the RankingJobConfig the models were trained with (its data gives the raw requests).
    workflow_path: the fitted eval-side request workflow the ranking job saved (<ranking run>/etl/workflow).
    num_requests: distinct eval requests sent to each model (each checked); concurrency: clients of the
    concurrent round (0: sequential only). device: where the server runs the models ("cpu" keeps the check
    against in-process CPU scores exact; "auto" = CUDA when the server sees one).
    Returns a summary dict (also written to serving_latency.json), or None when part 3 is skipped.
    """
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    if concurrency < 0:
        raise ValueError(f"concurrency must be >= 0, got {concurrency}")
    if not tolerance > 0:
        raise ValueError(f"tolerance must be > 0, got {tolerance}")
    if not isinstance(models, dict):
        raise ValueError(f"models must be a dict arch -> trained model, got {type(models).__name__}")
    archs = [arch for arch in registry.names(registry.RANKING) if arch in models]
    if not archs:
        log(f"part 3 skipped: no servable model trained (serving covers {', '.join(registry.names(registry.RANKING))}; "
            f"trained: {', '.join(models) or 'none'})")
        return None
    missing = serve_extra_missing()
    if missing:
        log(f"part 3 skipped: the serve extra is not usable ({missing}); pip install 'merlin-longseq[serve]'")
        return None
    if not os.path.exists(workflow_path):
        raise ValueError(f"no fitted workflow at {workflow_path} (the ranking job saves it to <run>/etl/workflow)")
    import torch

    previous_threads = torch.get_num_threads()
    if getattr(ranking_cfg, "torch_threads", None):
        torch.set_num_threads(ranking_cfg.torch_threads)
    try:
        return _run(run_dir, ranking_cfg, models, archs, workflow_path, log, num_requests, concurrency, tolerance,
                    device, cache_entries, start_timeout_s)
    finally:
        torch.set_num_threads(previous_threads)


def _run(run_dir, cfg, models, archs, workflow_path, log, num_requests, concurrency, tolerance, device,
         cache_entries, start_timeout_s) -> dict:
    import nvtabular as nvt

    from merlin_longseq.jobs.ranking import make_data
    from merlin_longseq.serving.repository import export, servable
    from merlin_longseq.serving.server import TritonServer

    os.makedirs(run_dir, exist_ok=True)
    labels = tuple(cfg.labels)
    repo = os.path.join(run_dir, "repo")
    shutil.rmtree(repo, ignore_errors=True)  # export merges into an existing repository: start clean
    workflow = nvt.Workflow.load(workflow_path)
    served_models = {}
    started = time.perf_counter()
    for arch in archs:
        # export takes the trained T4R model itself; `servable` gives the same core model for the references
        export(repo, workflow, models[arch], max_history=cfg.eval_max_history, task_names=labels, name=arch,
               device=device, cache_entries=cache_entries)
        served_models[arch] = servable(models[arch], labels)[0]
    export_seconds = time.perf_counter() - started
    log(f"[1/4] exported {', '.join(archs)} with the fitted workflow -> {repo} ({export_seconds:.1f} s)")

    # requests: the eval split's requests in id order, leaving out any the vocabulary does not fully know
    events, _, evaluation = make_data(cfg)
    request_ids = sorted(int(r) for r in evaluation["request_id"].unique())
    encoded = encoded_requests(workflow, evaluation, request_ids)
    known = [r for r in request_ids if not any(np.isin(encoded[r][c], UNKNOWN_ITEM_IDS).any()
                                               for c in ("hist_item_id", "cand_item_id"))]
    chosen = known[:num_requests]
    if len(chosen) < num_requests:
        log(f"      only {len(chosen)} of {len(request_ids)} eval requests hold only known item ids "
            f"({num_requests} asked for)")
    if not chosen:
        raise RuntimeError("no eval request has only item ids the workflow's vocabulary knows")
    requests = raw_requests(events, evaluation, chosen, cfg.eval_max_history)
    for request in requests:
        _check_same_request(request, encoded[request["request_id"]])
    hist_lengths = [r["hist_item_id"].size for r in requests]
    cand_counts = [r["cand_item_id"].size for r in requests]
    references = {}
    for arch in archs:
        is_t4r = models[arch] is not served_models[arch]  # a core model has no T4R probabilities
        rows = [encoded[r["request_id"]] for r in requests]
        references[arch] = {
            "logits": [core_logits(served_models[arch], row) for row in rows],
            "probabilities": [t4r_probabilities(models[arch], row, labels) if is_t4r else None for row in rows],
        }
    log(f"[2/4] {len(requests)} requests from the raw eval logs: history {min(hist_lengths)}-{max(hist_lengths)} "
        f"events (mean {np.mean(hist_lengths):.0f}), {min(cand_counts)}-{max(cand_counts)} candidates")

    server = TritonServer(repo, exit_timeout_s=30, log_file=os.path.join(run_dir, "triton.log"))
    summary = {"repo": repo, "device": device, "tolerance": tolerance, "hardware": _hardware(),
               "requests": {"count": len(requests), "request_ids": chosen, "history_len_mean": float(np.mean(
                   hist_lengths)), "history_len_max": int(max(hist_lengths)),
                   "candidates_mean": float(np.mean(cand_counts))},
               "ports": {"http": server.http_port, "grpc": server.grpc_port, "metrics": server.metrics_port},
               "models": {}}
    served_scores = {}
    started = time.perf_counter()
    try:
        server.start(timeout_s=start_timeout_s)
        summary["server_start_seconds"] = round(time.perf_counter() - started, 2)
        log(f"[3/4] tritonserver ready on http {server.http_url} / grpc {server.grpc_url} "
            f"({summary['server_start_seconds']} s)")
        for arch in archs:
            expected = references[arch]["logits"]
            warm = time.perf_counter()
            _send(server.http_url, arch, requests, [0], expected, labels)  # first call: lazy set-up, not timed
            entry = {"tasks": list(labels), "max_history": cfg.eval_max_history,
                     "warmup_ms": round((time.perf_counter() - warm) * 1e3, 2)}
            served = [None] * len(requests)
            wall = time.perf_counter()
            latencies, worst = _send(server.http_url, arch, requests, range(len(requests)), expected, labels,
                                     served_out=served)
            entry["sequential"] = _latency_stats(latencies, time.perf_counter() - wall)
            if concurrency:
                entry[f"concurrent_{concurrency}"], worst_concurrent = _concurrent(
                    server.http_url, arch, requests, expected, labels, concurrency)
                worst = max(worst, worst_concurrent)
            entry["max_abs_diff_logits"] = worst
            probabilities = references[arch]["probabilities"]
            entry["max_abs_diff_probabilities"] = (
                max(float(np.abs(_sigmoid(s) - p).max()) for s, p in zip(served, probabilities))
                if probabilities[0] is not None else None)
            summary["models"][arch] = entry
            served_scores[arch] = served
    finally:
        code = server.stop()
        server.close()
    summary["server_exit_code"] = code
    log(f"[4/4] server stopped (exit code {code}); report")

    rows = _report_rows(summary, concurrency)
    _write(run_dir, summary, rows, log)
    failed = {arch: e for arch, e in summary["models"].items()
              if e["max_abs_diff_logits"] > tolerance or (e["max_abs_diff_probabilities"] or 0.0) > tolerance}
    if failed:
        raise ServingCheckError(f"served scores differ from in-process scores by more than {tolerance}: " + ", ".join(
            f"{arch} logits {e['max_abs_diff_logits']:.2e}, probabilities {e['max_abs_diff_probabilities']}"
            for arch, e in failed.items()))
    summary["served_scores"] = served_scores  # per arch, [C, tasks] logits per request (not in the JSON)
    return summary


def _hardware() -> dict:
    import torch

    info = {"machine": platform.machine(), "processor": platform.processor() or None, "cpus": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _report_rows(summary: dict, concurrency: int) -> list[dict]:
    rows = []
    for arch, entry in summary["models"].items():
        modes = [("1 (sequential)", entry["sequential"])]
        if concurrency:
            modes.append((str(concurrency), entry[f"concurrent_{concurrency}"]))
        for clients, stats in modes:
            diff_p = entry["max_abs_diff_probabilities"]
            rows.append({"model": arch, "clients": clients, "requests": stats["requests"],
                         "p50 ms": f"{stats['p50_ms']:.1f}", "p99 ms": f"{stats['p99_ms']:.1f}",
                         "req/s": f"{stats['requests_per_s']:.1f}",
                         "max |diff| logit": f"{entry['max_abs_diff_logits']:.1e}",
                         "max |diff| prob": "-" if diff_p is None else f"{diff_p:.1e}"})
    return rows


def _write(run_dir: str, summary: dict, rows: list[dict], log) -> None:
    from merlin_longseq.reporting import format_table

    with open(os.path.join(run_dir, "serving_latency.json"), "w") as f:
        json.dump(summary, f, indent=2)
    requests, hardware = summary["requests"], summary["hardware"]
    title = (f"Serving (real Triton server, HTTP on 127.0.0.1, device {summary['device']}): "
             f"{requests['count']} eval requests, history mean {requests['history_len_mean']:.0f} events, "
             f"{requests['candidates_mean']:.0f} candidates")
    table = format_table(rows, list(rows[0]))
    note = (f"Latency is client-side, per request (raw ids -> NVTabular encoding -> model -> scores). "
            f"Server start {summary.get('server_start_seconds', '?')} s; {hardware['cpus']} CPUs "
            f"({hardware['machine']}); diffs = served vs in-process scores of the same model on the same request "
            f"(tolerance {summary['tolerance']:g}).")
    log(f"\n{title}\n{table}\n{note}\n")
    with open(os.path.join(run_dir, "report.md"), "a") as f:
        f.write(f"## {title}\n\n{table}\n\n{note}\n\n")
