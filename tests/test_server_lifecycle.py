"""The server's life cycle and its request caps, against a REAL tritonserver (nvidia-pytriton wheel) on 127.0.0.1.

- caps (no server): InputCaps reads shapes and offsets only, names the column, bounds lying offsets; Drain.
- a 1M-event history and a candidate list over the cap are refused at once with a 400 naming the field, and
  good requests sent right behind them answer fast (before: 7-10 s to refuse, 6 s for the request behind);
- SIGKILL of tritonserver: `merlin-longseq serve` reports it, kills the stubs the kill orphans, removes the
  server's /dev/shm files; a restart on the same repository scores the same;
- SIGTERM under sustained HTTP + gRPC load: every request sent before it is answered right, later ones are
  answered or refused cleanly, the CLI is back well within the exit timeout, nothing is left behind.

Processes and /dev/shm are checked with `ps` and os.listdir, not with the wrapper's own helpers.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from merlin_longseq.serving.admission import (DEFAULT_MAX_CANDIDATES, Drain, InputCaps, RequestTooLarge,
                                              begin_drain, executors_idle)

MAX_HISTORY = 16


# ---- caps and drain without a server ------------------------------------------------------------------------
def _caps(**overrides) -> InputCaps:
    entry = {"columns": {"hist_item_id": "hist_item_id", "hist_action": "hist_action",
                         "hist_timestamp": "hist_timestamp", "request_time": "request_time", "user_id": "user_id",
                         "cand_item_id": "cand_item_id"}, "max_history": 4, "max_candidates": 3}
    entry.update(overrides)
    return InputCaps.from_manifest(entry)


def _arrays(histories, candidates):
    out = {}
    for name, lists in (("hist_item_id", histories), ("hist_action", histories), ("hist_timestamp", histories),
                        ("cand_item_id", candidates)):
        out[f"{name}__values"] = np.concatenate([np.asarray(x, np.int64) for x in lists])
        out[f"{name}__offsets"] = np.cumsum([0] + [len(x) for x in lists]).astype(np.int32)
    out["request_time"] = out["user_id"] = np.ones(len(histories), np.int64)
    return out


def test_caps_name_the_request_and_the_column():
    caps = _caps()
    caps.check(_arrays([[1, 2, 3, 4], [5]], [[1, 2, 3], [4]]))  # at the caps: fine
    with pytest.raises(RequestTooLarge, match=r"request 1 has a history of 5 events \(hist_item_id\), more than "
                                              r"the maximum 4: send the most recent 4"):
        caps.check(_arrays([[1], [1, 2, 3, 4, 5]], [[1], [2]]))
    with pytest.raises(RequestTooLarge, match=r"request 0 has 4 candidates \(cand_item_id\), more than the "
                                              r"maximum 3"):
        caps.check(_arrays([[1]], [[1, 2, 3, 4]]))
    # only a later history column too long (the validator would find the mismatch, after decoding it)
    arrays = _arrays([[1]], [[1]])
    arrays["hist_action__values"] = np.ones(50, np.int64)
    arrays["hist_action__offsets"] = np.array([0, 50], np.int32)
    with pytest.raises(RequestTooLarge, match=r"\(hist_action\)"):
        caps.check(arrays)


def test_caps_bound_lying_offsets_requests_and_bytes():
    caps = _caps()
    arrays = _arrays([[1]], [[1]])
    arrays["hist_item_id__values"] = np.ones(1000, np.int64)  # offsets still say one event
    with pytest.raises(RequestTooLarge, match=r"the call has a history of 1000 events \(hist_item_id\)"):
        caps.check(arrays)
    many = [[1]] * (caps.max_requests + 1)
    with pytest.raises(RequestTooLarge, match="requests in one call"):
        caps.check(_arrays(many, many))
    assert caps.request_bytes == 8 * (3 * 4 + 3) + 8 * 4 + 8 * 2  # 3 history lists of 4, 3 candidates
    assert caps.call_bytes == caps.max_requests * caps.request_bytes + (1 << 20)
    tight = InputCaps.from_manifest({"columns": {"hist_item_id": "h", "cand_item_id": "c"}, "max_history": 4,
                                     "max_candidates": 3}, max_bytes=100)

    def call(requests):  # `requests` requests at the shape caps
        return {"h__values": np.ones(4 * requests, np.int64), "c__values": np.ones(3 * requests, np.int64),
                "h__offsets": np.arange(0, 4 * requests + 1, 4, dtype=np.int32),
                "c__offsets": np.arange(0, 3 * requests + 1, 3, dtype=np.int32)}
    tight.check(call(1))  # 72 bytes
    with pytest.raises(RequestTooLarge, match=r"136 bytes of input, more than this server's cap of 100"):
        tight.check(call(2))


def test_unbounded_candidates_get_the_default_cap():
    caps = _caps(max_candidates=None)
    assert caps.max_candidates == DEFAULT_MAX_CANDIDATES
    with pytest.raises(RequestTooLarge, match=rf"{DEFAULT_MAX_CANDIDATES + 1} candidates \(cand_item_id\)"):
        caps.check(_arrays([[1]], [np.ones(DEFAULT_MAX_CANDIDATES + 1, np.int64)]))


def test_drain_refuses_after_the_grace_and_shows_busy_calls(tmp_path):
    path = str(tmp_path / "draining")
    drain = Drain(path)
    assert drain.enter() and not executors_idle(path)  # a call in progress
    drain.leave()
    assert executors_idle(path)
    begin_drain(path, 0.3)
    assert drain.enter()  # within the grace: still served
    drain.leave()
    time.sleep(0.35)
    assert not drain.enter() and executors_idle(path)  # refused, and a refusal leaves the flag down


# ---- real servers -------------------------------------------------------------------------------------------
def _require_serving():
    pytest.importorskip("merlin.systems")
    pytest.importorskip("pytriton", reason="needs the serve extra (nvidia-pytriton)")
    pytest.importorskip("tritonclient.http")
    pytest.importorskip("tritonclient.grpc")


def _group(pgid: int) -> list[str]:
    """Live members of a process group, as `ps` sees them (zombies are dead: their memory is freed)."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,pgid=,stat=,comm="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if int(line.split()[1]) == pgid and not line.split()[2].startswith("Z")]


def _shm(prefix: str) -> list[str]:
    return [name for name in os.listdir("/dev/shm") if name.startswith(prefix)]


READY = re.compile(r"ready: http (\S+) grpc (\S+) .*tritonserver pid (\d+), shm prefix (\S+),")


class Served:
    """`merlin-longseq serve` in a subprocess; `out` re-reads what it printed."""

    def __init__(self, repo, tmp, *extra, exit_timeout=30):
        from merlin_longseq.serving.server import free_port

        self.log_path = tmp / "serve.out"
        self._log = open(self.log_path, "w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "merlin_longseq.cli", "serve", str(repo), "--http-port", str(free_port()),
             "--grpc-port", str(free_port()), "--metrics-port", str(free_port()), "--exit-timeout",
             str(exit_timeout), "--log-file", str(tmp / "triton.log"), *extra],
            stdout=self._log, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            found = READY.search(self.out)
            if found:
                self.http, self.grpc = found.group(1), found.group(2)
                self.pid, self.shm_prefix = int(found.group(3)), found.group(4)
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.25)
        self.close()
        pytest.fail(f"merlin-longseq serve did not become ready:\n{self.out}")

    @property
    def out(self) -> str:
        self._log.seek(0)
        return self._log.read()

    def close(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def _request(items, length=3, candidates=(0, 1)):
    """A valid raw request over known raw item ids."""
    return dict(hist_item_id=np.array(items[:length]), hist_action=np.ones(length, np.int64),
                hist_timestamp=np.arange(10, 10 * (length + 1), 10), request_time=10 * (length + 1), user_id=1,
                cand_item_id=np.array([items[length + c] for c in candidates]))


@pytest.fixture(scope="module")
def plain_repo(tmp_path_factory):
    """A tiny STCA model served on raw ids (no workflow: one python-backend stub, quick to start)."""
    _require_serving()
    from merlin_longseq.models.stca import STCAConfig, STCAModel
    from merlin_longseq.serving.repository import export

    torch.manual_seed(0)
    model = STCAModel(STCAConfig(num_items=20, d_model=8, n_layers=1, mlp_dims=(8,))).eval()
    repo = tmp_path_factory.mktemp("plain") / "repo"
    export(str(repo), None, model, max_history=MAX_HISTORY, name="stca", device="cpu", max_candidates=32)
    return repo


@pytest.fixture(scope="module")
def workflow_repo(tmp_path_factory):
    """STCA behind the NVTabular item encoding (workflow model + executor, as users serve it); candidates
    left uncapped at export, so the server's default cap applies. Returns (repo, known raw item ids)."""
    _require_serving()
    pytest.importorskip("nvtabular")
    from merlin.io import Dataset

    from merlin_longseq.data.synthetic import generate_impressions
    from merlin_longseq.models.stca import STCAConfig, STCAModel
    from merlin_longseq.serving.repository import export
    from merlin_longseq.workflows.request_grouping import build_request_workflow

    tmp = tmp_path_factory.mktemp("workflow")
    torch.manual_seed(0)
    events, impressions = generate_impressions(num_users=8, num_items=200, num_topics=20, min_history=10,
                                               max_history=20, requests_per_user=2, candidates_per_request=4)
    flow = build_request_workflow(events, label_columns=["click"], max_history=MAX_HISTORY,
                                  out_path=str(tmp / "cats"))
    flow.fit(Dataset(impressions))
    num_items = flow.output_schema["cand_item_id"].properties["embedding_sizes"]["cardinality"] - 1
    model = STCAModel(STCAConfig(num_items=num_items, num_users=int(events["user_id"].max()), d_model=8,
                                 n_heads=2, tasks=("click",), mlp_dims=(8,))).eval()
    repo = tmp / "repo"
    export(str(repo), flow, model, max_history=MAX_HISTORY, name="stca", device="cpu")
    return repo, sorted(set(events["item_id"].tolist()))


class TestRequestCaps:
    @pytest.fixture(scope="class")
    def server(self, workflow_repo, tmp_path_factory):
        from merlin_longseq.serving.server import TritonServer

        repo, items = workflow_repo
        with TritonServer(str(repo), exit_timeout_s=10,
                          log_file=str(tmp_path_factory.mktemp("caps") / "triton.log")) as server:
            yield server, items

    @pytest.mark.parametrize("protocol", ["http", "grpc"])
    def test_a_huge_history_is_refused_at_once_and_holds_nobody_up(self, server, protocol):
        """1M events: refused from the tensor shapes (400 naming hist_item_id) in well under 2 s, and good
        requests sent 50-300 ms after it answer in under a second (before: about 7 s for both)."""
        from merlin_longseq.serving.client import ScoringClient, ScoringError

        server, items = server
        url = server.http_url if protocol == "http" else server.grpc_url
        good = _request(items)
        n = 1_000_000
        bad = dict(good, hist_item_id=np.full(n, items[0]), hist_action=np.ones(n, np.int64),
                   hist_timestamp=np.arange(n), request_time=n + 1)
        with ScoringClient(url, protocol=protocol, model_name="stca") as client:
            expected = client.score(**good)["score_click"]
        results, ready = {}, threading.Barrier(4)

        def send(key, features, delay=0.0):
            # a client per thread (the HTTP client is bound to the thread that made it), connected beforehand
            with ScoringClient(url, protocol=protocol, model_name="stca") as client:
                ready.wait()
                time.sleep(delay)
                start = time.perf_counter()
                try:
                    results[key] = client.score(**features)
                except ScoringError as err:
                    results[key] = err
                results[f"{key}_s"] = time.perf_counter() - start

        threads = [threading.Thread(target=send, args=("bad", bad))]
        threads += [threading.Thread(target=send, args=(f"good{i}", good, delay))
                    for i, delay in enumerate((0.05, 0.15, 0.3))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        behind = ", ".join(f"{results[f'good{i}_s'] * 1e3:.0f}" for i in range(3))
        print(f"\n{protocol}: 1M-event history refused in {results['bad_s'] * 1e3:.0f} ms; good requests sent "
              f"50, 150, 300 ms after it answered in {behind} ms")
        refused = results["bad"]
        assert isinstance(refused, ScoringError), refused
        assert refused.status in ("400", "StatusCode.INVALID_ARGUMENT"), refused.status
        assert re.search(r"request 0 has a history of 1000000 events \(hist_item_id\), more than the maximum 16",
                         str(refused)), str(refused)
        assert results["bad_s"] < 2.0
        for i in range(3):
            np.testing.assert_array_equal(results[f"good{i}"]["score_click"], expected)
            assert results[f"good{i}_s"] < 1.0, results

    def test_too_many_candidates_are_refused_naming_the_field(self, server):
        from merlin_longseq.serving.client import ScoringClient, ScoringError

        server, items = server
        good = _request(items)
        with ScoringClient(server.http_url, model_name="stca") as client:
            expected = client.score(**good)["score_click"]
            start = time.perf_counter()
            with pytest.raises(ScoringError, match=rf"request 0 has {DEFAULT_MAX_CANDIDATES + 1} candidates "
                                                   rf"\(cand_item_id\), more than the maximum "
                                                   rf"{DEFAULT_MAX_CANDIDATES}") as refused:
                client.score(**dict(good, cand_item_id=np.full(DEFAULT_MAX_CANDIDATES + 1, items[5])))
            took = time.perf_counter() - start
            assert refused.value.status == "400"
            start = time.perf_counter()
            np.testing.assert_array_equal(client.score(**good)["score_click"], expected)
            after = time.perf_counter() - start
        print(f"\n{DEFAULT_MAX_CANDIDATES + 1} candidates refused in {took * 1e3:.0f} ms, next request "
              f"{after * 1e3:.0f} ms")
        assert took < 2.0 and after < 1.0


def test_sigkill_of_tritonserver_is_reported_cleaned_up_and_a_restart_scores_the_same(plain_repo, tmp_path):
    from merlin_longseq.serving.client import ScoringClient, ScoringError
    from merlin_longseq.serving.server import TritonServer

    items = list(range(3, 21))
    requests = [_request(items, length=k, candidates=(0, 1, 2)) for k in (1, 4, 9)]
    served = Served(plain_repo, tmp_path, "--max-request-bytes", "4096")
    try:
        with ScoringClient(served.http, model_name="stca") as client:
            before = [client.score(**r)["score_click"] for r in requests]
            # the byte cap override reaches the executor: 20 small requests in one call are over 4096 bytes
            inputs = []
            for name, value in requests[2].items():
                if name in client.list_columns:
                    values = np.tile(np.asarray(value, np.int64), 20)
                    tensors = {f"{name}__values": values,
                               f"{name}__offsets": np.linspace(0, values.size, 21).astype(np.int32)}
                else:
                    tensors = {name: np.full(20, value, np.int64)}
                for tensor_name, data in tensors.items():
                    tensor = client._tc.InferInput(tensor_name, list(data.shape),
                                                   "INT32" if data.dtype == np.int32 else "INT64")
                    tensor.set_data_from_numpy(data)
                    inputs.append(tensor)
            with pytest.raises(ScoringError, match="more than this server's cap of 4096"):
                client.infer(inputs)
        members = _group(served.pid)
        assert len(members) >= 2 and _shm(served.shm_prefix), (members, served.shm_prefix)  # server + stub(s)
        stop, errors = threading.Event(), []

        def load():
            with ScoringClient(served.http, model_name="stca") as c:
                while not stop.is_set():
                    try:
                        c.score(**requests[0])
                    except Exception as err:  # noqa: BLE001  (the kill cuts this client off)
                        errors.append(err)
                        return

        threads = [threading.Thread(target=load) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        os.kill(served.pid, signal.SIGKILL)
        code = served.proc.wait(timeout=60)
        stop.set()
        for t in threads:
            t.join(timeout=30)
        out = served.out
        assert code == 1, out
        assert re.search(rf"tritonserver \(pid {served.pid}\) exited killed by SIGKILL without being asked to stop",
                         out), out
        assert _group(served.pid) == [], _group(served.pid)  # the orphaned python-backend stubs are gone
        assert _shm(served.shm_prefix) == []
    finally:
        served.close()
    with TritonServer(str(plain_repo), exit_timeout_s=10, log_file=str(tmp_path / "restart.log")) as server:
        with ScoringClient(server.http_url, model_name="stca") as client:
            after = [client.score(**r)["score_click"] for r in requests]
        prefix, pgid = server.shm_prefix, server.process.pid
    for old, new in zip(before, after):
        np.testing.assert_array_equal(new, old)
    assert _group(pgid) == [] and _shm(prefix) == []  # a clean stop leaves nothing either


def test_sigterm_under_sustained_load_finishes_what_was_sent_and_leaves_nothing(workflow_repo, tmp_path):
    """2 HTTP + 2 gRPC clients keep sending through SIGTERM (exit timeout 30 s). Every request sent before
    the signal is answered with the right scores (they call the workflow model, which fails once Triton itself
    shuts down); later ones are answered, or refused cleanly; the CLI exits 0 well within the exit timeout."""
    from merlin_longseq.serving.client import ScoringClient, ScoringError

    repo, items = workflow_repo
    served = Served(repo, tmp_path, exit_timeout=30)
    good = _request(items)
    records, lock, halt = [], threading.Lock(), threading.Event()
    try:
        with ScoringClient(served.http, model_name="stca") as client:
            expected = client.score(**good)["score_click"]

        def worker(protocol):
            url = served.http if protocol == "http" else served.grpc
            with ScoringClient(url, protocol=protocol, model_name="stca") as client:
                while not halt.is_set():
                    sent = time.monotonic()
                    try:
                        scores = client.score(**good)["score_click"]
                        outcome = "ok" if np.array_equal(scores, expected) else "wrong scores"
                    except ScoringError as err:
                        if "internal error" in str(err) or err.status in ("500", "StatusCode.INTERNAL"):
                            outcome = f"error: {err.status} {err}"  # e.g. an accepted request cut short
                        elif "shutting down" in str(err):
                            outcome = "refused"  # by the drain: UNAVAILABLE, retry elsewhere
                        else:
                            outcome = f"gone ({err.status})"  # unloaded model, closed server: nothing accepted
                    except Exception as err:  # noqa: BLE001  (a closed HTTP connection: the server is gone)
                        outcome = f"gone ({type(err).__name__})"
                    with lock:
                        records.append((sent, protocol, outcome))
                    if outcome.startswith("gone"):
                        return
                    if outcome == "refused":
                        time.sleep(0.005)

        threads = [threading.Thread(target=worker, args=(p,)) for p in ("http", "http", "grpc", "grpc")]
        for t in threads:
            t.start()
        time.sleep(1.5)
        signalled = time.monotonic()
        served.proc.send_signal(signal.SIGTERM)
        code = served.proc.wait(timeout=90)
        took = time.monotonic() - signalled
        halt.set()
        for t in threads:
            t.join(timeout=30)
        out = served.out
    finally:
        served.close()
    before = [r for r in records if r[0] < signalled]
    after = [r for r in records if r[0] >= signalled]
    print(f"\nSIGTERM under load: CLI back in {took:.1f} s; {len(before)} requests before it, after it: "
          f"{sorted({o for _, _, o in after})}")
    assert code == 0, out
    assert "stopped" in out
    assert before and all(o == "ok" for _, _, o in before), [r for r in before if r[2] != "ok"][:5]
    assert all(o in ("ok", "refused") or o.startswith("gone") for _, _, o in after), after[-5:]
    assert took < 15, out  # Triton alone waited the whole 30 s for the HTTP clients' kept-alive connections
    assert _group(served.pid) == [], _group(served.pid)
    assert _shm(served.shm_prefix) == []
