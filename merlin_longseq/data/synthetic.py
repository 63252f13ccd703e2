"""Synthetic user histories in which long histories carry signal.

Each user has a true profile: `interests_per_user` topics and, per topic, `favorites_per_topic` favourite
items. The history is a chain of sessions; each session stays on one topic, chosen by `session_order`:
  round_robin  the topics recur in a fixed order, so a topic comes back only after all the user's other
               interests had a turn (a gap of roughly interests_per_user * mean_session_len events). The
               user's LAST event opens a new session: its topic is the least recently visited interest and
               its item is often a favourite seen long ago, so a model that reads 1,000 events can predict it
               and one that reads the last 50 cannot (next-item signal).
  weighted     each session draws its topic from the interests with Zipf weights 1 / rank**interest_skew:
               a few interests come back often, most come back rarely, so a window of the last L events
               reveals more of the profile the longer it is, with no single cut-off length (ranking signal).
A session draws the user's favourites of its topic with probability `p_favorite`, otherwise popular items
of the topic (Zipf inside a topic); `p_noise` of events are uniformly random items.

Impressions (for ranking, `generate_impressions`): requests at points of each user's history. Candidates
come in three groups of the request: favourites of the user (uniform over ALL interests, rare ones as often
as frequent ones), other items of the user's interest topics (uniform over interests) and random items.
Labels come from the TRUE profile, never from the observed history:
    P(click) = sigmoid(click_bias + favorite_weight * [candidate is a favourite]
                                  + interest_weight * [candidate's topic is an interest])
    like = click and favourite, with probability p_like.
So a model can only recover the labels by reading the profile out of the history; with session_order
"weighted" the rarely revisited interests show up only in long histories, and a model that reads 4,096 events
recovers more of the profile than one that reads 256.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ACTION_VIEW, ACTION_CLICK, ACTION_LIKE = 1, 2, 3
SESSION_GAP_S = 86_400  # mean gap between sessions
EVENT_GAP_S = 90  # mean gap inside a session
SESSION_ORDERS = ("round_robin", "weighted")


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
    session_order: str = "round_robin"  # or "weighted" (see the module docstring)
    interest_skew: float = 1.0  # Zipf exponent of the interest weights (session_order="weighted" only)
    seed: int = 0

    def __post_init__(self):
        if self.num_users < 1 or self.num_items < self.num_topics or self.num_topics < self.interests_per_user:
            raise ValueError("need num_users >= 1, num_items >= num_topics >= interests_per_user")
        if self.interests_per_user < 1 or self.favorites_per_topic < 1:
            raise ValueError("need interests_per_user >= 1 and favorites_per_topic >= 1")
        if not 1 <= self.min_history <= self.max_history:
            raise ValueError("need 1 <= min_history <= max_history")
        if self.mean_session_len < 1:
            raise ValueError(f"mean_session_len must be >= 1, got {self.mean_session_len}")
        if self.session_order not in SESSION_ORDERS:
            raise ValueError(f"session_order must be one of {SESSION_ORDERS}, got {self.session_order!r}")
        if self.interest_skew < 0:
            raise ValueError(f"interest_skew must be >= 0, got {self.interest_skew}")
        for name in ("p_favorite", "p_noise"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")


@dataclass
class UserProfile:
    """A user's ground truth: interest topics (most frequent first under session_order="weighted") and
    the favourite items of those topics."""

    interests: np.ndarray  # [interests_per_user] topic ids
    favorite_items: np.ndarray  # [interests_per_user * favorites_per_topic] item ids (may repeat)


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

    def popular_items(self, rng, topics):
        """One item per entry of `topics`, by popularity inside the topic."""
        rank = (self.topic_cumprob[topics] < rng.random(len(topics))[:, None]).sum(axis=1)
        return self.topic_item_table[topics, rank]

    def draw_items(self, rng, topics, favorites):
        """One item per event of the given topics."""
        cfg = self.cfg
        n = len(topics)
        popular = self.popular_items(rng, topics)
        favorite = favorites[topics, rng.integers(0, favorites.shape[1], size=n)]
        items = np.where(rng.random(n) < cfg.p_favorite, favorite, popular)
        noise = rng.random(n) < cfg.p_noise
        items[noise] = rng.integers(1, cfg.num_items + 1, size=int(noise.sum()))
        return items


def _simulate(cfg: SyntheticConfig, progress: bool = False):
    """(event columns per user, profiles per user), users 1..num_users; one RNG stream for both."""
    from tqdm.auto import tqdm

    world = _World(cfg)
    rng = world.rng
    histories, profiles = [], []
    for _ in tqdm(range(cfg.num_users), desc="users", disable=not progress, leave=False):
        interests, favorites = world.user_profile(rng)
        length = int(rng.integers(cfg.min_history, cfg.max_history + 1))
        histories.append(_user_history(world, rng, interests, favorites, length))
        profiles.append(UserProfile(interests=interests, favorite_items=favorites[interests].ravel()))
    return world, histories, profiles


def _events_frame(histories):
    import pandas as pd

    lengths = [len(items) for items, _, _ in histories]
    return pd.DataFrame({
        "user_id": np.repeat(np.arange(1, len(histories) + 1, dtype=np.int64), lengths),
        "item_id": np.concatenate([h[0] for h in histories]),
        "timestamp": np.concatenate([h[1] for h in histories]),
        "action": np.concatenate([h[2] for h in histories]),
    })


def generate_events(cfg: SyntheticConfig | None = None, progress: bool = False, **overrides):
    """Event log: pandas DataFrame [user_id, item_id, timestamp, action], time-ordered per user.

    user ids are 1..num_users, item ids 1..num_items, timestamps int64 seconds, actions 1=view 2=click 3=like.
    """
    cfg = cfg or SyntheticConfig(**overrides)
    _, histories, _ = _simulate(cfg, progress)
    return _events_frame(histories)


def user_profiles(cfg: SyntheticConfig) -> list[UserProfile]:
    """The true profile of every user (index u - 1 for user u) of generate_events(cfg)."""
    return _simulate(cfg)[2]


def _user_history(world, rng, interests, favorites, length):
    cfg = world.cfg
    # round-robin sessions for all but the last event; the last event opens the next session
    order = rng.permutation(interests) if cfg.session_order == "round_robin" else None
    session_lens = 1 + rng.poisson(cfg.mean_session_len - 1, size=length)
    ends = np.cumsum(session_lens)
    num_sessions = int(np.searchsorted(ends, length - 1)) + 1
    session_lens = session_lens[:num_sessions]
    session_lens[-1] -= ends[num_sessions - 1] - (length - 1)  # the last session ends at event length - 1
    session_lens = session_lens[session_lens > 0]
    if order is not None:
        first_turn = int(rng.integers(len(order)))
        session_topics = order[(first_turn + np.arange(len(session_lens) + 1)) % len(order)]
    else:
        # interests[0] is the most frequent: rank r comes back about every H / (1/r**skew) sessions
        weights = 1.0 / np.arange(1, len(interests) + 1) ** cfg.interest_skew
        session_topics = interests[rng.choice(len(interests), size=len(session_lens) + 1, p=weights / weights.sum())]
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
    *,
    request_start: float = 0.5,
    last_request_at_end: bool = False,
    click_bias: float = -2.0,
    favorite_weight: float = 2.5,
    interest_weight: float = 1.5,
    p_like: float = 0.7,
    **overrides,
):
    """Impression log for ranking: DataFrame [user_id, request_id, request_time, item_id, click, like].

    Each user gets `requests_per_user` requests, each after a random cut point of the history drawn in
    [request_start * length, length] (time order = request id order within a user); with
    last_request_at_end the user's last request comes after the last event (the whole history is before it).
    Every request shows `candidates_per_request` distinct items (1/4 favourites, 1/4 other items of interest
    topics, the rest random; see the module docstring for the labels). Request ids are 1, 2, ... in user order.
    Returns (events, impressions). `events` is accepted for compatibility (an event log of the same config):
    the labels need the users' true profiles, which are re-simulated from cfg either way.
    """
    import pandas as pd

    cfg = cfg or SyntheticConfig(**overrides)
    if requests_per_user < 1 or candidates_per_request < 1:
        raise ValueError("need requests_per_user >= 1 and candidates_per_request >= 1")
    if candidates_per_request > cfg.num_items:
        raise ValueError(f"candidates_per_request={candidates_per_request} exceeds num_items={cfg.num_items}")
    if not 0.0 <= request_start <= 1.0:
        raise ValueError(f"request_start must be in [0, 1], got {request_start}")
    world, histories, profiles = _simulate(cfg)
    if events is None:
        events = _events_frame(histories)
    elif len(events) != sum(len(h[0]) for h in histories):
        raise ValueError("`events` is not the event log of this config (generate_events(cfg)); pass events=None")
    rng = np.random.default_rng(cfg.seed + 1)
    n = candidates_per_request
    n_fav, n_interest = n // 4, n // 4
    columns = {name: [] for name in ("user_id", "request_id", "request_time", "item_id", "click", "like")}
    request_id = 0
    for user, ((items, times, _), profile) in enumerate(zip(histories, profiles), start=1):
        length = len(items)
        cuts = np.sort(rng.integers(int(request_start * length), length + 1, size=requests_per_user))
        if last_request_at_end:
            cuts[-1] = length
        favorites = np.unique(profile.favorite_items)
        for cut in cuts:
            request_id += 1
            # strictly after the last event before the cut, and before the next event (gaps are >= 1 s)
            if cut == 0:
                request_time = int(times[0])
            elif cut == length:
                request_time = int(times[-1]) + int(rng.integers(60, 3600))
            else:
                request_time = int(times[cut - 1]) + int(rng.integers(1, int(times[cut] - times[cut - 1]) + 1))
                request_time = min(request_time, int(times[cut]))
            candidates = _draw_candidates(world, rng, profile, favorites, n, n_fav, n_interest)
            is_favorite = np.isin(candidates, favorites)
            is_interest = np.isin(world.item_topic[candidates - 1], profile.interests)
            logit = click_bias + favorite_weight * is_favorite + interest_weight * is_interest
            click = rng.random(n) < 1.0 / (1.0 + np.exp(-logit))
            like = click & is_favorite & (rng.random(n) < p_like)
            columns["user_id"].append(np.full(n, user, dtype=np.int64))
            columns["request_id"].append(np.full(n, request_id, dtype=np.int64))
            columns["request_time"].append(np.full(n, request_time, dtype=np.int64))
            columns["item_id"].append(candidates)
            columns["click"].append(click.astype(np.int64))
            columns["like"].append(like.astype(np.int64))
    impressions = pd.DataFrame({k: np.concatenate(v) for k, v in columns.items()})
    return events, impressions


def _draw_candidates(world, rng, profile, favorites, n, n_fav, n_interest):
    """n distinct items: favourites, popular items of interest topics (both uniform over interests), random."""
    cfg = world.cfg
    fav = rng.choice(favorites, size=min(n_fav, len(favorites)), replace=False)
    interest = world.popular_items(rng, rng.choice(profile.interests, size=n_interest))
    drawn = np.concatenate([fav, interest, rng.integers(1, cfg.num_items + 1, size=n - len(fav) - n_interest)])
    _, first = np.unique(drawn, return_index=True)
    kept = drawn[np.sort(first)]
    if len(kept) < n:  # replace repeats by random items not shown yet
        extra = rng.choice(np.setdiff1d(np.arange(1, cfg.num_items + 1), kept), size=n - len(kept), replace=False)
        kept = np.concatenate([kept, extra])
    return rng.permutation(kept).astype(np.int64)
