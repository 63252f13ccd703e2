"""Synthetic user histories in which long histories carry signal.

Each user has `interests_per_user` topics and, per topic, a few favourite items. The history is a chain of
sessions; each session stays on one topic and the topics recur round-robin, so a topic comes back only
after all the user's other interests had a turn (a gap of roughly interests_per_user * mean_session_len
events). A session draws the user's favourites of its topic with probability `p_favorite`, otherwise popular
items of the topic. Each user's LAST event opens a new session: its topic is the least recently visited
interest and its item is often a favourite seen long ago, so a model that reads 1,000 events can predict it
and one that reads the last 50 cannot.

Impressions (for ranking): requests at points of the history, each showing candidates from the user's
interests, from recent topics and from random topics; click probability rises for favourites and long-term
interests, so the label also depends on the far history.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ACTION_VIEW, ACTION_CLICK, ACTION_LIKE = 1, 2, 3
SESSION_GAP_S = 86_400  # mean gap between sessions
EVENT_GAP_S = 90  # mean gap inside a session


@dataclass
class SyntheticConfig:
    num_users: int = 500
    num_items: int = 2000
    num_topics: int = 100
    interests_per_user: int = 16
    favorites_per_topic: int = 3
    p_favorite: float = 0.6
    p_noise: float = 0.05  # a uniformly random item
    mean_session_len: float = 8.0
    min_history: int = 200
    max_history: int = 1000
    seed: int = 0

    def __post_init__(self):
        if self.num_users < 1 or self.num_items < self.num_topics or self.num_topics < self.interests_per_user:
            raise ValueError("need num_users >= 1, num_items >= num_topics >= interests_per_user")
        if not 1 <= self.min_history <= self.max_history:
            raise ValueError("need 1 <= min_history <= max_history")


class _World:
    def __init__(self, cfg: SyntheticConfig):
        self.cfg = cfg
        rng = np.random.default_rng(cfg.seed)
        self.rng = rng
        self.item_topic = rng.integers(0, cfg.num_topics, size=cfg.num_items)
        # every topic needs at least one item
        self.item_topic[: cfg.num_topics] = np.arange(cfg.num_topics)
        self.topic_items = [np.flatnonzero(self.item_topic == t) + 1 for t in range(cfg.num_topics)]  # 1-based
        # padded [topic, rank] tables so that draws for many events at once are one vectorised lookup
        width = max(len(items) for items in self.topic_items)
        self.topic_item_table = np.zeros((cfg.num_topics, width), dtype=np.int64)
        self.topic_cumprob = np.full((cfg.num_topics, width), 2.0)  # > 1: never chosen
        for t, items in enumerate(self.topic_items):
            weights = 1.0 / np.arange(1, len(items) + 1) ** 1.1  # Zipf inside a topic
            self.topic_item_table[t, : len(items)] = items
            self.topic_cumprob[t, : len(items)] = np.cumsum(weights / weights.sum())
            self.topic_cumprob[t, len(items) - 1] = 1.0

    def user_profile(self, rng):
        """Interest topics and a [num_topics, favorites] table of the user's favourites (rows of interests)."""
        cfg = self.cfg
        interests = rng.choice(cfg.num_topics, size=cfg.interests_per_user, replace=False)
        favorites = np.zeros((cfg.num_topics, cfg.favorites_per_topic), dtype=np.int64)
        for t in interests:
            items = self.topic_items[t]
            favorites[t] = rng.choice(items, size=cfg.favorites_per_topic, replace=len(items) < cfg.favorites_per_topic)
        return interests, favorites

    def draw_items(self, rng, topics, favorites):
        """One item per event of the given topics."""
        cfg = self.cfg
        n = len(topics)
        rank = (self.topic_cumprob[topics] < rng.random(n)[:, None]).sum(axis=1)
        popular = self.topic_item_table[topics, rank]
        favorite = favorites[topics, rng.integers(0, favorites.shape[1], size=n)]
        items = np.where(rng.random(n) < cfg.p_favorite, favorite, popular)
        noise = rng.random(n) < cfg.p_noise
        items[noise] = rng.integers(1, cfg.num_items + 1, size=int(noise.sum()))
        return items


def generate_events(cfg: SyntheticConfig | None = None, progress: bool = False, **overrides):
    """Event log: pandas DataFrame [user_id, item_id, timestamp, action], time-ordered per user.

    user ids are 1..num_users, item ids 1..num_items, timestamps int64 seconds, actions 1=view 2=click 3=like.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    cfg = cfg or SyntheticConfig(**overrides)
    world = _World(cfg)
    rng = world.rng
    columns = {"user_id": [], "item_id": [], "timestamp": [], "action": []}
    for user in tqdm(range(1, cfg.num_users + 1), desc="users", disable=not progress, leave=False):
        interests, favorites = world.user_profile(rng)
        length = int(rng.integers(cfg.min_history, cfg.max_history + 1))
        items, times, actions = _user_history(world, rng, interests, favorites, length)
        columns["user_id"].append(np.full(length, user, dtype=np.int64))
        columns["item_id"].append(items)
        columns["timestamp"].append(times)
        columns["action"].append(actions)
    return pd.DataFrame({k: np.concatenate(v) for k, v in columns.items()})


def _user_history(world, rng, interests, favorites, length):
    cfg = world.cfg
    order = rng.permutation(interests)
    # round-robin sessions for all but the last event; the last event opens the next session
    session_lens = 1 + rng.poisson(cfg.mean_session_len - 1, size=length)
    ends = np.cumsum(session_lens)
    num_sessions = int(np.searchsorted(ends, length - 1)) + 1
    session_lens = session_lens[:num_sessions]
    session_lens[-1] -= ends[num_sessions - 1] - (length - 1)  # the last session ends at event length - 1
    session_lens = session_lens[session_lens > 0]
    first_turn = int(rng.integers(len(order)))
    session_topics = order[(first_turn + np.arange(len(session_lens) + 1)) % len(order)]
    topics = np.concatenate([np.repeat(session_topics[:-1], session_lens), session_topics[-1:]])[:length]
    items = world.draw_items(rng, topics, favorites)
    session_start = np.r_[True, topics[1:] != topics[:-1]]
    gaps = np.where(session_start, rng.exponential(SESSION_GAP_S, length), rng.exponential(EVENT_GAP_S, length))
    times = 1_700_000_000 + np.cumsum(np.maximum(gaps.astype(np.int64), 1))
    # an item belongs to exactly one topic, so "favourite of its topic" is "any favourite"
    is_favorite = np.isin(items, favorites[interests].ravel())
    actions = np.where(is_favorite & (rng.random(length) < 0.5), ACTION_LIKE,
                       np.where(rng.random(length) < 0.5, ACTION_CLICK, ACTION_VIEW)).astype(np.int64)
    return items.astype(np.int64), times, actions


def generate_impressions(
    cfg: SyntheticConfig | None = None,
    events=None,
    requests_per_user: int = 4,
    candidates_per_request: int = 16,
    **overrides,
):
    """Impression log for ranking: DataFrame [user_id, request_id, request_time, item_id, click, like].

    Requests fall after a random point of each user's history (the last request after the last event).
    Returns (events, impressions); pass `events` to reuse an existing event log of the same config.
    """
    import pandas as pd

    cfg = cfg or SyntheticConfig(**overrides)
    if events is None:
        events = generate_events(cfg)
    world = _World(cfg)
    rng = np.random.default_rng(cfg.seed + 1)
    user_rows = {}
    for user, frame in events.groupby("user_id", sort=True):
        user_rows[int(user)] = frame
    rows = []
    request_id = 0
    for user, frame in user_rows.items():
        items = frame["item_id"].to_numpy()
        times = frame["timestamp"].to_numpy()
        topics = world.item_topic[items - 1]
        interest_counts = np.bincount(topics, minlength=cfg.num_topics)
        long_term = set(np.flatnonzero(interest_counts >= 3).tolist())
        item_counts = np.bincount(items, minlength=cfg.num_items + 1)
        cut_points = np.sort(rng.integers(len(items) // 2, len(items) + 1, size=requests_per_user))
        for cut in cut_points:
            request_id += 1
            request_time = int(times[cut - 1]) + int(rng.integers(60, 3600)) if cut > 0 else int(times[0])
            past_items, past_topics = items[:cut], topics[:cut]
            recent_topics = set(past_topics[-30:].tolist())
            seen = item_counts if cut == len(items) else np.bincount(past_items, minlength=cfg.num_items + 1)
            candidates = _draw_candidates(world, rng, past_items, long_term, candidates_per_request)
            cand_topics = world.item_topic[candidates - 1]
            logit = (-2.2
                     + 1.6 * (seen[candidates] >= 2)
                     + 1.0 * np.isin(cand_topics, list(long_term))
                     - 0.8 * np.isin(cand_topics, list(recent_topics)))
            click = (rng.random(len(candidates)) < 1 / (1 + np.exp(-logit))).astype(np.int64)
            like = (click & (seen[candidates] >= 3) & (rng.random(len(candidates)) < 0.7)).astype(np.int64)
            for item, c, lk in zip(candidates, click, like):
                rows.append((user, request_id, request_time, int(item), int(c), int(lk)))
    impressions = pd.DataFrame(rows, columns=["user_id", "request_id", "request_time", "item_id", "click", "like"])
    return events, impressions


def _draw_candidates(world, rng, past_items, long_term, n):
    cfg = world.cfg
    n_hist = n // 2
    distinct_past = np.unique(past_items)
    from_history = rng.choice(distinct_past, size=min(n_hist, len(distinct_past)), replace=False)
    interest_topics = np.array(sorted(long_term)) if long_term else np.arange(cfg.num_topics)
    n_topic = (n - len(from_history)) // 2
    topic_draws = rng.choice(interest_topics, size=n_topic)
    from_topics = np.array([rng.choice(world.topic_items[t]) for t in topic_draws], dtype=np.int64)
    random_items = rng.integers(1, cfg.num_items + 1, size=n - len(from_history) - n_topic)
    return np.concatenate([from_history, from_topics, random_items]).astype(np.int64)
