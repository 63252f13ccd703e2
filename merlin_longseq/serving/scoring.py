"""Request-level scoring (RLB at inference): one request = one user's history + N candidates -> N scores.

Torch only: the Triton model step (serving/operator.py) and in-process callers use the same code.

Requests arrive as the request core's `RequestBatch` (merlin_longseq.request) and are checked by its one
validator (RequestError naming the request and the field), with the limits of the model and the export.
A scorer encodes every request's user side ONCE and scores all its candidates against it:
    ranking (every registered ranking architecture: STCA, LONGER, mean pooling, DIN)
           encode_user -> the model's user state, score_candidates -> logits [C, num_tasks]
    next item (HSTU) the history through the HSTU encoder -> last hidden state h; score(c) = h . item_embedding(c)
           (the weight-tied score of HSTUNextItemModel.item_scores), for given candidates or the top k of
           the whole catalogue
Scores are raw logits, float32, candidates in request order.

User-side cache (optional, `UserStateCache`): keyed by user id, holding the encoded user side together with
a fingerprint of everything the user side reads (history items, actions, timestamps and the request time:
the models bucket "time before the request", so a new request time is a new user state). A hit needs an
equal fingerprint, so a changed history refreshes the entry and cached scores equal uncached ones. Bounded
by entries and by bytes (least recently used first out).
"""
from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections import OrderedDict
from dataclasses import fields, is_dataclass

import torch

from merlin_longseq import registry
from merlin_longseq.request import RequestBatch, RequestError, RequestLimits, inputs_checked, validate_request

# served requests are checked by the request core's one validator, with the limits the model and export set
__all__ = ["RequestBatch", "RequestError", "RequestLimits", "Scorer", "UserStateCache", "fingerprint", "make_scorer",
           "serving_limits"]


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
    """Wraps a ranking model (the registry's protocol): check, encode the user side once per request, score every
    candidate. Scores are logits [C, num_tasks], float32 on the CPU, candidates in request order."""

    def __init__(self, model: torch.nn.Module, limits: RequestLimits, device: str | torch.device = "cpu",
                 cache: UserStateCache | None = None):
        self.model = model.to(device).eval()
        self.limits = limits
        self.device = torch.device(device)
        self.cache = cache
        self._lock = threading.Lock()  # one forward at a time per model (the server runs one per instance)

    @property
    def num_tasks(self) -> int:
        return self.model.cfg.num_tasks

    def encode(self, batch: RequestBatch):
        return self.model.encode_user(**batch.history)

    def score_state(self, state, cand_item_ids, cand_offsets) -> torch.Tensor:
        return self.model.score_candidates(state, cand_item_ids, cand_offsets)

    @torch.inference_mode()
    def score(self, batch: RequestBatch, use_cache: bool = True, validate: bool = True) -> torch.Tensor:
        """Logits [C, num_tasks] (float32, CPU) for every candidate of the batch, in request order.

        validate=False: the caller ran validate_request on exactly these requests already (the model-only Triton
        model checks each batched request alone, then scores them merged)."""
        if validate:
            validate_request(batch, self.limits)
        batch = batch.to(self.device)
        # checked whole on the host just now: the model's own checks would re-read it from the device
        with self._lock, inputs_checked():
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


class NextItemScorer(Scorer):
    """A next-item model (HSTUNextItemModel): the last history state h scores item c by h . item_embedding(c)
    (the weight-tied score of item_scores); `top_k` ranks the whole catalogue instead of given candidates."""

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
        return self.model.candidate_logits(state[request_of], cand_item_ids).unsqueeze(-1)  # [C, 1]

    @torch.inference_mode()
    def top_k(self, batch: RequestBatch, k: int, exclude_history: bool = False,
              never: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """(item ids [R, k] int64, scores [R, k] float32), best first, over every item of the catalogue.

        exclude_history: items already in the request's history are not recommended. never: ids that are not
        items (Categorify's null / OOV ids); padding 0 is never returned.
        """
        if not 1 <= k <= self.model.num_items:
            raise RequestError(f"k must lie in [1, {self.model.num_items}] (the catalogue), got {k}")
        validate_request(batch, self.limits)
        batch = batch.to(self.device)
        with self._lock, inputs_checked():
            scores = self.model.item_scores(self.encode(batch)).float()  # [R, num_items + 1], column 0 = -inf
            if never:
                scores[:, list(never)] = float("-inf")
            if exclude_history and batch.hist_item_ids.numel():
                owner = torch.repeat_interleave(torch.arange(batch.num_requests, device=scores.device),
                                                batch.history_lengths)
                scores[owner, batch.hist_item_ids] = float("-inf")
            best, ids = scores.topk(k, dim=1)
        return ids.cpu(), best.cpu()


def serving_limits(model: torch.nn.Module, max_history: int | None = None, unknown_item_ids: tuple[int, ...] = (),
                   max_candidates: int | None = None) -> RequestLimits:
    """The request limits a served model implies: its id ranges and inputs, plus the export's caps."""
    arch = registry.of_model(model)
    if arch.kind == registry.NEXT_ITEM:
        limit = model.cfg.max_seq_len if max_history is None else min(max_history, model.cfg.max_seq_len)
        return RequestLimits(num_items=model.num_items, max_history=limit, unknown_item_ids=tuple(unknown_item_ids),
                             min_history=1, num_actions=model.num_actions, max_candidates=max_candidates)
    if max_history is None:
        raise ValueError(f"{arch.name} has no built-in length limit: pass max_history (the longest history to "
                         "accept)")
    return dataclasses.replace(model.limits, max_history=int(max_history), unknown_item_ids=tuple(unknown_item_ids),
                               max_candidates=max_candidates)


def make_scorer(model: torch.nn.Module, limits: RequestLimits | None = None, device: str = "cpu",
                cache: UserStateCache | None = None, max_history: int | None = None) -> Scorer:
    arch = registry.of_model(model)
    limits = limits or serving_limits(model, max_history)
    scorer = NextItemScorer if arch.kind == registry.NEXT_ITEM else Scorer
    if arch.kind == registry.RANKING and model.cfg.num_tasks == 0:
        raise ValueError(f"this {type(model).__name__} is headless (no task heads): nothing to score")
    return scorer(model, limits, device, cache)
