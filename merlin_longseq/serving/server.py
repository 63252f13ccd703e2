"""Start and stop a real Triton Inference Server on 127.0.0.1 for a model repository.

The server is the one inside the nvidia-pytriton wheel (`serve` extra): a tritonserver binary with the
python backend only (docs/SERVING.md). What it needs, all set up here (see ../shared/docs/ENVIRONMENT.md):
  - a backend directory whose python/ holds libtriton_python.so AND the python-backend stub built for this
    Python (the server looks for the stub only there): we link them into a private folder;
  - LD_LIBRARY_PATH with the lib dir of the Python that built the venv (the stub links libpython);
  - the venv's bin first on PATH: the stub runs Python isolated (PYTHONPATH is ignored) and takes the
    `python3` it finds, so our package and merlin-systems must be importable by that interpreter.

The wrapper owns tritonserver's process group. tritonserver runs in a session of its own (its python-backend
stubs join that group) with a shared-memory prefix of its own (`--backend-config=python,
shm-region-prefix-name=...`). When tritonserver ends for any reason (stop(), a crash, SIGKILL from outside) a
watcher thread SIGKILLs whatever is left of the group (the stubs outlive a killed tritonserver), reaps it and
removes the server's /dev/shm files. stop() drains first and then sends SIGTERM (see stop()): requests in
flight finish, later ones are refused as UNAVAILABLE, and clients that keep connections open cannot hold the
shutdown up for the whole exit timeout.
"""
from __future__ import annotations

import atexit
import functools
import glob
import importlib.util
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref

from merlin_longseq.serving.admission import (DRAIN_ENV, MAX_BYTES_ENV, begin_drain, executors_idle,
                                              repository_byte_cap)

log = logging.getLogger(__name__)


ADMIN_HEADER = "merlin-longseq-admin"
ADMIN_APIS = ("shared-memory", "model-repository", "model-config", "trace", "logging")
_SAFE_PATH = re.compile(r"[A-Za-z0-9_./+-]+")
SHM_DIR = "/dev/shm"
UNLOAD_GRACE_S = 15  # after SIGTERM (nothing in flight any more): models unload and the stubs exit
GROUP_EXIT_TIMEOUT_S = 10  # SIGKILLed processes are gone within this (D-state waits aside)


class ServerError(RuntimeError):
    """The server could not be found, started or made ready."""


def _pytriton_root() -> str:
    # located, not imported: pytriton's __init__ imports its own client stack (tritonclient, wrapt, ...), which
    # a machine that only runs the server binary need not have
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError("the Triton server comes with the `serve` extra: pip install "
                          "'merlin-longseq[serve]' (nvidia-pytriton)")
    return os.path.join(list(spec.submodule_search_locations)[0], "tritonserver")


def find_tritonserver() -> str:
    binary = os.path.join(_pytriton_root(), "bin", "tritonserver")
    if not os.access(binary, os.X_OK):
        raise ServerError(f"no tritonserver binary at {binary}")
    return binary


def prepare_backend_dir(root: str | None = None) -> str:
    """A backend directory with python/{libtriton_python.so, triton_python_backend_utils.py, stub}."""
    source = _pytriton_root()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = os.path.join(source, "python_backend_stubs", version, "triton_python_backend_stub")
    if not os.path.exists(stub):
        raise ServerError(f"the Triton wheel has no python-backend stub for Python {version}")
    root = root or tempfile.mkdtemp(prefix="merlin-longseq-backends-")
    target = os.path.join(root, "python")
    os.makedirs(target, exist_ok=True)
    links = {name: os.path.join(source, "backends", "python", name)
             for name in ("libtriton_python.so", "triton_python_backend_utils.py")}
    links["triton_python_backend_stub"] = stub
    for name, path in links.items():
        link = os.path.join(target, name)
        if not os.path.lexists(link):
            os.symlink(path, link)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_environment() -> dict:
    env = dict(os.environ)
    site_packages = os.path.dirname(os.path.dirname(_pytriton_root()))
    libdirs = [sysconfig.get_config_var("LIBDIR"), os.path.join(site_packages, "nvidia_pytriton.libs")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join([d for d in libdirs if d] + [env.get("LD_LIBRARY_PATH", "")])
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    # the stub's Python may otherwise pick up several threads per model instance on a small machine
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@functools.lru_cache(maxsize=None)
def binary_has_option(binary: str, option: str) -> bool:
    """Whether a tritonserver build lists a command-line option in its --help (run once per binary).

    Triton 2.51, the wheel's, has no `--http-max-input-size`; later builds do, and then the HTTP body cap is
    Triton's own. (Scanning the binary is no shortcut: names over 15 characters are not stored whole.)
    """
    try:
        shown = subprocess.run([binary, "--help"], env=server_environment(), capture_output=True, text=True,
                               timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return f"--{option}" in shown.stdout + shown.stderr


def _term_when_parent_dies(parent: int) -> None:
    """In the child before exec (Linux): SIGTERM the server when the thread that started it dies, even by
    SIGKILL of the whole wrapper, so a killed `merlin-longseq serve` or test never leaves a server behind.
    SIGTERM, not SIGKILL: Triton then shuts down itself and its stubs, which a SIGKILL would orphan."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the wrapper died before prctl took effect: nobody would stop us
        os.kill(os.getpid(), signal.SIGKILL)


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, from /proc (Linux; empty elsewhere)."""
    members = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat, encoding="utf-8", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(stat.split("/")[2]))
    return members


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "with an unknown status"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"with code {code}"


def _stop_at_exit(ref) -> None:
    server = ref()
    if server is not None:
        server.close()


class TritonServer:
    """A tritonserver process bound to 127.0.0.1. Use as a context manager or call start()/close().

    exit_timeout_s:    how long a stop waits for the requests in flight to finish (also Triton's
                       --exit-timeout-secs).
    drain_grace_s:     after stop() begins, requests that start executing later than this are refused as
                       UNAVAILABLE (requests queued when the stop began get this long to start).
    max_request_bytes: byte cap of one request's inputs; None: derived from the repository's exported limits
                       (admission.InputCaps), enforced by the executor model before it decodes anything, and
                       by Triton's HTTP front end too where the binary has --http-max-input-size.
    After the server ends, `exited` is set, `returncode` holds tritonserver's status and `unexpected_exit`
    says why when nobody asked it to stop (the wrapper has then already cleaned up its processes and files).
    """

    def __init__(self, repo_dir: str, *, http_port: int | None = None, grpc_port: int | None = None,
                 metrics_port: int | None = None, exit_timeout_s: int = 30, log_file: str | None = None,
                 verbose: int = 0, open_admin_apis: bool = False, max_request_bytes: int | None = None,
                 drain_grace_s: float = 2.0):
        if not os.path.isdir(repo_dir):
            raise ServerError(f"model repository {repo_dir} does not exist")
        models = [d for d in sorted(os.listdir(repo_dir))
                  if os.path.isfile(os.path.join(repo_dir, d, "config.pbtxt"))]
        if not models:
            raise ServerError(f"model repository {repo_dir} holds no model (no <model>/config.pbtxt); write one "
                              "with merlin_longseq.serving.export")
        for name, port in (("http_port", http_port), ("grpc_port", grpc_port), ("metrics_port", metrics_port)):
            if port is not None and not 1 <= int(port) <= 65535:
                raise ServerError(f"{name} must lie in [1, 65535], got {port}")
        if max_request_bytes is not None and int(max_request_bytes) < 1:
            raise ServerError(f"max_request_bytes must be positive, got {max_request_bytes}")
        self.repo_dir = os.path.abspath(repo_dir)
        # shared memory, repository control, model config, trace and logging answer only requests carrying
        # admin_header (any local process could otherwise register the python backend's own shared memory and
        # crash the server): open_admin_apis=True lifts that
        self.open_admin_apis = bool(open_admin_apis)
        self.admin_header = {ADMIN_HEADER: secrets.token_hex(16)}
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.exit_timeout_s = int(exit_timeout_s)
        self.drain_grace_s = max(0.0, min(float(drain_grace_s), float(self.exit_timeout_s)))
        self.max_request_bytes = None if max_request_bytes is None else int(max_request_bytes)
        self.request_byte_cap = self.max_request_bytes or repository_byte_cap(self.repo_dir)
        # every /dev/shm file of this server's python backend starts with this, and no other server's does
        self.shm_prefix = f"merlin_longseq_{os.getpid()}_{secrets.token_hex(4)}_"
        self.log_file = log_file
        self.verbose = int(verbose)
        self.process: subprocess.Popen | None = None
        self.exited = threading.Event()
        self.unexpected_exit: str | None = None
        self.forced = False  # stop() SIGKILLed a drained tritonserver (clients kept connections, slow unload)
        self.leftovers: list[int] = []  # group members that survived SIGKILL (should stay empty)
        self._stopping = False
        self._lock = threading.Lock()  # one clean-up, and no signal to a pid once it is reaped
        self._log = None
        self._backend_dir: str | None = None
        self._atexit = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.returncode

    @property
    def drain_file(self) -> str | None:
        return None if self._backend_dir is None else os.path.join(self._backend_dir, "draining")

    def command(self, backend_dir: str, repo_dir: str | None = None) -> list[str]:
        binary = find_tritonserver()
        restricted = []
        if not self.open_admin_apis:
            rule = f"{','.join(ADMIN_APIS)}:{ADMIN_HEADER}={self.admin_header[ADMIN_HEADER]}"
            restricted = [f"--http-restricted-api={rule}", f"--grpc-restricted-protocol={rule}"]
        body_cap = []
        if self.request_byte_cap and binary_has_option(binary, "http-max-input-size"):
            body_cap = [f"--http-max-input-size={self.request_byte_cap}"]
        return [
            binary, f"--model-repository={repo_dir or self.repo_dir}", f"--backend-directory={backend_dir}",
            *restricted, *body_cap,
            "--http-address=127.0.0.1", f"--http-port={self.http_port}",
            "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
            "--metrics-address=127.0.0.1", f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false", "--pinned-memory-pool-byte-size=0",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            f"--exit-timeout-secs={self.exit_timeout_s}", f"--log-verbose={self.verbose}",
            "--strict-readiness=true",
        ]

    def start(self, timeout_s: float = 120, progress: bool = False,
              cancel: threading.Event | None = None) -> "TritonServer":
        """Start tritonserver and wait until it is ready (cancel: an event that stops the wait, e.g. SIGTERM)."""
        if self.process is not None:
            raise ServerError("this TritonServer was started already; make a new one to start again")
        backend_dir = self._backend_dir = prepare_backend_dir()
        # Triton's python backend starts its stubs through a shell with the model path unquoted: a repository
        # path with shell characters would run them. Serve such a path through a link of plain characters.
        served = self.repo_dir
        if not _SAFE_PATH.fullmatch(served):
            served = os.path.join(backend_dir, "repository")
            os.symlink(self.repo_dir, served)
        # "a+b": appended to, and readable for log_tail (an "ab" file made every failed start end in
        # io.UnsupportedOperation instead of the server's own message)
        self._log = open(self.log_file, "a+b") if self.log_file else tempfile.TemporaryFile()
        env = server_environment()
        env[DRAIN_ENV] = self.drain_file
        if self.max_request_bytes:
            env[MAX_BYTES_ENV] = str(self.max_request_bytes)
        command = self.command(backend_dir, served)
        spawned, failure = threading.Event(), []

        def run():
            # Started from this long-lived thread: PR_SET_PDEATHSIG fires when the THREAD that forked ends, so a
            # short-lived caller thread (a thread pool, a test helper) would otherwise take the server with it.
            try:
                self.process = subprocess.Popen(command, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                                start_new_session=True,
                                                preexec_fn=functools.partial(_term_when_parent_dies, os.getpid()))
            except BaseException as err:  # noqa: BLE001  (handed to start())
                failure.append(err)
                return
            finally:
                spawned.set()
            self._watch()

        threading.Thread(target=run, name=f"tritonserver-{self.http_port}", daemon=True).start()
        spawned.wait()
        if failure:
            raise ServerError(f"could not start tritonserver: {failure[0]}") from failure[0]
        self._atexit = functools.partial(_stop_at_exit, weakref.ref(self))
        atexit.register(self._atexit)  # an interpreter that exits without close() still stops its server
        self.wait_ready(timeout_s, progress=progress, cancel=cancel)
        return self

    # ---- the process group -----------------------------------------------------------------------------------
    def _watch(self) -> None:
        """Wait for tritonserver to end, whatever ends it, then clean up after it."""
        pid = self.process.pid
        try:
            # WNOWAIT: seen but not reaped, so the pid (= the process group id) cannot be reused by another
            # process before the group is killed
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        except (AttributeError, ChildProcessError):  # no waitid here, or reaped already
            self.process.wait()
        self._clean_up()

    def _clean_up(self) -> None:
        with self._lock:
            if self.exited.is_set():
                return
            try:
                pgid = self.process.pid
                self._kill_group(pgid)  # the python-backend stubs outlive a killed tritonserver
                self.process.wait()
                deadline = time.monotonic() + GROUP_EXIT_TIMEOUT_S
                while (members := group_members(pgid)) and time.monotonic() < deadline:
                    time.sleep(0.05)
                self.leftovers = members
                if members:
                    log.error("processes %s of tritonserver's group survived SIGKILL", members)
                # only now: a stub still alive could create a file after we looked
                for path in glob.glob(os.path.join(SHM_DIR, glob.escape(self.shm_prefix) + "*")):
                    try:
                        os.unlink(path)
                    except FileNotFoundError:
                        pass
                if not self._stopping:
                    self.unexpected_exit = (f"tritonserver (pid {pgid}) exited "
                                            f"{_describe_exit(self.process.returncode)} without being asked to "
                                            "stop; its processes and shared memory are cleaned up")
                    log.error(self.unexpected_exit)
            finally:
                self.exited.set()  # even after a failed clean-up: nobody may wait for it forever

    @staticmethod
    def _kill_group(pgid: int) -> None:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # nothing left in the group

    # ---- readiness -------------------------------------------------------------------------------------------
    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def wait_ready(self, timeout_s: float, progress: bool = False, cancel: threading.Event | None = None) -> None:
        from tqdm.auto import tqdm

        start = time.monotonic()
        deadline = start + timeout_s
        with tqdm(total=round(timeout_s), desc="server start", unit="s", disable=not progress, leave=False) as bar:
            while time.monotonic() < deadline:
                if self.exited.is_set():
                    raise ServerError(f"tritonserver exited {_describe_exit(self.returncode)} while starting:\n"
                                      + self.log_tail())
                if cancel is not None and cancel.is_set():
                    self.stop()
                    raise ServerError("the start was cancelled")
                if self.is_ready():
                    return
                time.sleep(0.25)
                bar.update(round(time.monotonic() - start) - bar.n)
        self.stop()
        raise ServerError(f"tritonserver was not ready after {timeout_s:.0f} s:\n" + self.log_tail())

    def log_tail(self, chars: int = 6000) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0, os.SEEK_END)
        size = self._log.tell()
        self._log.seek(max(0, size - chars))
        return self._log.read().decode(errors="replace")

    # ---- stopping --------------------------------------------------------------------------------------------
    def stop(self, timeout_s: float | None = None) -> int | None:
        """Stop in three steps; returns tritonserver's exit status once its group and files are cleaned up.

        1. drain: requests starting later than drain_grace_s are refused (UNAVAILABLE); wait until every request
           accepted before that has finished (at most timeout_s, default the exit timeout) while the server is
           still fully up;
        2. SIGTERM: Triton unloads its models and exits, except that its HTTP front end first waits, up to the
           exit timeout, for clients to close kept-alive connections: those only get refusals now, so once such
           connections hold it up for a second, or UNLOAD_GRACE_S have passed, the group is SIGKILLed (`forced`);
        3. the watcher SIGKILLs what is left of the group, reaps it and removes the server's /dev/shm files.
        """
        if self.process is None:
            return None
        with self._lock:
            if self.exited.is_set():
                return self.returncode
            self._stopping = True
        budget = self.exit_timeout_s if timeout_s is None else float(timeout_s)
        begun = time.monotonic()
        drain = self.drain_file
        if drain:
            begin_drain(drain, min(self.drain_grace_s, budget))
            while not self.exited.wait(0.05):
                elapsed = time.monotonic() - begun
                if elapsed >= budget or (elapsed >= self.drain_grace_s and executors_idle(drain)):
                    break
        with self._lock:
            if not self.exited.is_set():
                os.kill(self.process.pid, signal.SIGTERM)  # not reaped yet (the lock), so still our process
        signalled = time.monotonic()
        while not self.exited.wait(0.1):
            waited = time.monotonic() - signalled
            if waited >= UNLOAD_GRACE_S or (waited >= 1.0 and self._clients_connected()):
                with self._lock:
                    if not self.exited.is_set():
                        self.forced = True
                        self._kill_group(self.process.pid)
                break
        self.exited.wait(GROUP_EXIT_TIMEOUT_S + 30)  # the watcher reaps and cleans up
        return self.returncode

    def _clients_connected(self) -> bool:
        """Established TCP connections on our HTTP port (server side), from /proc/net (Linux)."""
        port = f"{self.http_port:04X}"
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                with open(table, encoding="ascii") as f:
                    rows = f.read().splitlines()[1:]
            except OSError:
                continue
            for row in rows:
                fields = row.split()
                if len(fields) > 3 and fields[1].rsplit(":", 1)[-1] == port and fields[3] == "01":
                    return True
        return False

    def close(self) -> None:
        self.stop()
        if self._atexit is not None:
            atexit.unregister(self._atexit)
            self._atexit = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._backend_dir is not None:  # our private folder of symlinks
            shutil.rmtree(self._backend_dir, ignore_errors=True)
            self._backend_dir = None

    def __enter__(self) -> "TritonServer":
        if self.process is None:
            try:
                self.start()
            except BaseException:
                self.close()  # __exit__ does not run when __enter__ fails
                raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()
