"""Plain-PyTorch next-item training and leave-last-out evaluation on jagged sequences.

Used where Transformers4Rec is absent (the GPU machine) and by tests of the architectures themselves.
Every position predicts the next item (full softmax over the catalogue); evaluation scores each user's
held-out last item from everything before it, over all items (HR@k, NDCG@k).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from merlin_longseq.jagged import offsets_from_lengths


@dataclass
class UserSequences:
    """Per-user time-ordered arrays (1-based item ids)."""

    items: list[np.ndarray]
    actions: list[np.ndarray]
    timestamps: list[np.ndarray]

    @classmethod
    def from_events(cls, events, user_col="user_id", item_col="item_id", time_col="timestamp", action_col="action"):
        events = events.sort_values([user_col, time_col], kind="stable")
        items, actions, times = [], [], []
        for _, frame in events.groupby(user_col, sort=True):
            items.append(frame[item_col].to_numpy(np.int64))
            actions.append(frame[action_col].to_numpy(np.int64) if action_col else np.zeros(len(frame), np.int64))
            times.append(frame[time_col].to_numpy(np.int64))
        return cls(items, actions, times)

    def __len__(self):
        return len(self.items)

    def recent(self, max_len: int, drop_last: bool) -> "UserSequences":
        """The `max_len` most recent events of every user, optionally without the last (held-out) one."""
        end = -1 if drop_last else None

        def cut(a):
            a = a[:end] if end else a
            return a[-max_len:]

        return UserSequences([cut(a) for a in self.items], [cut(a) for a in self.actions],
                             [cut(a) for a in self.timestamps])


def jagged_batch(seqs: UserSequences, rows, device="cpu"):
    lengths = torch.tensor([len(seqs.items[r]) for r in rows], dtype=torch.int64)
    cat = lambda arrays: torch.from_numpy(np.concatenate([arrays[r] for r in rows])).to(device)  # noqa: E731
    return {
        "item_ids": cat(seqs.items), "action_ids": cat(seqs.actions), "timestamps": cat(seqs.timestamps),
        "offsets": offsets_from_lengths(lengths).to(device),
    }


def next_item_loss(model, batch) -> torch.Tensor:
    hidden = model(batch["item_ids"], batch["offsets"], timestamps=batch["timestamps"])
    offsets = batch["offsets"]
    # position t predicts the item at t + 1 of the same sequence: drop each sequence's last position
    is_last = torch.zeros(hidden.shape[0], dtype=torch.bool, device=hidden.device)
    nonempty = offsets[1:] > offsets[:-1]
    is_last[(offsets[1:] - 1)[nonempty]] = True
    source = torch.nonzero(~is_last).squeeze(1)
    logits = model.item_scores(hidden[source])
    return F.cross_entropy(logits, batch["item_ids"][source + 1])


def train_next_item(model, seqs: UserSequences, epochs=5, batch_size=16, lr=3e-3, device="cpu",
                    seed=0, progress=True):
    """Trains in place; returns the mean loss of each epoch."""
    generator = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    history = []
    steps = math.ceil(len(seqs) / batch_size)
    bar = tqdm(total=epochs * steps, desc="train", disable=not progress, leave=False)
    for _ in range(epochs):
        order = generator.permutation(len(seqs))
        losses = []
        for start in range(0, len(order), batch_size):
            batch = jagged_batch(seqs, order[start:start + batch_size], device)
            loss = next_item_loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.update(1)
        history.append(float(np.mean(losses)))
    bar.close()
    return history


@torch.no_grad()
def evaluate_last_item(model, seqs: UserSequences, k=10, batch_size=32, device="cpu") -> dict[str, float]:
    """HR@k and NDCG@k of each user's last item, predicted from the events before it (all items ranked)."""
    model.eval()
    context = seqs.recent(max_len=model.cfg.max_seq_len, drop_last=True)
    targets = torch.tensor([a[-1] for a in seqs.items])
    hits, gains = [], []
    for start in range(0, len(seqs), batch_size):
        rows = list(range(start, min(start + batch_size, len(seqs))))
        batch = jagged_batch(context, rows, device)
        hidden = model(batch["item_ids"], batch["offsets"], timestamps=batch["timestamps"])
        scores = model.item_scores(hidden[batch["offsets"][1:] - 1])
        target = targets[rows].to(device)
        rank = (scores > scores.gather(1, target[:, None])).sum(1)  # 0-based rank of the true item
        hits.append((rank < k).float())
        gains.append(torch.where(rank < k, 1.0 / torch.log2(rank.float() + 2), torch.zeros_like(rank, dtype=torch.float)))
    return {f"hr@{k}": torch.cat(hits).mean().item(), f"ndcg@{k}": torch.cat(gains).mean().item()}
