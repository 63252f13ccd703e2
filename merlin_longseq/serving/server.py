"""Start and stop a real Triton Inference Server on 127.0.0.1 for a model repository.

The server is the one inside the nvidia-pytriton wheel (`serve` extra): a tritonserver binary with the
python backend only (docs/SERVING.md). What it needs, all set up here (see ../shared/docs/ENVIRONMENT.md):
  - a backend directory whose python/ holds libtriton_python.so AND the python-backend stub built for this
    Python (the server looks for the stub only there): we link them into a private folder;
  - LD_LIBRARY_PATH with the lib dir of the Python that built the venv (the stub links libpython);
  - the venv's bin first on PATH: the stub runs Python isolated (PYTHONPATH is ignored) and takes the
    `python3` it finds, so our package and merlin-systems must be importable by that interpreter.
Stopping sends SIGTERM: Triton stops accepting requests, lets in-flight ones finish (up to
exit_timeout_s), unloads the models and exits.
"""
from __future__ import annotations

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
import time
import urllib.error
import urllib.request


ADMIN_HEADER = "merlin-longseq-admin"
ADMIN_APIS = ("shared-memory", "model-repository", "model-config", "trace", "logging")
_SAFE_PATH = re.compile(r"[A-Za-z0-9_./+-]+")


class ServerError(RuntimeError):
    """The server could not be found, started or made ready."""


def _pytriton_root() -> str:
    try:
        import pytriton
    except ImportError:
        raise ServerError("the Triton server comes with the `serve` extra: pip install "
                          "'merlin-longseq[serve]' (nvidia-pytriton)") from None
    return os.path.join(os.path.dirname(pytriton.__file__), "tritonserver")


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


def _term_when_parent_dies() -> None:
    """In the child before exec (Linux): SIGTERM the server when its launcher dies, even by SIGKILL, so a
    killed `merlin-longseq serve` or test never leaves an orphaned server behind."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class TritonServer:
    """A tritonserver process bound to 127.0.0.1. Use as a context manager or call start()/stop()."""

    def __init__(self, repo_dir: str, *, http_port: int | None = None, grpc_port: int | None = None,
                 metrics_port: int | None = None, exit_timeout_s: int = 30, log_file: str | None = None,
                 verbose: int = 0, open_admin_apis: bool = False):
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
        self.log_file = log_file
        self.verbose = int(verbose)
        self.process: subprocess.Popen | None = None
        self._log = None
        self._backend_dir: str | None = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def command(self, backend_dir: str, repo_dir: str | None = None) -> list[str]:
        restricted = []
        if not self.open_admin_apis:
            rule = f"{','.join(ADMIN_APIS)}:{ADMIN_HEADER}={self.admin_header[ADMIN_HEADER]}"
            restricted = [f"--http-restricted-api={rule}", f"--grpc-restricted-protocol={rule}"]
        return [
            find_tritonserver(), f"--model-repository={repo_dir or self.repo_dir}", f"--backend-directory={backend_dir}",
            *restricted,
            "--http-address=127.0.0.1", f"--http-port={self.http_port}",
            "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
            "--metrics-address=127.0.0.1", f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false", "--pinned-memory-pool-byte-size=0",
            f"--exit-timeout-secs={self.exit_timeout_s}", f"--log-verbose={self.verbose}",
            "--strict-readiness=true",
        ]

    def start(self, timeout_s: float = 120, progress: bool = False) -> "TritonServer":
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
        self.process = subprocess.Popen(self.command(backend_dir, served), env=server_environment(), stdout=self._log,
                                        stderr=subprocess.STDOUT, start_new_session=True,
                                        preexec_fn=_term_when_parent_dies)
        self.wait_ready(timeout_s, progress=progress)
        return self

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def wait_ready(self, timeout_s: float, progress: bool = False) -> None:
        from tqdm.auto import tqdm

        start = time.monotonic()
        deadline = start + timeout_s
        with tqdm(total=round(timeout_s), desc="server start", unit="s", disable=not progress, leave=False) as bar:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise ServerError(f"tritonserver exited with code {self.process.returncode} while starting:\n"
                                      + self.log_tail())
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

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGTERM, then wait: in-flight requests finish before the server exits."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s or self.exit_timeout_s + 30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def close(self) -> None:
        self.stop()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._backend_dir is not None:  # our private folder of symlinks
            shutil.rmtree(self._backend_dir, ignore_errors=True)
            self._backend_dir = None

    def __enter__(self) -> "TritonServer":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.close()
