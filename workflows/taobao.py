"""Taobao UserBehavior (Alibaba / Tianchi): the reader and the day requests of the request-level ranking task.

File: `UserBehavior.csv` or a head of it (../shared/data/taobao-userbehavior-head/UserBehavior_head_814users.csv
beside the repository, or $MERLIN_LONGSEQ_TAOBAO): no header, one event per line,
    user_id,item_id,category_id,behavior_type,timestamp
behaviour pv (page view), cart, fav or buy; timestamp in unix seconds. The data is for research only and must
not be redistributed: nothing here copies it anywhere; the reader takes a path.

Reader output, sorted by (user_id, timestamp, row order in the file) so ties keep the file's order:
    user_id, item_id, category_id, timestamp int64; behavior str; action int64 (pv 1, cart 2, fav 3, buy 4);
    day int64 (the calendar day in Beijing time, UTC+8: days since 1970-01-01 there)
Rows outside the dataset's nominal window (2017-11-25 .. 2017-12-03, Beijing time) are noise in the original
dataset (35 rows of the 814-user head, the earliest 2017-09-11) and are dropped (window=None keeps them).

Request task (daily_requests), stated once here:
- a request is one user's calendar day in Beijing time;
- its candidates are the distinct items the user page-viewed (pv) that day, in the order of their first view;
- label `positive` = the user carted, favourited or bought that item on the same day (before or after the view).
  Cart / fav / buy events on items the user did not view that day make no candidate (on the 814-user head,
  5,547 of 8,310 such (user, day, item) actions); they still enter later days' histories;
- request_time = the day's first event (any behaviour), so the history (RequestGrouping: events strictly before
  request_time, most recent last, every behaviour, action = behaviour type) holds nothing of the request's own
  day. That is the leakage rule; the split (the job's) is in time per user as well.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

ENV_TAOBAO = "MERLIN_LONGSEQ_TAOBAO"
HEAD_FILE = "UserBehavior_head_814users.csv"
COLUMNS = ["user_id", "item_id", "category_id", "behavior", "timestamp"]
BEHAVIORS = ("pv", "cart", "fav", "buy")  # action ids 1..4 in this order; 0 stays "unknown / padding"
POSITIVE_BEHAVIORS = ("cart", "fav", "buy")
UTC_OFFSET_SECONDS = 8 * 3600  # Beijing time
SECONDS_PER_DAY = 86_400
WINDOW = ("2017-11-25", "2017-12-03")  # first and last day of the dataset, Beijing time, inclusive
ITEM_KEYS = {"item": "item_id", "category": "category_id"}  # the job's item_key -> the token column


def default_taobao_path() -> Path:
    """$MERLIN_LONGSEQ_TAOBAO, else <repo>/../shared/data/taobao-userbehavior-head/<head file> (never in the repo)."""
    override = os.environ.get(ENV_TAOBAO)
    if override:
        return Path(override)
    repo = Path(__file__).resolve().parent.parent
    return repo.parent / "shared" / "data" / "taobao-userbehavior-head" / HEAD_FILE


def beijing_day(timestamp) -> np.ndarray:
    """Calendar day (days since 1970-01-01) of unix-second timestamps in Beijing time (UTC+8)."""
    return (np.asarray(timestamp, dtype=np.int64) + UTC_OFFSET_SECONDS) // SECONDS_PER_DAY


def _day_number(date: str) -> int:
    return int((pd.Timestamp(date) - pd.Timestamp("1970-01-01")).days)


def read_taobao(path=None, window: tuple[str, str] | None = WINDOW) -> pd.DataFrame:
    """The event log of a Taobao UserBehavior CSV (a file, or a folder holding exactly one .csv); see the module
    docstring. window: (first, last) day in Beijing time, inclusive; rows outside it are dropped (None keeps
    all). Errors name the file and the offending row."""
    path = Path(path) if path is not None else default_taobao_path()
    if path.is_dir():
        found = sorted(path.glob("*.csv"))
        if len(found) != 1:
            raise FileNotFoundError(f"{path} holds {len(found)} .csv files; pass the UserBehavior CSV itself")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"no Taobao UserBehavior file at {path}; point to a local copy (--data or "
                                f"${ENV_TAOBAO}). The data is research-only and is never kept in the repository")
    try:
        frame = pd.read_csv(path, header=None, dtype=str, skip_blank_lines=True)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}: the file is empty") from None
    except pd.errors.ParserError as err:
        raise ValueError(f"{path}: cannot parse as comma-separated UserBehavior rows with 5 fields "
                         f"({','.join(COLUMNS)}): {err}") from err
    if frame.shape[1] != len(COLUMNS):
        raise ValueError(f"{path}: expected {len(COLUMNS)} comma-separated fields per line ({','.join(COLUMNS)}, "
                         f"no header), got {frame.shape[1]}")
    frame.columns = COLUMNS
    numeric = frame[["user_id", "item_id", "category_id", "timestamp"]].apply(pd.to_numeric, errors="coerce")
    bad = numeric.isna().any(axis=1).to_numpy() | frame["behavior"].isna().to_numpy()
    if bad.any():
        row = int(bad.argmax())
        hint = " (the file must have no header line)" if row == 0 else ""
        raise ValueError(f"{path}: line {row + 1} has a missing or non-numeric field{hint}: "
                         f"{frame.iloc[row].to_dict()}")
    unknown = sorted(set(frame["behavior"].unique()) - set(BEHAVIORS))
    if unknown:
        row = int((~frame["behavior"].isin(BEHAVIORS)).to_numpy().argmax())
        raise ValueError(f"{path}: unknown behavior_type {unknown} (first on line {row + 1}); expected one of "
                         f"{list(BEHAVIORS)}")
    events = pd.DataFrame({name: numeric[name].astype("int64") for name in ("user_id", "item_id", "category_id")})
    events["timestamp"] = numeric["timestamp"].astype("int64")
    events["behavior"] = frame["behavior"].to_numpy()
    events["action"] = frame["behavior"].map({b: i + 1 for i, b in enumerate(BEHAVIORS)}).astype("int64")
    events["day"] = beijing_day(events["timestamp"])
    if window is not None:
        first, last = (_day_number(day) for day in window)
        if first > last:
            raise ValueError(f"window {window}: the first day is after the last")
        events = events[(events["day"] >= first) & (events["day"] <= last)]
        if events.empty:
            raise ValueError(f"{path}: no event inside the window {window[0]} .. {window[1]} (Beijing time)")
    # stable: events with one timestamp keep the file's order (view -> cart -> buy in one second is common)
    return events.sort_values(["user_id", "timestamp"], kind="mergesort", ignore_index=True)


def daily_requests(events: pd.DataFrame) -> pd.DataFrame:
    """Impression log of day requests (module docstring): one row per (user, Beijing day, distinct viewed item).

    Columns user_id, request_id (numbers the (user, day) pairs in (user, day) order), request_time (the day's
    first event of any behaviour), item_id, category_id, positive (carted, favourited or bought that day).
    Days without a page view make no request.
    """
    required = ["user_id", "item_id", "category_id", "timestamp", "behavior"]
    missing = [c for c in required if c not in events.columns]
    if missing:
        raise ValueError(f"event log is missing column(s) {missing}; it has {list(events.columns)} "
                         "(read it with read_taobao)")
    frame = events.sort_values(["user_id", "timestamp"], kind="mergesort", ignore_index=True)
    frame = frame.assign(day=beijing_day(frame["timestamp"]))
    first_event = frame.groupby(["user_id", "day"], sort=False)["timestamp"].min().rename("request_time")
    acted = frame.loc[frame["behavior"].isin(POSITIVE_BEHAVIORS), ["user_id", "day", "item_id"]].drop_duplicates()
    viewed = frame.loc[frame["behavior"] == "pv", ["user_id", "day", "item_id", "category_id"]]
    viewed = viewed.drop_duplicates(["user_id", "day", "item_id"])  # first view of the day, in time order
    out = viewed.merge(acted.assign(positive=1), how="left", on=["user_id", "day", "item_id"], validate="1:1")
    out = out.merge(first_event, how="left", left_on=["user_id", "day"], right_index=True, validate="m:1")
    # merges keep the left order: (user, time of first view); one request per (user, day)
    new_request = (out["user_id"] != out["user_id"].shift()) | (out["day"] != out["day"].shift())
    return pd.DataFrame({
        "user_id": out["user_id"].astype("int64"),
        "request_id": (new_request.cumsum() - 1).astype("int64"),
        "request_time": out["request_time"].astype("int64"),
        "item_id": out["item_id"].astype("int64"),
        "category_id": out["category_id"].astype("int64"),
        "positive": out["positive"].fillna(0).astype("int64"),
    })
