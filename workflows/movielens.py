"""MovieLens readers and NVTabular workflows: next-item sequences (leave-one-out) and ranking requests.

Readers turn the three MovieLens rating formats into the event log the other workflows take:
    ml-100k   u.data        user \\t item \\t rating \\t timestamp           (no header)
    ml-1m/10m ratings.dat   user::item::rating::timestamp                   (no header)
    ml-20m+   ratings.csv   userId,movieId,rating,timestamp                 (header)
Output frame, sorted by (user_id, timestamp, row order in the file) so ties keep the file's order:
    user_id int64, item_id int64, timestamp int64 (seconds), rating float64, action int64
where `action` is the rating bucket (ceil(rating), 1..5; half stars round up) or, with action="positive",
int(rating >= 4).

The data's license forbids redistribution: nothing here copies it anywhere; readers take a path. With
download=True a missing dataset is fetched from files.grouplens.org into the given folder; offline, that
fails with a message saying so.

Next-item (leave-one-out, the SASRec / HSTU protocol): for a user with n time-ordered events
    train  events 1 .. n-2   (every position predicts the next one; causal training)
    valid  events 1 .. n-1   (predict event n-1 from the ones before it)
    test   events 1 .. n     (predict event n from the ones before it)
each cut to its most recent `max_seq_len` events and right-padded with 0 (Transformers4Rec's layout). One
Categorify fit over the whole log gives every split the same item ids.

Ranking: a request is one user's events of one calendar day (UTC); its candidates are the items rated that
day with label `positive` = rating >= 4, its history the user's events strictly before the day's first
event (workflows.request_grouping.RequestGrouping enforces the strictness).
"""
from __future__ import annotations

import os
import urllib.error
import warnings
import urllib.request
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

ENV_ML100K = "MERLIN_LONGSEQ_ML100K"
EVENT_COLUMNS = ["user_id", "item_id", "timestamp", "rating", "action"]
ACTION_MODES = ("rating", "positive")
POSITIVE_RATING = 4.0
SECONDS_PER_DAY = 86_400

# GroupLens archive names; each unpacks to a folder of the same name
DOWNLOAD_URL = "https://files.grouplens.org/datasets/movielens/{name}.zip"
RATINGS_FILES = {"ml-100k": "u.data", "ml-1m": "ratings.dat", "ml-10m": "ratings.dat",
                 "ml-20m": "ratings.csv", "ml-25m": "ratings.csv", "ml-32m": "ratings.csv"}
# ml-10m unpacks to ml-10M100K/
ARCHIVE_FOLDERS = {"ml-10m": "ml-10M100K"}


def default_ml100k_dir() -> Path:
    """$MERLIN_LONGSEQ_ML100K, else <repo>/../shared/data/ml-100k (the data lives beside the repo, never in it)."""
    override = os.environ.get(ENV_ML100K)
    if override:
        return Path(override)
    repo = Path(__file__).resolve().parent.parent
    return repo.parent / "shared" / "data" / "ml-100k"


# ---------------------------------------------------------------------------------------------- readers

def _finish(frame: pd.DataFrame, action: str, source) -> pd.DataFrame:
    """Common checks, types, action column and deterministic order for every reader."""
    if action not in ACTION_MODES:
        raise ValueError(f"action must be one of {ACTION_MODES}, got {action!r}")
    if len(frame) == 0:
        raise ValueError(f"{source}: no ratings found")
    if frame.isna().any().any():
        bad = int(frame.isna().any(axis=1).to_numpy().argmax())
        raise ValueError(f"{source}: row {bad} has a missing or non-numeric field: {frame.iloc[bad].to_dict()}")
    out = pd.DataFrame({
        "user_id": frame["user_id"].astype("int64"),
        "item_id": frame["item_id"].astype("int64"),
        "timestamp": frame["timestamp"].astype("int64"),
        "rating": frame["rating"].astype("float64"),
    })
    if ((out["rating"] < 0.5) | (out["rating"] > 5.0)).any():
        bad = out.loc[(out["rating"] < 0.5) | (out["rating"] > 5.0), "rating"].iloc[0]
        raise ValueError(f"{source}: rating {bad} outside MovieLens' 0.5..5 scale")
    if action == "rating":
        out["action"] = np.ceil(out["rating"].to_numpy()).astype("int64")
    else:
        out["action"] = (out["rating"] >= POSITIVE_RATING).astype("int64")
    # stable sort: events with one timestamp keep the file's order (MovieLens has many same-second ratings)
    out = out.sort_values(["user_id", "timestamp"], kind="mergesort", ignore_index=True)
    return out


def _read_delimited(path, sep: str, header, names) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, sep=sep, header=header, names=names, engine="python" if len(sep) > 1 else "c",
                            dtype=str, skip_blank_lines=True)
    except pd.errors.ParserError as err:
        raise ValueError(f"{path}: cannot parse as {sep!r}-separated ratings, expected 4 fields per line "
                         f"(user, item, rating, timestamp): {err}") from err
    if frame.shape[1] != 4:
        raise ValueError(f"{path}: expected 4 fields per line (user, item, rating, timestamp), "
                         f"got {frame.shape[1]}")
    return frame.apply(pd.to_numeric, errors="coerce")


def read_ml100k(path, action: str = "rating") -> pd.DataFrame:
    """ML-100K `u.data` (tab-separated, no header); `path` is the file or the folder holding it."""
    path = _ratings_path(path, "u.data")
    frame = _read_delimited(path, "\t", None, ["user_id", "item_id", "rating", "timestamp"])
    _check_against_info(path, len(frame))
    return _finish(frame, action, path)


def _check_against_info(path: Path, count: int) -> None:
    """Warn when u.info (beside u.data) announces another number of ratings: a truncated or edited copy."""
    info = path.parent / "u.info"
    if not info.is_file():
        return
    for line in info.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1] == "ratings" and parts[0].isdigit() and int(parts[0]) != count:
            warnings.warn(f"{path} holds {count:,} ratings but {info} announces {int(parts[0]):,}: the copy "
                          "looks truncated or edited", stacklevel=3)


def read_ratings_dat(path, action: str = "rating") -> pd.DataFrame:
    """ML-1M / ML-10M `ratings.dat` ('::'-separated, no header); a file or its folder."""
    path = _ratings_path(path, "ratings.dat")
    frame = _read_delimited(path, "::", None, ["user_id", "item_id", "rating", "timestamp"])
    return _finish(frame, action, path)


def read_ratings_csv(path, action: str = "rating") -> pd.DataFrame:
    """ML-20M (and later) `ratings.csv`: header userId,movieId,rating,timestamp; a file or its folder."""
    path = _ratings_path(path, "ratings.csv")
    frame = pd.read_csv(path, dtype=str)
    expected = ["userId", "movieId", "rating", "timestamp"]
    if list(frame.columns) != expected:
        raise ValueError(f"{path}: header must be {','.join(expected)}, got {','.join(map(str, frame.columns))}")
    frame = frame.rename(columns={"userId": "user_id", "movieId": "item_id"})
    return _finish(frame.apply(pd.to_numeric, errors="coerce"), action, path)


def _ratings_path(path, file_name: str) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / file_name
    if not path.is_file():
        raise FileNotFoundError(f"no MovieLens ratings file at {path}")
    return path


_READERS = {"u.data": read_ml100k, "ratings.dat": read_ratings_dat, "ratings.csv": read_ratings_csv}


def read_movielens(path, action: str = "rating", download: bool = False, name: Optional[str] = None) -> pd.DataFrame:
    """Any MovieLens ratings file, or a folder holding one (u.data, ratings.dat or ratings.csv).

    A missing folder is an error unless download=True, in which case `name` (ml-100k, ml-1m, ml-20m, ...;
    default: the folder's name) is fetched from GroupLens into `path`.
    """
    path = Path(path)
    if path.is_file():
        if path.name not in _READERS:
            raise ValueError(f"{path}: unknown MovieLens file; expected one of {sorted(_READERS)}")
        return _READERS[path.name](path, action=action)
    if not path.is_dir() or not any((path / f).is_file() for f in _READERS):
        if not download:
            raise FileNotFoundError(
                f"no MovieLens ratings (u.data, ratings.dat or ratings.csv) under {path}; point to a local copy "
                f"(for ML-100K: ${ENV_ML100K}) or pass download=True to fetch it from GroupLens")
        download_movielens(name or path.name, path)
    for file_name, reader in _READERS.items():
        if (path / file_name).is_file():
            return reader(path / file_name, action=action)
    raise FileNotFoundError(f"no MovieLens ratings file under {path} after download")


def download_movielens(name: str, dest, timeout: float = 30.0) -> Path:
    """Fetch the GroupLens archive `name` (ml-100k, ml-1m, ...) and unpack its files into `dest`."""
    if name not in RATINGS_FILES:
        raise ValueError(f"unknown MovieLens dataset {name!r}; choose from {sorted(RATINGS_FILES)}")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    url = DOWNLOAD_URL.format(name=name)
    archive = dest / f"{name}.zip"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(archive, "wb") as out:
            out.write(response.read())
    except (urllib.error.URLError, OSError) as err:
        archive.unlink(missing_ok=True)
        raise ConnectionError(
            f"could not download {url} ({err}); this machine may be offline: copy the dataset by hand "
            f"and pass its folder") from err
    folder = ARCHIVE_FOLDERS.get(name, name)
    with zipfile.ZipFile(archive) as zf:
        for member in zf.namelist():
            # keep only the files of the dataset folder, flattened into dest (no path tricks from the archive)
            if member.startswith(folder + "/") and not member.endswith("/"):
                target = dest / Path(member).name
                with zf.open(member) as src, open(target, "wb") as out:
                    out.write(src.read())
    archive.unlink()
    return dest


# ------------------------------------------------------------------------------ next-item (leave-one-out)

SPLITS = {"train": 2, "valid": 1, "test": 0}  # split -> events held out at the end of each user's sequence
_ORDER = "event_order"  # per-user rank of each event: a total order for ties in time


def _with_event_order(events: pd.DataFrame) -> pd.DataFrame:
    required = ["user_id", "item_id", "timestamp"]
    missing = [c for c in required if c not in events.columns]
    if missing:
        raise ValueError(f"event log is missing column(s) {missing}; it has {list(events.columns)}")
    events = events.sort_values(["user_id", "timestamp"], kind="mergesort", ignore_index=True)
    events[_ORDER] = events.groupby("user_id").cumcount().astype("int64")
    return events


def build_leave_one_out_workflow(max_seq_len: int, holdout: int, min_user_events: int,
                                 with_action: bool = True):
    """Groupby user (time order) -> `<col>_seq` lists of the `max_seq_len` most recent events once the last
    `holdout` events are dropped, right-padded with 0. Users with fewer than `min_user_events` events in
    the whole log are dropped (the same users in every split)."""
    import nvtabular as nvt
    from merlin.schema import Tags
    from nvtabular import ops

    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
    if holdout < 0:
        raise ValueError(f"holdout must be >= 0, got {holdout}")
    if min_user_events < holdout + 2:
        # the training rows need two events left: one to read, one to predict
        raise ValueError(f"min_user_events must be >= holdout + 2 = {holdout + 2}, got {min_user_events}")
    list_cols = ["item_id"] + (["action"] if with_action else []) + ["timestamp"]
    grouped = ["user_id", _ORDER] + list_cols >> ops.Groupby(
        groupby_cols=["user_id"], sort_cols=[_ORDER],
        aggs={"item_id": ["list", "count"], **{c: ["list"] for c in list_cols if c != "item_id"}},
        name_sep="-")
    kept = grouped >> ops.Filter(f=lambda df: df["item_id-count"] >= min_user_events)
    end = -holdout if holdout else None
    outputs = None
    for col in list_cols:
        # [-(L + holdout), -holdout): the L most recent events before the held-out ones; pad_value=0 keeps ints
        seq = kept[f"{col}-list"] >> ops.ListSlice(-(max_seq_len + holdout), end, pad=True, pad_value=0)
        seq = seq >> ops.Rename(f=lambda name: name.replace("-list", "_seq"))
        tags = {"item_id": [Tags.ITEM_ID, Tags.ITEM, Tags.ID, Tags.CATEGORICAL, Tags.SEQUENCE],
                "timestamp": [Tags.TIME, Tags.SEQUENCE]}.get(col, [Tags.CATEGORICAL, Tags.SEQUENCE])
        seq = seq >> ops.AddMetadata(tags=tags)
        outputs = seq if outputs is None else outputs + seq
    user = kept["user_id"] >> ops.AddMetadata(tags=[Tags.USER_ID, Tags.USER, Tags.ID])
    return nvt.Workflow(user + outputs)


def run_leave_one_out_etl(events: pd.DataFrame, out_dir, max_seq_len: int = 200, min_user_events: int = 5,
                          with_action: bool = False) -> dict:
    """Event log -> parquet folders train/, valid/, test/ under out_dir (see the module docstring).

    Item ids are Categorified once on the whole log (0 = padding; NVTabular sorts ids by frequency, which
    Transformers4Rec's log-uniform negative sampler assumes). Returns the split paths, `categories` and
    `num_items` (the size of the item id space, padding included).
    """
    import merlin.io
    import nvtabular as nvt
    from nvtabular import ops

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    events = _with_event_order(events)
    if with_action and "action" not in events.columns:
        raise ValueError("with_action=True needs an `action` column in the event log")
    categories = str(out_dir / "categories")
    id_cols = ["item_id"] + (["action"] if with_action else [])
    encode = nvt.Workflow((id_cols >> ops.Categorify(out_path=categories)) + ["user_id", "timestamp", _ORDER])
    encoded = encode.fit_transform(merlin.io.Dataset(events[["user_id", "timestamp", _ORDER] + id_cols]))
    encoded_df = encoded.to_ddf().compute()
    paths = {"categories": categories}
    for split, holdout in SPLITS.items():
        workflow = build_leave_one_out_workflow(max_seq_len, holdout, min_user_events, with_action)
        path = str(out_dir / split)
        workflow.fit_transform(merlin.io.Dataset(encoded_df, schema=encode.output_schema)).to_parquet(
            path, output_files=1)
        paths[split] = path
    item_schema = encode.output_schema["item_id"]
    paths["num_items"] = int(item_schema.int_domain.max) + 1
    return paths


def leave_one_out_frames(events: pd.DataFrame, max_seq_len: int, min_user_events: int = 5) -> dict:
    """Plain-pandas leave-one-out of RAW item ids (no NVTabular): {split: {user: [items]}}.

    An independent statement of the split rule, used by the tests to check the NVTabular output.
    """
    events = _with_event_order(events)
    out = {split: {} for split in SPLITS}
    for user, frame in events.groupby("user_id", sort=True):
        items = frame.sort_values(_ORDER)["item_id"].tolist()
        if len(items) < min_user_events:
            continue
        for split, holdout in SPLITS.items():
            kept = items[:len(items) - holdout]
            out[split][user] = kept[-max_seq_len:]
    return out


# ------------------------------------------------------------------------------------- ranking requests

def daily_requests(events: pd.DataFrame, positive_rating: float = POSITIVE_RATING) -> pd.DataFrame:
    """Impression log of day requests: one row per (user, day, rated item).

    request_id numbers the (user, day) pairs in (user, day) order; request_time is the day's first event
    time (so the history, strictly before it, holds none of that day's events); positive = rating >= 4.
    A user rating one item twice in a day keeps the first rating (RequestGrouping keeps the first row).
    """
    required = ["user_id", "item_id", "timestamp", "rating"]
    missing = [c for c in required if c not in events.columns]
    if missing:
        raise ValueError(f"event log is missing column(s) {missing}; it has {list(events.columns)}")
    frame = events.sort_values(["user_id", "timestamp"], kind="mergesort", ignore_index=True)
    day = frame["timestamp"] // SECONDS_PER_DAY
    new_request = (frame["user_id"] != frame["user_id"].shift()) | (day != day.shift())
    request_id = new_request.cumsum().astype("int64") - 1
    request_time = frame["timestamp"].groupby(request_id).transform("min")
    return pd.DataFrame({
        "user_id": frame["user_id"].astype("int64"),
        "request_id": request_id,
        "request_time": request_time.astype("int64"),
        "item_id": frame["item_id"].astype("int64"),
        "positive": (frame["rating"] >= positive_rating).astype("int64"),
    })


def run_request_etl(events: pd.DataFrame, out_dir, max_history: int = 512, eval_fraction: float = 0.2) -> dict:
    """Day requests -> request-grouped parquet (workflows.request_grouping) split in time per user.

    Each user's last ceil(eval_fraction * requests) day requests (at least one, when the user has two or more)
    go to eval/, the earlier ones to train/; a user with a single request day is train only. Histories hold
    the user's events strictly before each request (any split), capped at `max_history`, most recent last. With an
    `action` column in the log (read_movielens gives the rating bucket), histories carry it as hist_action.
    """
    import merlin.io

    from merlin_longseq.workflows.request_grouping import build_request_workflow

    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    requests = daily_requests(events)
    # the event's action (the rating bucket from read_movielens) rides along as hist_action, which the request
    # blocks read; a log without one gives histories of items and times only
    log = events[["user_id", "item_id", "timestamp"] + (["action"] if "action" in events.columns else [])].copy()
    per_user = requests.drop_duplicates("request_id")[["user_id", "request_id"]]
    rank_from_end = per_user.groupby("user_id").cumcount(ascending=False)
    count = per_user.groupby("user_id")["request_id"].transform("size")
    n_eval = np.where(count >= 2, np.maximum(1, np.ceil(eval_fraction * count)), 0)
    eval_ids = set(per_user.loc[rank_from_end.to_numpy() < n_eval, "request_id"])
    is_eval = requests["request_id"].isin(eval_ids)
    # one vocabulary for both splits: fit the joint Categorify on every request, then transform each split
    workflow = build_request_workflow(log, label_columns=["positive"], max_history=max_history,
                                      out_path=str(out_dir / "categories"))
    workflow.fit(merlin.io.Dataset(requests))
    paths = {"categories": str(out_dir / "categories")}
    for split, rows in (("train", requests[~is_eval]), ("eval", requests[is_eval])):
        path = str(out_dir / split)
        workflow.transform(merlin.io.Dataset(rows.reset_index(drop=True))).to_parquet(path, output_files=1)
        paths[split] = path
    return paths
