"""What the executor model checks on a request before it decodes anything: size caps and the shutdown drain.

Size caps. A request's tensors arrive whole in the python backend's shared memory; converting them
(merlin-systems' tensor table, the NVTabular item encoding, RequestBatch) costs time in proportion to their
size, and one executor instance serves requests one at a time, so a 1M-event history used to hold every
request behind it for seconds before the validator refused it. `InputCaps.check` reads only the tensors'
shapes (and the few offsets of each list column) against the exported limits (merlin_longseq.json:
max_history, max_candidates) and refuses an oversized request at once, naming the column.

Drain. To stop, the server wrapper first writes a drain file: requests that start executing after its deadline
are refused with UNAVAILABLE (retry elsewhere), those accepted before it run to their end while the server is
still fully up (once Triton itself shuts down, the executor's calls to the workflow model fail with "Server not
ready"). Each executor instance keeps a busy flag, so the wrapper sends SIGTERM as soon as nothing accepted is
left running.

Standard library and numpy only: the server wrapper and the CLI import this without torch.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import mmap
import os
import time
from typing import Mapping

import numpy as np

MAX_BYTES_ENV = "MERLIN_LONGSEQ_MAX_REQUEST_BYTES"  # set by the server wrapper when the operator overrides the cap
DRAIN_ENV = "MERLIN_LONGSEQ_DRAIN_FILE"
# export(max_candidates=None) leaves the model unbounded; the server still needs a bound
DEFAULT_MAX_CANDIDATES = 16_384
MAX_REQUESTS_PER_CALL = 64  # rows of one Triton request (the client sends one; batching clients may send more)
HEADROOM_BYTES = 1 << 20  # HTTP's JSON header and framing, gRPC's message framing
MANIFEST = "merlin_longseq.json"  # the repository's manifest (repository.py writes it; here: no torch import)


class RequestTooLarge(ValueError):
    """A request over the served model's size caps (a client error: HTTP 400 / gRPC INVALID_ARGUMENT)."""


@dataclasses.dataclass(frozen=True)
class InputCaps:
    """The shape and size bounds of one served model's inputs (Triton names: `<list>__values` /
    `<list>__offsets`, scalars as they are)."""

    history: tuple[str, ...]  # list columns with one value per history event
    candidates: str
    scalars: tuple[str, ...] = ()
    max_history: int | None = None
    max_candidates: int = DEFAULT_MAX_CANDIDATES
    max_requests: int = MAX_REQUESTS_PER_CALL
    max_bytes: int | None = None  # None: derived from the other caps (call_bytes)

    @classmethod
    def from_manifest(cls, entry: Mapping, max_bytes: int | None = None) -> "InputCaps":
        """From one model's entry of merlin_longseq.json (or PredictLongSeq.describe())."""
        columns = entry["columns"]
        history = tuple(c for c in (columns.get("hist_item_id"), columns.get("hist_action"),
                                    columns.get("hist_timestamp")) if c)
        scalars = tuple(c for c in (columns.get("request_time"), columns.get("user_id")) if c)
        return cls(history=history, candidates=columns["cand_item_id"], scalars=scalars,
                   max_history=entry.get("max_history"),
                   max_candidates=entry.get("max_candidates") or DEFAULT_MAX_CANDIDATES,
                   max_bytes=max_bytes)

    @property
    def request_bytes(self) -> int | None:
        """Input bytes of one request at the caps (int64 values, int32 offsets); None without a history cap."""
        if self.max_history is None:
            return None
        lists = len(self.history) + 1
        return 8 * (len(self.history) * self.max_history + self.max_candidates) + 8 * lists + 8 * len(self.scalars)

    @property
    def call_bytes(self) -> int | None:
        """The byte cap of one call: the override, else max_requests full-size requests plus headroom."""
        if self.max_bytes:
            return self.max_bytes
        per_request = self.request_bytes
        return None if per_request is None else self.max_requests * per_request + HEADROOM_BYTES

    def check(self, arrays: Mapping[str, np.ndarray]) -> None:
        """RequestTooLarge if the inputs break a cap. Reads shapes and offsets only, never the values; offsets
        that do not describe their values are left to the request validator (they bound nothing here)."""
        for name in self.scalars:
            if name in arrays and arrays[name].size > self.max_requests:
                raise RequestTooLarge(f"{name} holds {arrays[name].size} values: more than {self.max_requests} "
                                      "requests in one call")
        lists = [(name, self.max_history, "history") for name in self.history]
        lists.append((self.candidates, self.max_candidates, "candidates"))
        for name, cap, what in lists:
            values, offsets = arrays.get(f"{name}__values"), arrays.get(f"{name}__offsets")
            if values is None or offsets is None or cap is None:
                continue  # Triton itself refuses a request that lacks a declared input
            requests = max(offsets.size - 1, 0)
            if requests > self.max_requests:
                raise RequestTooLarge(f"{name}__offsets describe {requests} requests in one call, more than the "
                                      f"maximum {self.max_requests}")
            lengths = np.diff(offsets.reshape(-1).astype(np.int64))
            sane = offsets.size >= 1 and int(offsets.flat[0]) == 0 and int(offsets.flat[-1]) == values.size
            if sane and lengths.size and int(lengths.max()) > cap:
                r = int(np.argmax(lengths > cap))
                raise RequestTooLarge(_too_long(r, int(lengths[r]), name, cap, what))
            if values.size > cap * max(requests, 1):  # offsets that lie cannot smuggle more values in
                raise RequestTooLarge(_too_long(None, values.size, name, cap * max(requests, 1), what))
        limit = self.call_bytes
        total = sum(int(a.nbytes) for a in arrays.values())
        if limit is not None and total > limit:
            raise RequestTooLarge(f"the request holds {total} bytes of input, more than this server's cap of {limit} "
                                  "(merlin-longseq serve --max-request-bytes)")


def _too_long(request: int | None, count: int, name: str, cap: int, what: str) -> str:
    who = f"request {request}" if request is not None else "the call"
    if what == "history":
        return (f"{who} has a history of {count} events ({name}), more than the maximum {cap}: send the most "
                f"recent {cap}")
    return f"{who} has {count} candidates ({name}), more than the maximum {cap}"


def repository_byte_cap(repo_dir: str) -> int | None:
    """The largest call byte cap among the models of a repository's merlin_longseq.json (None: no manifest or
    no bounded model)."""
    path = os.path.join(repo_dir, MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            models = json.load(f).get("models", {})
    except (OSError, ValueError):
        return None
    caps = []
    for entry in models.values():
        try:
            caps.append(InputCaps.from_manifest(entry).call_bytes)
        except (KeyError, TypeError):
            continue  # an entry of another format: no cap derived from it
    caps = [c for c in caps if c]
    return max(caps) if caps else None


# ---- drain -------------------------------------------------------------------------------------------------
def begin_drain(path: str, grace_s: float) -> None:
    """Server side: requests starting after now + grace_s are refused. CLOCK_MONOTONIC is one clock for every
    process of the machine (Linux), so the executor's stubs compare against the same deadline."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(repr(time.monotonic() + grace_s))
    os.replace(tmp, path)  # the executor never reads a half-written file


def executors_idle(path: str) -> bool:
    """Server side: no live executor instance is running a request (each keeps a one-byte busy flag beside the
    drain file; a dead instance's flag does not count)."""
    for flag in glob.glob(glob.escape(path) + ".busy.*"):
        try:
            pid = int(flag.rsplit(".", 1)[1])
            with open(flag, "rb") as f:
                busy = f.read(1) == b"\1"
        except (OSError, ValueError):
            continue
        if busy and _alive(pid):
            return False
    return True


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True


class Drain:
    """Executor side: refuse requests once the server wrapper's drain deadline has passed, and keep a busy flag
    the wrapper reads to know when every request accepted before it has finished."""

    def __init__(self, path: str | None = None):
        self.path = path if path is not None else os.environ.get(DRAIN_ENV)
        self._deadline: float | None = None
        self._busy = None
        if self.path:
            try:  # an mmap'ed byte: setting it costs nanoseconds per call
                with open(f"{self.path}.busy.{os.getpid()}", "w+b") as f:
                    f.write(b"\0")
                    f.flush()
                    self._busy = mmap.mmap(f.fileno(), 1)
            except (OSError, ValueError):
                self._busy = None

    def refusing(self) -> bool:
        if not self.path:
            return False
        if self._deadline is None:
            try:  # one failed open per executor call until the file appears (microseconds)
                with open(self.path, encoding="utf-8") as f:
                    self._deadline = float(f.read())
            except (OSError, ValueError):
                return False
        return time.monotonic() >= self._deadline

    def enter(self) -> bool:
        """Before a call: False when it must be refused. The flag is raised BEFORE the deadline is read, so a
        wrapper that finds every flag down after the deadline knows no accepted call is still running."""
        if self._busy is not None:
            self._busy[0] = 1
        if self.refusing():
            self.leave()
            return False
        return True

    def leave(self) -> None:
        if self._busy is not None:
            self._busy[0] = 0
