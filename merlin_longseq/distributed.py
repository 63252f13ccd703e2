"""Distributed training pieces: a request-group sampler for DDP and process-group setup from torchrun.

RequestGroupSampler (a batch sampler: it yields lists of row indices, one list per step, for ONE rank)
  - unit of work = a request group: one row of request-grouped data (a request with its history and all its
    candidates), or, with `group_ids`, all rows sharing a group id (long format, one row per impression).
    A group is never split: request level batching (RLB) computes the user side once per request, so the
    request's candidates must stay together on one rank, in one step;
  - each epoch the groups are shuffled with a generator seeded by (seed, epoch) and cut into GLOBAL batches
    of batch_requests * world_size groups; every rank computes the same global batches (no communication)
    and keeps its own share, so the ranks see disjoint groups and together exactly the whole epoch;
  - inside a global batch the groups go to ranks by greedy longest-processing-time: heaviest first, each to
    the rank with the least work so far (ties: fewer groups, then lower rank). Work = a cost per group, e.g.
    its history length (see request_costs). Guarantee per step: max rank load - min rank load <= the largest
    group cost of that batch, and every rank gets at least one group;
  - a last global batch too small to give every rank a group is folded into the one before it, so no group
    is lost (drop_last=True drops an incomplete last batch instead). Every rank steps the same number of
    times (len(sampler)), which DDP needs: a rank that stops early would hang the others in all-reduce.

Ranks get different numbers of candidates per step. DDP averages gradients over ranks, so a per-rank mean
loss would weight a candidate on a light rank more than one on a heavy rank; global_mean_loss rescales each
rank's loss SUM so that the averaged gradient is exactly the gradient of the mean over the whole global batch.

Process group: init_distributed reads the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT); nccl on CUDA, gloo on CPU. Without them it returns a one-process setup.
"""
from __future__ import annotations

import heapq
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# ---- process group ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank among world_size processes, its device and the collective backend."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: single process, no process group

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int | None = None) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """'auto' -> cuda:<local_rank> when CUDA is available, else cpu; 'cuda' -> cuda:<local_rank>; 'cpu'."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but torch sees no CUDA GPU")
    if local_rank >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) are visible; "
                         "launch at most one process per GPU (torchrun --nproc_per_node)")
    return torch.device("cuda", local_rank)


def init_distributed(device: str = "auto", backend: str | None = None,
                     timeout_s: float = 600.0) -> DistInfo:
    """Join the process group torchrun describes in the environment, or run as a single process.

    backend: None picks nccl for CUDA and gloo for CPU; nccl on a CPU device is refused.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= RANK < WORLD_SIZE, got RANK={rank}, WORLD_SIZE={world_size}")
    dev = resolve_device(device, local_rank)
    if world_size == 1 and not dist.is_initialized():
        return DistInfo(0, 1, local_rank, dev, None)
    if backend is None:
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
    if backend == "nccl" and dev.type != "cuda":
        raise ValueError("the nccl backend needs CUDA devices; use gloo (or device='cuda')")
    if not dist.is_initialized():
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
        if missing:
            raise ValueError(f"WORLD_SIZE={world_size} but {missing} are not set: launch with torchrun, "
                             "which sets " + ", ".join(_TORCHRUN_VARS))
        if dev.type == "cuda":
            torch.cuda.set_device(dev)  # before init, so NCCL binds this process to its own GPU
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, dist.get_backend())


def destroy_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (no-op without a process group); returns the tensor."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def global_mean_loss(local_sum: torch.Tensor, local_count) -> torch.Tensor:
    """The loss each rank should backpropagate so that DDP's gradient AVERAGE equals the gradient of
    (sum of every rank's loss terms) / (number of terms over all ranks).

    DDP divides the summed gradients by world_size, hence the factor world_size / global_count. Costs one
    all-reduce of a scalar (asynchronous on GPU, no host sync). Without a process group: local_sum / count.
    """
    count = torch.as_tensor(local_count, dtype=torch.float64, device=local_sum.device).reshape(1).clone()
    world = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count, op=dist.ReduceOp.SUM)
        world = dist.get_world_size()
    return local_sum * (world / count.clamp(min=1)).to(local_sum.dtype).squeeze(0)


# ---- sampler ---------------------------------------------------------------------------------------------
def request_costs(history_lengths, candidate_counts=None, *, pair_weight: float = 0.0,
                  candidate_weight: float = 1.0) -> np.ndarray:
    """A simple work model per request: L + candidate_weight * T + pair_weight * T * L (L = history length,
    T = candidates). L covers the per-request user side (computed once under RLB), T the per-candidate tower,
    T * L the target-to-history attention. For STCA with width d, pair_weight ~ 1 / (2 d) weighs one attention
    score against one history token's projections (about 4d vs 8d^2 multiply-adds per layer)."""
    lengths = np.asarray(history_lengths, dtype=np.float64)
    if lengths.ndim != 1 or (lengths < 0).any():
        raise ValueError("history_lengths must be a 1-D array of non-negative lengths")
    if candidate_counts is None:
        return lengths + 1.0  # an empty history still costs a step
    counts = np.asarray(candidate_counts, dtype=np.float64)
    if counts.shape != lengths.shape or (counts < 0).any():
        raise ValueError(f"candidate_counts must be non-negative with the shape of history_lengths "
                         f"{lengths.shape}, got {counts.shape}")
    return lengths + candidate_weight * counts + pair_weight * counts * lengths


def balance_groups(costs: np.ndarray, num_bins: int) -> list[np.ndarray]:
    """Greedy longest-processing-time: positions 0..n-1 of `costs` into num_bins bins of near-equal total cost.

    Heaviest first, each to the bin with the least total so far (ties: fewer items, then lower bin). Every bin
    gets at least one item when n >= num_bins, and max total - min total <= max(costs). Items of a bin come
    back in ascending position order.
    """
    costs = np.asarray(costs, dtype=np.float64)
    order = np.argsort(-costs, kind="stable")  # ties keep the earlier position first: deterministic
    heap = [(0.0, 0, b) for b in range(num_bins)]  # (load, items, bin)
    bins: list[list[int]] = [[] for _ in range(num_bins)]
    for position in order:
        load, items, b = heapq.heappop(heap)
        bins[b].append(int(position))
        heapq.heappush(heap, (load + float(costs[position]), items + 1, b))
    return [np.sort(np.asarray(b, dtype=np.int64)) for b in bins]


class RequestGroupSampler(Sampler):
    """Batch sampler for DDP over request groups; see the module docstring for the rules.

    Args:
        costs: work per row (1-D, non-negative, finite). With group_ids, a group's cost is the sum over its rows.
        batch_requests: request groups per rank per step (on average; a global batch holds
            batch_requests * num_replicas groups).
        num_replicas, rank: the DDP world; taken from the initialised process group when None.
        group_ids: optional [rows] keys; rows with equal keys form one group (kept whole, on one rank).
        seed, shuffle: the permutation of groups for epoch e is seeded with (seed, e); shuffle=False keeps
            the groups in order of first appearance.
        drop_last: drop an incomplete last global batch instead of spreading its groups.
    Yields: for this rank, one np.ndarray of row indices per step (rows of a group are contiguous, in row order).
    """

    def __init__(self, costs, *, batch_requests: int, num_replicas: int | None = None, rank: int | None = None,
                 group_ids: Sequence | np.ndarray | None = None, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False):
        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if int(num_replicas) < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        if not 0 <= int(rank) < int(num_replicas):
            raise ValueError(f"rank must be in [0, num_replicas={num_replicas}), got {rank}")
        if int(batch_requests) < 1:
            raise ValueError(f"batch_requests must be >= 1, got {batch_requests}")
        costs = np.asarray(costs, dtype=np.float64)
        if costs.ndim != 1:
            raise ValueError(f"costs must be 1-D (one per row), got shape {costs.shape}")
        if costs.size and (not np.isfinite(costs).all() or (costs < 0).any()):
            raise ValueError("costs must be finite and non-negative")
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.batch_requests, self.seed = int(batch_requests), int(seed)
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)
        self.epoch = 0
        self._group_rows, self.group_costs = _groups(costs, group_ids)
        if self.num_groups < self.num_replicas:
            raise ValueError(f"{self.num_groups} request group(s) cannot give each of {self.num_replicas} "
                             "ranks at least one; use fewer ranks or more data")
        self.global_batch = self.batch_requests * self.num_replicas

    @property
    def num_groups(self) -> int:
        return len(self._group_rows)

    def set_epoch(self, epoch: int) -> None:
        """Call before iterating each epoch (as with DistributedSampler): it reseeds the permutation."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        full, rest = divmod(self.num_groups, self.global_batch)
        if self.drop_last:
            return full
        if full == 0:
            return 1  # num_groups >= num_replicas (checked), so one batch serves every rank
        return full + (1 if rest >= self.num_replicas else 0)  # a smaller remainder joins the last batch

    def global_batches(self, epoch: int | None = None) -> list[np.ndarray]:
        """The group indices of every global batch of an epoch (identical on every rank)."""
        epoch = self.epoch if epoch is None else int(epoch)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_groups)
        else:
            order = np.arange(self.num_groups)
        cuts = list(range(0, self.num_groups, self.global_batch))
        batches = [order[start:start + self.global_batch] for start in cuts]
        if batches and len(batches[-1]) < self.global_batch:
            if self.drop_last:
                batches.pop()
            elif len(batches[-1]) < self.num_replicas and len(batches) > 1:
                tail = batches.pop()
                batches[-1] = np.concatenate([batches[-1], tail])
        return batches

    def assignment(self, epoch: int | None = None) -> list[list[np.ndarray]]:
        """[step][rank] -> group indices for every rank (what each rank's iterator yields, as groups)."""
        out = []
        for groups in self.global_batches(epoch):
            out.append([groups[pos] for pos in balance_groups(self.group_costs[groups], self.num_replicas)])
        return out

    def rank_loads(self, epoch: int | None = None) -> np.ndarray:
        """[steps, num_replicas] total cost per rank and step."""
        return np.array([[self.group_costs[g].sum() for g in step] for step in self.assignment(epoch)])

    def rows_of(self, groups: np.ndarray) -> np.ndarray:
        if len(groups) == 0:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([self._group_rows[g] for g in groups])

    def __iter__(self) -> Iterator[np.ndarray]:
        for step in self.assignment():
            yield self.rows_of(step[self.rank])


def _groups(costs: np.ndarray, group_ids) -> tuple[list[np.ndarray], np.ndarray]:
    """Rows of each group (groups in order of first appearance) and each group's summed cost."""
    if group_ids is None:
        return [np.array([i], dtype=np.int64) for i in range(costs.size)], costs.copy()
    keys = np.asarray(group_ids)
    if keys.shape != costs.shape:
        raise ValueError(f"group_ids must have one key per row ({costs.shape[0]}), got shape {keys.shape}")
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    # renumber groups by first appearance so that shuffle=False keeps the data order
    rank_of = np.empty(first.size, dtype=np.int64)
    rank_of[np.argsort(first, kind="stable")] = np.arange(first.size)
    group = rank_of[inverse.reshape(-1)]
    rows_sorted = np.argsort(group, kind="stable")
    bounds = np.searchsorted(group[rows_sorted], np.arange(first.size + 1))
    rows = [rows_sorted[bounds[g]:bounds[g + 1]] for g in range(first.size)]
    return rows, np.bincount(group, weights=costs, minlength=first.size)
