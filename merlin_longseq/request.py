"""The request core: one jagged request batch, one column contract and one validator for every caller.

A ranking request is one user's history (events strictly before the request time, oldest first) plus the
candidates to score. Models, the Transformers4Rec blocks, serving and distributed training all hold requests
as a `RequestBatch` and check them with `validate_request` (or, inside a model's forward, with the cheaper
`check_history` / `check_candidates` that the validator is built from), so a request that training refuses is
refused by serving with the same message, and the other way round.

Layout (the jagged convention of merlin_longseq.jagged): R requests back to back,
    history     hist_item_ids / hist_actions / hist_timestamps [N], hist_offsets [R + 1] (int64, from 0)
    request     request_time [R], user_ids [R]                     (optional: not every model reads them)
    candidates  cand_item_ids [C], cand_offsets [R + 1]
    labels      labels [C, K] float (training only), label_names (K names)
The longest history and candidate list are kept as Python ints (`max_history_len`, `max_candidates`), read
once when the batch is built from host data, so kernels launched on the batch need no device sync.

Imports torch and the jagged utilities only: everything above it (models, serving, T4R) may import it.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch

from merlin_longseq.jagged import (
    JaggedInputError,
    jagged_positions,
    lengths_from_offsets,
    lengths_from_padding,
    offsets_from_lengths,
    padded_to_jagged,
    validate_offsets,
)

# time gaps are bucketed in int64 seconds (or ns); anything beyond this is a unit mistake, not a real gap
_MAX_TIME_GAP = 1 << 62


class RequestError(JaggedInputError):
    """A request (or batch of requests) that breaks the request contract; the message names the field."""


@dataclass(frozen=True)
class RequestColumns:
    """Column names of request-grouped rows (the output of workflows.request_grouping.RequestGrouping).

    hist_action / hist_timestamp / request_time / user_id may be None where a model does not read them
    (an HSTU next-item model needs the items only). One contract for the T4R loader, serving and the CLI.
    """

    hist_item_id: str = "hist_item_id"
    hist_action: str | None = "hist_action"
    hist_timestamp: str | None = "hist_timestamp"
    request_time: str | None = "request_time"
    user_id: str | None = "user_id"
    cand_item_id: str = "cand_item_id"

    @property
    def lists(self) -> list[str]:
        """The list columns, history first, candidates last."""
        return [c for c in (self.hist_item_id, self.hist_action, self.hist_timestamp, self.cand_item_id) if c]

    @property
    def scalars(self) -> list[str]:
        return [c for c in (self.request_time, self.user_id) if c]

    @property
    def all(self) -> list[str]:
        return self.lists + self.scalars

    def without(self, *fields_: str) -> "RequestColumns":
        """A copy with the named optional columns switched off (set to None)."""
        return dataclasses.replace(self, **{f: None for f in fields_})


@dataclass(frozen=True)
class RequestLimits:
    """What a request must satisfy for one model (built from its config) or one served endpoint."""

    num_items: int  # item ids lie in [min_item_id, num_items]
    num_actions: int | None = None  # actions lie in [0, num_actions]; None: not checked
    num_users: int = 0  # > 0: user ids lie in [0, num_users]
    min_item_id: int = 1  # 0 is padding: a real event or candidate never has it
    max_history: int | None = None  # longest accepted history (None: unbounded)
    min_history: int = 0
    max_candidates: int | None = None
    min_candidates: int = 1  # 0: a request may send no candidates (next-item top-k ranks the catalogue)
    unknown_item_ids: tuple[int, ...] = ()  # ids meaning "not in the vocabulary" (Categorify: 1 null, 2 OOV)
    # an unknown item in a history is read as the out-of-vocabulary id (the catalogue moves on; one new item must
    # not fail an active user's request); True refuses it like an unknown candidate
    refuse_unknown_history: bool = False
    needs_actions: bool = False
    needs_timestamps: bool = False
    needs_request_time: bool = False
    needs_user_ids: bool = False

    @classmethod
    def of(cls, cfg, **overrides) -> "RequestLimits":
        """The limits a ranking config implies (num_items, num_actions, and user ids when it reads them)."""
        users = cfg.num_users if getattr(cfg, "uses_users", bool(cfg.num_users)) else 0
        values = dict(num_items=cfg.num_items, num_actions=cfg.num_actions, num_users=users, needs_actions=True,
                      needs_timestamps=True, needs_request_time=True, needs_user_ids=bool(users))
        values.update(overrides)
        return cls(**values)


def _int_tensor(name: str, value, dims: int = 1) -> torch.Tensor | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        tensor = value
    else:
        array = np.asarray(value)
        if array.dtype.kind not in "iu":
            raise RequestError(f"{name} must hold integers, got dtype {array.dtype}")
        if array.dtype.kind == "u" and array.size and int(array.max()) > np.iinfo(np.int64).max:
            raise RequestError(f"{name} holds ids above the int64 maximum")
        tensor = torch.from_numpy(np.ascontiguousarray(array.astype(np.int64, copy=False)))
    if tensor.is_floating_point() or tensor.dtype == torch.bool:
        raise RequestError(f"{name} must hold integers, got {tensor.dtype}")
    if tensor.dim() != dims:
        raise RequestError(f"{name} must be {dims}-D, got shape {tuple(tensor.shape)}")
    return tensor.to(torch.int64)


def _flat(value):
    """A per-request scalar column ([R], [R, 1] or a scalar) as 1-D, None kept."""
    if value is None:
        return None
    return value.reshape(-1) if isinstance(value, torch.Tensor) else np.asarray(value).reshape(-1)


@dataclass
class RequestBatch:
    """R requests, jagged (see the module docstring). Build one with from_arrays, from_padded or select."""

    hist_item_ids: torch.Tensor
    hist_offsets: torch.Tensor
    cand_item_ids: torch.Tensor
    cand_offsets: torch.Tensor
    hist_actions: torch.Tensor | None = None
    hist_timestamps: torch.Tensor | None = None
    request_time: torch.Tensor | None = None
    user_ids: torch.Tensor | None = None
    labels: torch.Tensor | None = None  # [C, K] float
    label_names: tuple[str, ...] = ()
    max_history_len: int | None = field(default=None, compare=False)  # None: not read yet (device offsets)
    max_candidates: int | None = field(default=None, compare=False)

    def __post_init__(self):
        self.label_names = tuple(self.label_names)
        for name in ("max_history_len", "max_candidates"):
            # read from host offsets only: on a device it would cost a sync per batch (None: not known)
            if getattr(self, name) is None and self.hist_offsets.device.type == "cpu":
                offsets = self.hist_offsets if name == "max_history_len" else self.cand_offsets
                lengths = lengths_from_offsets(offsets) if offsets.numel() > 1 else offsets.new_zeros(1)
                setattr(self, name, int(lengths.max()))

    # ---- shape -------------------------------------------------------------------------------------------
    @property
    def num_requests(self) -> int:
        return self.hist_offsets.numel() - 1

    @property
    def history_lengths(self) -> torch.Tensor:
        return lengths_from_offsets(self.hist_offsets)

    @property
    def candidate_counts(self) -> torch.Tensor:
        return lengths_from_offsets(self.cand_offsets)

    @property
    def history(self) -> dict:
        """The keyword arguments of every ranking model's encode_user."""
        return dict(hist_item_ids=self.hist_item_ids, hist_actions=self.hist_actions,
                    hist_timestamps=self.hist_timestamps, hist_offsets=self.hist_offsets,
                    request_time=self.request_time, user_ids=self.user_ids)

    @property
    def model_inputs(self) -> dict:
        """The keyword arguments of every ranking model's forward (history and candidates)."""
        return dict(self.history, cand_item_ids=self.cand_item_ids, cand_offsets=self.cand_offsets)

    # ---- construction ------------------------------------------------------------------------------------
    @classmethod
    def from_arrays(cls, *, hist_item_ids, hist_offsets, cand_item_ids, cand_offsets, hist_actions=None,
                    hist_timestamps=None, request_time=None, user_ids=None, labels=None,
                    label_names: Sequence[str] = ()) -> "RequestBatch":
        """Numpy arrays, lists or tensors -> int64 tensors (offsets may come as int32, as Triton sends them)."""
        labels_t = None
        if labels is not None:
            labels_t = torch.as_tensor(np.asarray(labels, dtype=np.float32) if not isinstance(labels, torch.Tensor)
                                       else labels).float()
            if labels_t.dim() == 1:
                labels_t = labels_t[:, None]
        return cls(hist_item_ids=_int_tensor("hist_item_ids", hist_item_ids),
                   hist_offsets=_int_tensor("hist_offsets", hist_offsets),
                   cand_item_ids=_int_tensor("cand_item_ids", cand_item_ids),
                   cand_offsets=_int_tensor("cand_offsets", cand_offsets),
                   hist_actions=_int_tensor("hist_actions", hist_actions),
                   hist_timestamps=_int_tensor("hist_timestamps", hist_timestamps),
                   request_time=_int_tensor("request_time", _flat(request_time)),
                   user_ids=_int_tensor("user_ids", _flat(user_ids)),
                   labels=labels_t, label_names=tuple(label_names))

    @classmethod
    def from_lengths(cls, *, hist_lengths, cand_lengths, **arrays) -> "RequestBatch":
        """Like from_arrays, with per-request lengths instead of offsets."""
        return cls.from_arrays(hist_offsets=offsets_from_lengths(_int_tensor("hist_lengths", hist_lengths)),
                               cand_offsets=offsets_from_lengths(_int_tensor("cand_lengths", cand_lengths)),
                               **arrays)

    @classmethod
    def from_padded(cls, inputs: Mapping[str, torch.Tensor], columns: RequestColumns | None = None,
                    targets: Mapping[str, torch.Tensor] | None = None) -> "RequestBatch":
        """A padded request dict (request_dataloader's batches; 0 = padding, right-padded) -> a jagged batch.

        targets: {label name: [B, C]} label lists aligned with the candidates (optional).
        """
        columns = columns or RequestColumns()

        def column(name):
            if name not in inputs:
                if f"{name}__values" in inputs:
                    raise RequestError(f"{name} arrives ragged ({name}__values / __offsets): load the data with "
                                       "request_dataloader, which pads every list column")
                raise RequestError(f"the request needs the input column {name!r}; got {sorted(inputs)}")
            return inputs[name]

        def padded(name):
            values = column(name)
            if values.dim() != 2:
                raise RequestError(f"{name} must be a padded list column [batch, length], got shape "
                                   f"{tuple(values.shape)}")
            if values.is_floating_point():
                raise RequestError(f"{name} must hold integers, got {values.dtype} (an NVTabular float pad value "
                                   "turns list<int64> into list<double>: pass pad_value=0)")
            return values

        hist = padded(columns.hist_item_id)
        hist_lengths = lengths_from_padding(hist)
        hist_items, hist_offsets = padded_to_jagged(hist, hist_lengths)

        def aligned(name):
            values = padded(name)
            if values.shape != hist.shape:
                raise RequestError(f"{name} must have one value per history event: shape {tuple(values.shape)} "
                                   f"!= {columns.hist_item_id} {tuple(hist.shape)}")
            return padded_to_jagged(values, hist_lengths)[0]

        cand = padded(columns.cand_item_id)
        cand_lengths = lengths_from_padding(cand)
        cand_items, cand_offsets = padded_to_jagged(cand, cand_lengths)
        labels, names = None, ()
        if targets:
            names = tuple(targets)
            parts = []
            for name in names:
                target = targets[name]
                if target.shape != cand.shape:
                    raise RequestError(f"labels {name!r} have shape {tuple(target.shape)} but the candidates "
                                       f"{tuple(cand.shape)}: a label list must be aligned with "
                                       f"{columns.cand_item_id}")
                parts.append(padded_to_jagged(target, cand_lengths)[0].float())
            labels = torch.stack(parts, dim=1)
        scalar = lambda name: column(name).reshape(-1) if name else None  # noqa: E731  ([B, 1] from the loader)
        return cls(hist_item_ids=hist_items, hist_offsets=hist_offsets, cand_item_ids=cand_items,
                   cand_offsets=cand_offsets,
                   hist_actions=aligned(columns.hist_action) if columns.hist_action else None,
                   hist_timestamps=aligned(columns.hist_timestamp) if columns.hist_timestamp else None,
                   request_time=scalar(columns.request_time), user_ids=scalar(columns.user_id),
                   labels=labels, label_names=names)  # maxima: read by __post_init__ on the host only

    # ---- views -------------------------------------------------------------------------------------------
    def select(self, rows) -> "RequestBatch":
        """The requests `rows` (in that order) as a new batch."""
        rows = torch.as_tensor(np.asarray(rows, dtype=np.int64) if not isinstance(rows, torch.Tensor) else rows,
                               dtype=torch.int64).to(self.hist_offsets.device)
        hist_pos, hist_offsets = _gather_positions(self.hist_offsets, rows)
        cand_pos, cand_offsets = _gather_positions(self.cand_offsets, rows)
        pick = lambda t, idx: None if t is None else t[idx]  # noqa: E731
        return RequestBatch(
            hist_item_ids=self.hist_item_ids[hist_pos], hist_offsets=hist_offsets,
            cand_item_ids=self.cand_item_ids[cand_pos], cand_offsets=cand_offsets,
            hist_actions=pick(self.hist_actions, hist_pos), hist_timestamps=pick(self.hist_timestamps, hist_pos),
            request_time=pick(self.request_time, rows), user_ids=pick(self.user_ids, rows),
            labels=pick(self.labels, cand_pos), label_names=self.label_names)

    def request(self, r: int) -> "RequestBatch":
        """Request r alone (a batch of one)."""
        return self.select([r])

    def recent(self, max_len: int) -> "RequestBatch":
        """Every history cut to its max_len most recent events (candidates and labels unchanged)."""
        if max_len < 0:
            raise ValueError(f"max_len must be >= 0, got {max_len}")
        lengths = self.history_lengths
        kept = lengths.clamp(max=max_len)
        seq_index, positions = jagged_positions(self.hist_offsets)
        keep = positions >= (lengths - kept)[seq_index]
        pick = lambda t: None if t is None else t[keep]  # noqa: E731
        return dataclasses.replace(self, hist_item_ids=self.hist_item_ids[keep], hist_offsets=offsets_from_lengths(kept),
                                   hist_actions=pick(self.hist_actions), hist_timestamps=pick(self.hist_timestamps),
                                   max_history_len=None if self.max_history_len is None
                                   else min(self.max_history_len, max_len))

    def per_target(self) -> "RequestBatch":
        """The naive layout RLB is measured against: every candidate becomes its own request with its own copy
        of its request's history (scores come out in the same candidate order)."""
        owner = torch.repeat_interleave(torch.arange(self.num_requests, device=self.cand_offsets.device),
                                        self.candidate_counts)  # [C]
        copies = self.select(owner)
        return dataclasses.replace(copies, cand_item_ids=self.cand_item_ids, labels=self.labels,
                                   cand_offsets=torch.arange(self.cand_item_ids.shape[0] + 1,
                                                             device=self.cand_offsets.device),
                                   max_candidates=1 if self.cand_item_ids.numel() else 0)

    @classmethod
    def from_columns(cls, column, columns: "RequestColumns") -> "RequestBatch":
        """From request-contract columns; column(name) -> (values, offsets or None for a scalar column). The one
        reading of a served request's columns (the ensemble's step and the model-only Triton model)."""
        hist_items, hist_offsets = column(columns.hist_item_id)
        cand_items, cand_offsets = column(columns.cand_item_id)
        if hist_offsets is None or cand_offsets is None:
            raise RequestError(f"{columns.hist_item_id} and {columns.cand_item_id} must be ragged list columns")
        arrays = dict(hist_item_ids=hist_items, hist_offsets=hist_offsets, cand_item_ids=cand_items,
                      cand_offsets=cand_offsets)
        for field_name, name in (("hist_actions", columns.hist_action), ("hist_timestamps", columns.hist_timestamp)):
            if name:
                values, offsets = column(name)
                if offsets is not None and not np.array_equal(np.asarray(offsets), np.asarray(hist_offsets)):
                    raise RequestError(f"{name} must have one value per history event (as {columns.hist_item_id})")
                arrays[field_name] = values
        for field_name, name in (("request_time", columns.request_time), ("user_ids", columns.user_id)):
            if name:
                arrays[field_name] = np.asarray(column(name)[0]).reshape(-1)
        return cls.from_arrays(**arrays)

    @classmethod
    def concat(cls, batches: Sequence["RequestBatch"]) -> "RequestBatch":
        """Several batches as one, requests in order (offsets rebased); labels are not carried."""
        def cat(name):
            parts = [getattr(b, name) for b in batches]
            return None if parts[0] is None else torch.cat(parts)

        def offsets(name):
            lengths = torch.cat([lengths_from_offsets(getattr(b, name)) for b in batches])
            return offsets_from_lengths(lengths)

        return cls(hist_item_ids=cat("hist_item_ids"), hist_offsets=offsets("hist_offsets"),
                   cand_item_ids=cat("cand_item_ids"), cand_offsets=offsets("cand_offsets"),
                   hist_actions=cat("hist_actions"), hist_timestamps=cat("hist_timestamps"),
                   request_time=cat("request_time"), user_ids=cat("user_ids"))

    def to(self, device) -> "RequestBatch":
        moved = {f.name: (v.to(device) if isinstance(v := getattr(self, f.name), torch.Tensor) else v)
                 for f in dataclasses.fields(self)}
        return RequestBatch(**moved)


def _gather_positions(offsets: torch.Tensor, rows: torch.Tensor):
    """Flat positions of the segments `rows` of a jagged tensor, and the offsets of the gathered result."""
    starts = offsets[rows]
    lengths = offsets[rows + 1] - starts
    new_offsets = offsets_from_lengths(lengths)
    total = int(new_offsets[-1])
    shift = torch.repeat_interleave(starts - new_offsets[:-1], lengths, output_size=total)
    return shift + torch.arange(total, device=offsets.device), new_offsets


# ---- validation ------------------------------------------------------------------------------------------
def _check_ids(name: str, ids: torch.Tensor, low: int, high: int | None) -> None:
    if ids.numel() == 0 or high is None:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < low or hi > high:
        raise RequestError(f"{name} must lie in [{low}, {high}], got values in [{lo}, {hi}]")


def _check_int_vector(name: str, tensor: torch.Tensor, size: int | None = None, what: str = "") -> None:
    if tensor.dim() != 1 or tensor.is_floating_point() or tensor.dtype == torch.bool:
        raise RequestError(f"{name} must be a 1-D integer tensor{what}, got {tensor.dtype} of shape "
                           f"{tuple(tensor.shape)}")
    if size is not None and tensor.shape[0] != size:
        raise RequestError(f"{name} holds {tensor.shape[0]} values, expected {size}{what}")


def _offsets(name: str, offsets: torch.Tensor, total: int) -> None:
    try:
        validate_offsets(offsets, total=total)
    except JaggedInputError as err:
        raise RequestError(f"{name}: {err}") from None


_CHECKED = contextvars.ContextVar("merlin_longseq_inputs_checked", default=False)


@contextlib.contextmanager
def inputs_checked():
    """Inside it, check_history and check_candidates (the models' own checks) return at once: for a caller that
    has just run validate_request on the host (a scorer), whose model then gets the same request on the GPU,
    where every check would read values back (a device sync each). Per thread / task (a context variable)."""
    token = _CHECKED.set(True)
    try:
        yield
    finally:
        _CHECKED.reset(token)


def check_history(limits: RequestLimits, item_ids, actions, timestamps, offsets, request_time, user_ids) -> None:
    """The structural checks of a history (what a model's forward runs on every call; cheap)."""
    if not _CHECKED.get():
        _history_checks(limits, item_ids, actions, timestamps, offsets, request_time, user_ids)


def check_candidates(limits: RequestLimits, cand_item_ids, cand_offsets, requests: int) -> None:
    """The structural checks of a candidate list (run by a model on every scoring call; cheap)."""
    if not _CHECKED.get():
        _candidate_checks(limits, cand_item_ids, cand_offsets, requests)


def _history_checks(limits: RequestLimits, item_ids, actions, timestamps, offsets, request_time, user_ids) -> None:
    _check_int_vector("hist_item_ids", item_ids)
    events = item_ids.shape[0]
    for name, t in (("hist_actions", actions), ("hist_timestamps", timestamps)):
        if t is not None:
            _check_int_vector(name, t, events, " (one value per history event)")
    _offsets("hist_offsets", offsets, events)
    requests = offsets.numel() - 1
    if request_time is not None:
        _check_int_vector("request_time", request_time, requests, " [R]")
    _check_ids("hist_item_ids", item_ids, 0, limits.num_items)  # 0 (padding) is refused by validate_request
    if actions is not None:
        _check_ids("hist_actions", actions, 0, limits.num_actions)
    if limits.num_users:
        if user_ids is None:
            raise RequestError(f"this model reads user ids (num_users={limits.num_users}): pass user_ids [R]")
        _check_int_vector("user_ids", user_ids, requests, " [R]")
        _check_ids("user_ids", user_ids, 0, limits.num_users)


def _candidate_checks(limits: RequestLimits, cand_item_ids, cand_offsets, requests: int) -> None:
    _check_int_vector("cand_item_ids", cand_item_ids)
    _offsets("cand_offsets", cand_offsets, cand_item_ids.shape[0])
    if cand_offsets.numel() - 1 != requests:
        raise RequestError(f"cand_offsets describe {cand_offsets.numel() - 1} requests but the history has "
                           f"{requests}")
    _check_ids("cand_item_ids", cand_item_ids, 0, limits.num_items)


def _first(mask: torch.Tensor) -> int:
    return int(torch.nonzero(mask)[0, 0])


def validate_request(batch: RequestBatch, limits: RequestLimits) -> None:
    """The request contract, whole; raises RequestError naming the request and the field.

    Structure (shapes, offsets from 0, one value per event), at least one request and one candidate per
    request, history and candidate counts within the limits, ids within the model's vocabulary (no padding
    id 0, no unknown-item id), events strictly before their request's time and oldest first, time gaps that
    fit int64, labels one per candidate.
    """
    # always checked, also inside inputs_checked()
    _history_checks(limits, batch.hist_item_ids, batch.hist_actions, batch.hist_timestamps, batch.hist_offsets,
                    batch.request_time, batch.user_ids)
    requests = batch.num_requests
    _candidate_checks(limits, batch.cand_item_ids, batch.cand_offsets, requests)
    if requests == 0:
        raise RequestError("the batch holds no request")
    for name, needed, tensor in (("hist_actions", limits.needs_actions, batch.hist_actions),
                                 ("hist_timestamps", limits.needs_timestamps, batch.hist_timestamps),
                                 ("request_time", limits.needs_request_time, batch.request_time),
                                 ("user_ids", limits.needs_user_ids, batch.user_ids)):
        if needed and tensor is None:
            raise RequestError(f"this model needs {name}; the request has none")
    counts = batch.candidate_counts
    if bool((counts < limits.min_candidates).any()):
        r = _first(counts < limits.min_candidates)
        count = int(counts[r])
        raise RequestError(f"request {r} has {count or 'zero'} candidates: send at least {limits.min_candidates}")
    if limits.max_candidates is not None and bool((counts > limits.max_candidates).any()):
        r = _first(counts > limits.max_candidates)
        raise RequestError(f"request {r} has {int(counts[r])} candidates, more than the maximum "
                           f"{limits.max_candidates}")
    lengths = batch.history_lengths
    if limits.max_history is not None and bool((lengths > limits.max_history).any()):
        r = _first(lengths > limits.max_history)
        raise RequestError(f"request {r} has a history of {int(lengths[r])} events, more than the maximum "
                           f"{limits.max_history}: send the most recent {limits.max_history}")
    if bool((lengths < limits.min_history).any()):
        r = _first(lengths < limits.min_history)
        raise RequestError(f"request {r} has {int(lengths[r])} history events; this model needs at least "
                           f"{limits.min_history}")
    for name, values, offsets in (("hist_item_ids", batch.hist_item_ids, batch.hist_offsets),
                                  ("cand_item_ids", batch.cand_item_ids, batch.cand_offsets)):
        if values.numel() == 0:
            continue
        bad = values < limits.min_item_id
        if limits.unknown_item_ids and (name == "cand_item_ids" or limits.refuse_unknown_history):
            bad = bad | torch.isin(values, torch.tensor(limits.unknown_item_ids, dtype=values.dtype,
                                                        device=values.device))
        if bool(bad.any()):
            position = _first(bad)
            r = int(torch.searchsorted(offsets, torch.tensor(position, device=offsets.device), right=True)) - 1
            value = int(values[position])
            why = ("not in the model's vocabulary (an id the workflow's Categorify gives unknown items)"
                   if value in limits.unknown_item_ids else f"below the smallest item id {limits.min_item_id} "
                                                           "(0 is padding)")
            raise RequestError(f"request {r}: {name}[{position - int(offsets[r])}] = {value} is {why}; "
                               f"{int(bad.sum())} such id(s) in the batch")
    if batch.hist_timestamps is not None and batch.hist_timestamps.numel():
        seq_index, positions = jagged_positions(batch.hist_offsets)
        times = batch.hist_timestamps
        if batch.request_time is not None:
            gap = batch.request_time[seq_index] - times
            # int64 wrap-around makes a huge gap negative: compare in two steps so it cannot pass as "just now"
            late = (times >= batch.request_time[seq_index]) | (gap <= 0)
            if bool(late.any()):
                r = int(seq_index[_first(late)])
                raise RequestError(f"request {r} has a history event at or after its request_time (events must "
                                   "be strictly earlier: an event at the request time may be its own label)")
            if bool((gap > _MAX_TIME_GAP).any()):
                r = int(seq_index[_first(gap > _MAX_TIME_GAP)])
                raise RequestError(f"request {r}: a time gap between an event and the request overflows int64 "
                                   "(mixed time units?)")
        unordered = (positions[1:] > 0) & (times[1:] < times[:-1])
        if bool(unordered.any()):
            r = int(seq_index[1:][_first(unordered)])
            raise RequestError(f"request {r}: history events must be oldest first (timestamps non-decreasing)")
    if batch.labels is not None:
        expected = (batch.cand_item_ids.shape[0], len(batch.label_names) or batch.labels.shape[-1])
        if batch.labels.dim() != 2 or tuple(batch.labels.shape) != expected:
            raise RequestError(f"labels must be [candidates, tasks] = {list(expected)}, got "
                               f"{list(batch.labels.shape)}: one label per candidate")


def check_label_lengths(cand_lengths, label_lengths: Mapping[str, object]) -> None:
    """Ragged label lists must hold one value per candidate in every row (checked before padding hides it)."""
    cand = np.asarray(cand_lengths).reshape(-1)
    for name, lengths in label_lengths.items():
        lengths = np.asarray(lengths).reshape(-1)
        if lengths.shape != cand.shape or not np.array_equal(lengths, cand):
            row = int(np.nonzero(lengths != cand)[0][0]) if lengths.shape == cand.shape else 0
            got = int(lengths[row]) if lengths.shape == cand.shape else lengths.shape
            raise RequestError(f"row {row}: label list {name!r} holds {got} values but the row has "
                               f"{int(cand[row]) if cand.size else 0} candidates")


__all__ = ["RequestBatch", "RequestColumns", "RequestError", "RequestLimits", "check_candidates", "check_history",
           "inputs_checked",
           "check_label_lengths", "validate_request"]
