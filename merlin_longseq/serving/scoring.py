"""Request-level scoring (RLB at inference): one request = one user's history + N candidates -> N scores.

Torch only: the Triton model step (serving/operator.py) and in-process callers use the same code.

A `RequestBatch` holds R requests in the jagged convention of the models (values + int64 offsets [R + 1]).
A scorer checks the batch once (clear ValueError messages for a bad request), encodes every request's user
side ONCE and scores all its candidates against it:
    STCA   encode_user -> STCAUserState (per-layer K/V), score_candidates -> logits
    LONGER encode_user -> UserCache (layer-1 K/V of the merged tokens, ...), score -> logits
    HSTU   the history through the HSTU encoder -> last hidden state h; score(c) = h . item_embedding(c)
           (the weight-tied next-item score of HSTUNextItemModel.item_scores, for N candidates only)
Scores are raw logits [C, num_tasks], float32, candidates in request order.

User-side cache (optional, `UserStateCache`): keyed by user id, holding the encoded user side together with
a fingerprint of everything the user side reads (history items, actions, timestamps and the request time:
the models bucket "time before the request", so a new request time is a new user state). A hit needs an
equal fingerprint, so a changed history refreshes the entry and cached scores equal uncached ones. Bounded
by entries and by bytes (least recently used first out).
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, fields, is_dataclass

import numpy as np
import torch

ARCHITECTURES = ("stca", "longer", "hstu")


class RequestError(ValueError):
    """A request the model cannot score; the message says what is wrong."""


@dataclass
class RequestBatch:
    """R requests, jagged. Offsets are int64 [R + 1]; every other field is int64."""

    hist_item_ids: torch.Tensor  # [N]
    hist_offsets: torch.Tensor  # [R + 1]
    cand_item_ids: torch.Tensor  # [C]
    cand_offsets: torch.Tensor  # [R + 1]
    hist_actions: torch.Tensor | None = None  # [N]
    hist_timestamps: torch.Tensor | None = None  # [N]
    request_time: torch.Tensor | None = None  # [R]
    user_ids: torch.Tensor | None = None  # [R]

    @property
    def num_requests(self) -> int:
        return self.hist_offsets.numel() - 1

    @classmethod
    def from_arrays(cls, **arrays) -> "RequestBatch":
        """Numpy arrays / lists (or tensors) -> int64 CPU tensors; offsets may come as int32 (Triton's)."""
        def as_tensor(name, value):
            if value is None:
                return None
            array = np.asarray(value)
            if array.dtype.kind not in "iu":
                raise RequestError(f"{name} must hold integers, got dtype {array.dtype}")
            if array.ndim != 1:
                raise RequestError(f"{name} must be 1-D, got shape {array.shape}")
            return torch.from_numpy(array.astype(np.int64, copy=False))

        known = {f.name for f in fields(cls)}
        unknown = set(arrays) - known
        if unknown:
            raise TypeError(f"unknown RequestBatch fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**{name: as_tensor(name, value) for name, value in arrays.items()})

    def request(self, r: int) -> "RequestBatch":
        """Request r alone (a batch of one)."""
        h0, h1 = int(self.hist_offsets[r]), int(self.hist_offsets[r + 1])
        c0, c1 = int(self.cand_offsets[r]), int(self.cand_offsets[r + 1])

        device = self.hist_offsets.device  # new offsets live with the rest (a CUDA batch stays on CUDA)

        def cut(t, a, b):
            return None if t is None else t[a:b]
        return RequestBatch(
            hist_item_ids=self.hist_item_ids[h0:h1], hist_offsets=torch.tensor([0, h1 - h0], device=device),
            cand_item_ids=self.cand_item_ids[c0:c1], cand_offsets=torch.tensor([0, c1 - c0], device=device),
            hist_actions=cut(self.hist_actions, h0, h1), hist_timestamps=cut(self.hist_timestamps, h0, h1),
            request_time=cut(self.request_time, r, r + 1), user_ids=cut(self.user_ids, r, r + 1))

    def to(self, device) -> "RequestBatch":
        return RequestBatch(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                               for f in fields(self)})


@dataclass
class RequestRules:
    """What a servable request must satisfy besides the model's own checks."""

    num_items: int  # largest model item id
    max_history: int  # longest accepted history
    unknown_item_ids: tuple[int, ...] = ()  # ids that mean "not in the vocabulary" (Categorify: 1 null, 2 OOV)
    needs_actions: bool = False
    needs_timestamps: bool = False
    needs_request_time: bool = False
    needs_user_ids: bool = False
    num_users: int = 0  # > 0: user ids must lie in [0, num_users]
    num_actions: int | None = None  # actions must lie in [0, num_actions]
    min_history: int = 0  # HSTU scores from the last history state: at least one event


def check_request(batch: RequestBatch, rules: RequestRules) -> None:
    """Raise RequestError naming the request and the field when a batch cannot be scored."""
    for name, offsets, values in (("history", batch.hist_offsets, batch.hist_item_ids),
                                  ("candidates", batch.cand_offsets, batch.cand_item_ids)):
        if offsets.numel() < 1 or int(offsets[0]) != 0:
            raise RequestError(f"{name} offsets must start at 0 and hold R + 1 entries")
        if bool((offsets[1:] < offsets[:-1]).any()):
            raise RequestError(f"{name} offsets must be non-decreasing")
        if int(offsets[-1]) != values.numel():
            raise RequestError(f"{name} offsets end at {int(offsets[-1])} but {values.numel()} ids were sent")
    requests = batch.num_requests
    if batch.cand_offsets.numel() - 1 != requests:
        raise RequestError(f"{requests} histories but {batch.cand_offsets.numel() - 1} candidate lists")
    if requests == 0:
        raise RequestError("the batch holds no request")
    n_cand = batch.cand_offsets[1:] - batch.cand_offsets[:-1]
    if bool((n_cand == 0).any()):
        r = int(torch.nonzero(n_cand == 0)[0, 0])
        raise RequestError(f"request {r} has zero candidates: send at least one candidate item to score")
    n_hist = batch.hist_offsets[1:] - batch.hist_offsets[:-1]
    if bool((n_hist > rules.max_history).any()):
        r = int(torch.argmax(n_hist))
        raise RequestError(f"request {r} has a history of {int(n_hist[r])} events, more than the maximum "
                           f"{rules.max_history}: send the most recent {rules.max_history}")
    if bool((n_hist < rules.min_history).any()):
        r = int(torch.argmin(n_hist))
        raise RequestError(f"request {r} has {int(n_hist[r])} history events; this model needs at least "
                           f"{rules.min_history}")
    for name, values, where in (("history item", batch.hist_item_ids, batch.hist_offsets),
                                ("candidate item", batch.cand_item_ids, batch.cand_offsets)):
        if rules.unknown_item_ids and values.numel():
            unknown = torch.isin(values, torch.tensor(rules.unknown_item_ids, dtype=values.dtype))
            if bool(unknown.any()):
                positions = torch.nonzero(unknown).squeeze(1)
                request_of = torch.searchsorted(where, positions, right=True) - 1
                shown = [(int(r), int(p - where[r])) for r, p in zip(request_of[:5], positions[:5])]
                raise RequestError(f"{int(unknown.sum())} {name} id(s) are not in the model's vocabulary "
                                   f"(unknown to the workflow's Categorify); (request, position) of the first: "
                                   f"{shown}")
        if values.numel() and (int(values.min()) < 1 or int(values.max()) > rules.num_items):
            raise RequestError(f"{name} ids must lie in [1, {rules.num_items}] after encoding, got "
                               f"[{int(values.min())}, {int(values.max())}]")
    for name, needed, tensor, size in (("hist_actions", rules.needs_actions, batch.hist_actions,
                                        batch.hist_item_ids.numel()),
                                       ("hist_timestamps", rules.needs_timestamps, batch.hist_timestamps,
                                        batch.hist_item_ids.numel()),
                                       ("request_time", rules.needs_request_time, batch.request_time, requests),
                                       ("user_ids", rules.needs_user_ids, batch.user_ids, requests)):
        if needed and tensor is None:
            raise RequestError(f"this model needs {name}; the request has none")
        if tensor is not None and tensor.numel() != size:
            raise RequestError(f"{name} holds {tensor.numel()} values, expected {size}")
    if batch.hist_actions is not None and rules.num_actions is not None and batch.hist_actions.numel():
        lo, hi = int(batch.hist_actions.min()), int(batch.hist_actions.max())
        if lo < 0 or hi > rules.num_actions:
            raise RequestError(f"hist_actions must lie in [0, {rules.num_actions}], got [{lo}, {hi}]")
    if batch.user_ids is not None and rules.num_users and (
            int(batch.user_ids.min()) < 0 or int(batch.user_ids.max()) > rules.num_users):
        raise RequestError(f"user ids must lie in [0, {rules.num_users}] (0 = unknown user)")
    if batch.hist_timestamps is not None and batch.request_time is not None and batch.hist_item_ids.numel():
        request_of_event = torch.repeat_interleave(torch.arange(requests), n_hist)
        late = batch.hist_timestamps > batch.request_time[request_of_event]
        if bool(late.any()):
            r = int(request_of_event[torch.nonzero(late)[0, 0]])
            raise RequestError(f"request {r} has a history event later than its request_time")


# ---- user-side cache ----------------------------------------------------------------------------------------
def state_nbytes(state) -> int:
    """Bytes held by the tensors of a user state (dataclass, NamedTuple, list or tensor)."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if is_dataclass(state):
        return sum(state_nbytes(getattr(state, f.name)) for f in fields(state))
    if isinstance(state, (list, tuple)):
        return sum(state_nbytes(s) for s in state)
    return 0


def fingerprint(batch: RequestBatch) -> bytes:
    """Digest of everything a single request's user side reads."""
    digest = hashlib.blake2b(digest_size=16)
    for t in (batch.hist_item_ids, batch.hist_actions, batch.hist_timestamps, batch.request_time, batch.user_ids):
        digest.update(b"|" if t is None else t.detach().cpu().numpy().tobytes() + b";")
    return digest.digest()


class UserStateCache:
    """Bounded LRU of encoded user sides: key user id -> (fingerprint, state). Thread-safe."""

    def __init__(self, max_entries: int = 1024, max_bytes: int = 1 << 30):
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("UserStateCache needs max_entries >= 1 and max_bytes >= 1")
        self.max_entries, self.max_bytes = int(max_entries), int(max_bytes)
        self._entries: OrderedDict = OrderedDict()  # user -> (fingerprint, state, nbytes)
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.refreshes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, user, print_):
        """The cached state when the user's fingerprint matches; None otherwise (a stale entry is dropped)."""
        with self._lock:
            entry = self._entries.get(user)
            if entry is not None and entry[0] == print_:
                self._entries.move_to_end(user)
                self.hits += 1
                return entry[1]
            if entry is not None:  # the history (or request time) changed: refresh
                self.refreshes += 1
                self._drop(user)
            self.misses += 1
            return None

    def put(self, user, print_, state) -> None:
        size = state_nbytes(state)
        with self._lock:
            if user in self._entries:
                self._drop(user)
            if size > self.max_bytes:  # one state larger than the whole budget is not kept
                return
            self._entries[user] = (print_, state, size)
            self._bytes += size
            while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
                self._drop(next(iter(self._entries)))

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def _drop(self, user) -> None:
        self._bytes -= self._entries.pop(user)[2]


# ---- scorers ------------------------------------------------------------------------------------------------
class Scorer:
    """Wraps a model: check, encode the user side once per request, score every candidate."""

    arch: str = ""

    def __init__(self, model: torch.nn.Module, rules: RequestRules, device: str | torch.device = "cpu",
                 cache: UserStateCache | None = None):
        self.model = model.to(device).eval()
        self.rules = rules
        self.device = torch.device(device)
        self.cache = cache
        self._lock = threading.Lock()  # one forward at a time per model (the server runs one per instance)

    @property
    def num_tasks(self) -> int:
        raise NotImplementedError

    def encode(self, batch: RequestBatch):
        raise NotImplementedError

    def score_state(self, state, cand_item_ids, cand_offsets) -> torch.Tensor:
        raise NotImplementedError

    @torch.inference_mode()
    def score(self, batch: RequestBatch, use_cache: bool = True) -> torch.Tensor:
        """Logits [C, num_tasks] (float32, CPU) for every candidate of the batch, in request order."""
        check_request(batch, self.rules)
        batch = batch.to(self.device)
        with self._lock:
            if self.cache is None or not use_cache or batch.user_ids is None:
                return self.score_state(self.encode(batch), batch.cand_item_ids, batch.cand_offsets).float().cpu()
            # per request: each one's user side comes from (or goes to) the cache
            out = []
            for r in range(batch.num_requests):
                one = batch.request(r)
                user, print_ = int(one.user_ids[0]), fingerprint(one)
                state = self.cache.get(user, print_)
                if state is None:
                    state = self.encode(one)
                    self.cache.put(user, print_, state)
                out.append(self.score_state(state, one.cand_item_ids, one.cand_offsets).float())
            return torch.cat(out).cpu()


class STCAScorer(Scorer):
    arch = "stca"

    @property
    def num_tasks(self) -> int:
        return self.model.cfg.num_tasks

    def encode(self, batch):
        return self.model.encode_user(batch.hist_item_ids, batch.hist_actions, batch.hist_timestamps,
                                      batch.hist_offsets, batch.request_time, batch.user_ids)

    def score_state(self, state, cand_item_ids, cand_offsets):
        return self.model.score_candidates(state, cand_item_ids, cand_offsets)


class LONGERScorer(STCAScorer):
    arch = "longer"

    def score_state(self, state, cand_item_ids, cand_offsets):
        return self.model.score(state, cand_item_ids, cand_offsets)


class HSTUScorer(Scorer):
    """HSTUNextItemModel: the last history state scores each candidate by the weight-tied dot product."""

    arch = "hstu"

    @property
    def num_tasks(self) -> int:
        return 1

    def encode(self, batch):
        hidden = self.model(batch.hist_item_ids, batch.hist_offsets, action_ids=batch.hist_actions,
                            timestamps=batch.hist_timestamps)  # [N, d]
        return hidden[batch.hist_offsets[1:] - 1]  # [R, d]: each request's last event (min_history = 1)

    def score_state(self, state, cand_item_ids, cand_offsets):
        request_of = torch.repeat_interleave(torch.arange(state.shape[0], device=state.device),
                                             cand_offsets[1:] - cand_offsets[:-1])
        table = self.model.tokenizer.item_embedding.weight
        return (state[request_of] * table[cand_item_ids]).sum(-1, keepdim=True)  # [C, 1]


def model_architecture(model: torch.nn.Module) -> str:
    from merlin_longseq.models.hstu import HSTUNextItemModel
    from merlin_longseq.models.longer import LONGERModel
    from merlin_longseq.models.stca import STCAModel

    for arch, cls in (("stca", STCAModel), ("longer", LONGERModel), ("hstu", HSTUNextItemModel)):
        if isinstance(model, cls):
            return arch
    raise ValueError(f"cannot serve a {type(model).__name__}: expected STCAModel, LONGERModel or "
                     "HSTUNextItemModel")


def default_rules(model: torch.nn.Module, max_history: int | None = None,
                  unknown_item_ids: tuple[int, ...] = ()) -> RequestRules:
    """The request rules a model implies (its id ranges and inputs)."""
    arch = model_architecture(model)
    cfg = model.cfg
    if arch == "hstu":
        limit = cfg.max_seq_len if max_history is None else min(max_history, cfg.max_seq_len)
        return RequestRules(num_items=model.num_items, max_history=limit, unknown_item_ids=unknown_item_ids,
                            min_history=1, num_actions=model.tokenizer.action_embedding.num_embeddings - 1)
    if max_history is None:
        raise ValueError(f"{arch} has no built-in length limit: pass max_history (the longest history to accept)")
    users = cfg.num_users if arch == "stca" else (cfg.num_users if cfg.uses_users else 0)
    return RequestRules(num_items=cfg.num_items, max_history=int(max_history), unknown_item_ids=unknown_item_ids,
                        needs_actions=True, needs_timestamps=True, needs_request_time=True,
                        needs_user_ids=bool(users), num_users=users, num_actions=cfg.num_actions)


def make_scorer(model: torch.nn.Module, rules: RequestRules | None = None, device: str = "cpu",
                cache: UserStateCache | None = None, max_history: int | None = None) -> Scorer:
    arch = model_architecture(model)
    rules = rules or default_rules(model, max_history)
    return {"stca": STCAScorer, "longer": LONGERScorer, "hstu": HSTUScorer}[arch](model, rules, device, cache)
