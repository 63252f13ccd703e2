"""NVTabular ETL for next-item prediction: event log -> per-user, time-ordered, padded sequences.

Two stages, so the train and evaluation sets share one item encoding:
  1. `encode`: Categorify item (and action) ids, fitted once on the whole event log (vocabulary only).
  2. `group`: Groupby user (sorted by time) -> list columns, cut to the most recent events and right-padded
     with 0 for Transformers4Rec. With `holdout_last=True` the last event of every user is dropped (the
     training rows); with False it is kept (the evaluation rows: predict the last item from the rest).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import nvtabular as nvt
from merlin.schema import Tags
from nvtabular import ops

SEQUENCE_SUFFIX = "_seq"


@dataclass
class SequenceColumns:
    user: str = "user_id"
    item: str = "item_id"
    time: str = "timestamp"
    action: str | None = "action"

    def categorical(self) -> list[str]:
        return [self.item] + ([self.action] if self.action else [])


def check_event_columns(columns, names: SequenceColumns) -> None:
    required = [names.user, names.item, names.time] + ([names.action] if names.action else [])
    missing = [c for c in required if c not in columns]
    if missing:
        raise ValueError(f"event log is missing column(s) {missing}; it has {list(columns)}")


def build_encode_workflow(names: SequenceColumns, categories_dir: str) -> nvt.Workflow:
    """Categorify the id columns; the category tables go to `categories_dir` (never the working directory)."""
    encoded = names.categorical() >> ops.Categorify(out_path=categories_dir)
    return nvt.Workflow(encoded + [names.user, names.time])


def build_group_workflow(names: SequenceColumns, max_seq_len: int, holdout_last: bool,
                         min_seq_len: int = 2) -> nvt.Workflow:
    """Groupby user -> `<col>_seq` list columns of the `max_seq_len` most recent events, right-padded with 0.

    Users with fewer than `min_seq_len` events in the output rows are dropped.
    """
    if max_seq_len < 2:
        raise ValueError("max_seq_len must be >= 2")
    list_cols = names.categorical() + [names.time]
    grouped = [names.user] + list_cols >> ops.Groupby(
        groupby_cols=[names.user], sort_cols=[names.time],
        aggs={names.item: ["list", "count"], **{c: ["list"] for c in list_cols if c != names.item}},
        name_sep="-",
    )
    count_col = f"{names.item}-count"
    kept = grouped >> ops.Filter(f=lambda df: df[count_col] >= min_seq_len + int(holdout_last))
    # most recent events: [-(L+1), -1) drops the held-out last event, [-L, end) keeps it
    start, end = (-(max_seq_len + 1), -1) if holdout_last else (-max_seq_len, None)
    outputs = []
    for col in list_cols:
        seq = kept[f"{col}-list"] >> ops.ListSlice(start, end, pad=True, pad_value=0)  # int pad: see docs
        seq = seq >> ops.Rename(f=lambda name: name.replace("-list", SEQUENCE_SUFFIX))
        if col == names.item:
            seq = seq >> ops.AddMetadata(tags=[Tags.ITEM_ID, Tags.ITEM, Tags.ID, Tags.SEQUENCE])
        elif col == names.time:
            seq = seq >> ops.AddMetadata(tags=[Tags.TIME, Tags.SEQUENCE])
        else:
            seq = seq >> ops.AddMetadata(tags=[Tags.SEQUENCE])
        outputs.append(seq)
    user = kept[names.user] >> ops.AddMetadata(tags=[Tags.USER_ID, Tags.USER, Tags.ID])
    return nvt.Workflow(user + sum(outputs[1:], outputs[0]))


def run_next_item_etl(events, out_dir: str, max_seq_len: int, names: SequenceColumns | None = None,
                      min_seq_len: int = 2) -> dict[str, str]:
    """Event DataFrame -> parquet folders `train/` (last item held out) and `eval/` (full) under out_dir.

    Returns the paths, plus `workflow/` holding the fitted encode workflow for serving.
    """
    import merlin.io

    names = names or SequenceColumns()
    check_event_columns(events.columns, names)
    os.makedirs(out_dir, exist_ok=True)
    encode = build_encode_workflow(names, os.path.join(out_dir, "categories"))
    raw = merlin.io.Dataset(events)
    encoded = encode.fit_transform(raw).to_ddf().compute()
    paths = {}
    for split, holdout in (("train", True), ("eval", False)):
        group = build_group_workflow(names, max_seq_len, holdout_last=holdout, min_seq_len=min_seq_len)
        path = os.path.join(out_dir, split)
        group.fit_transform(merlin.io.Dataset(encoded, schema=encode.output_schema)).to_parquet(path, output_files=1)
        paths[split] = path
    paths["workflow"] = os.path.join(out_dir, "workflow")
    encode.save(paths["workflow"])
    return paths
