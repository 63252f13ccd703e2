"""NVTabular request-level grouping: an impression log plus an event log -> one row per ranking request.

Input (long format, one row per shown candidate):
    impressions: user, request id, request time, candidate item, candidate features..., label columns...
    events (held by the operator): user, item, timestamp, event features...

Output contract (one row per request, sorted by request id inside each partition):
    user_id int64, request_id int64, request_time int64,
    hist_item_id list<int64>, hist_timestamp list<int64>, hist_<feature> list   (the user's events
        STRICTLY BEFORE request_time, most recent LAST, at most max_history of them, the most recent kept)
    cand_item_id list<int64>, cand_<feature> list, <label> list   (all of one length per row)
Schema: an integer hist_<feature> (e.g. hist_action) gets the int domain {min, max} of the whole event log
unless its source schema has one, so a request block sizes its table from the schema alone; user ids are
written raw, without a domain (Categorify user_id after the grouping to give a model a user table).
The output names are fixed by the contract; only the input column names are configurable. Integer ids and
datetime64 times are cast to int64 (datetime64 becomes int nanoseconds, whatever its unit).

Times: request and event times must be of one kind: both integers (any width, cast to int64; say, both in
seconds: the unit itself cannot be checked) or both datetime64. Floats, booleans and a mix of the two kinds
are refused, as are unsigned values above the int64 maximum.

Rules, all deterministic:
- Leakage: an event at or after the request time never enters that request's history.
- Ties: events are ordered by (user, timestamp, row order in the events log), so events with one timestamp
  keep the order in which the log lists them.
- Candidates keep the order of their first row in the impressions partition.
- Duplicate impressions (same request, same item): the FIRST row wins (its features and labels), later
  rows are dropped: a repeated item is one decision, and counting its labels twice would bias training.
- A request with no prior events gets empty history lists and still appears, also when no request of a
  partition (or of the dataset: an empty event log, a day of new users) has any: the lists are empty but
  typed, and the fitted schema has the same dtypes as for any other data (see "Empty histories" below).
- Nulls in any column the operator reads are an error: a null label would leave a label list shorter
  than its candidate list (fill them upstream, e.g. nvt.ops.FillMissing, if that is what you mean).

Partitioning: like nvt.ops.Groupby, the operator groups within a partition, so all rows of one request must
sit in one partition (read the impressions as one partition, or Dataset.shuffle_by_keys([request_col]); the
request id is the key: it must name one request in the whole dataset). A request split over partitions
would silently come out as several rows, so it is refused, naming the request:
- at fit: RequestGrouping is a StatOperator whose statistic is the set of request ids found in more than one
  partition of the fit dataset (per partition: its distinct ids; then a count per id). Workflow.fit raises
  before any later statistic (the joint Categorify) is computed.
- at transform: a workflow from build_request_workflow (a RequestWorkflow) runs the same check on every
  multi-partition merlin.io.Dataset it transforms, also one it was never fitted on (an eval split).
  A plain nvt.Workflow cannot check a dataset other than its fit dataset: call check_request_partitions on
  it first. A single DataFrame, or a direct RequestGrouping.transform, is one partition: nothing to split.
Cost: one more pass over the request id column per check (fit, and each transform of a RequestWorkflow);
over a lazily shuffled Dataset that pass runs the shuffle again, so persist or write it out first.
Note that shuffle_by_keys may reorder the rows of a request, and candidates keep their row order;
workflows.distributed_etl.partition_by_user keeps the order. Not handled: a partition with no rows at all
breaks merlin 23.08's executor in nodes below the operator (it drops an empty node output, then looks for
its columns in the input frame: KeyError), e.g. in build_request_workflow's joint Categorify.
The operator changes the number of rows, so every other branch of the workflow must hang below it.

Empty histories: merlin's dtype capture (run on the output of every node during Workflow.fit) reads a
pandas list column's dtype from its first value, so a partition whose lists are all empty has none to read
and merlin 23.08 fails with a TypeError. Importing this module extends LocalExecutor's capture for exactly
that case: the dtype of the (typed, empty) numpy arrays, else the dtype the node's schema declares. A
column merlin can read is left to merlin; cudf list columns carry their dtype and never reach this path.

How the events get in: the `events` constructor argument (a pandas/cudf DataFrame, a merlin.io.Dataset,
or parquet path(s)) is read ONCE, sorted, and kept in host memory as a pandas DataFrame. It is pickled with
the operator, so Workflow.save writes it into workflow.pkl and Workflow.load needs no external file; the
price is a workflow file as large as the event log.

Backends: written with merlin.core.dispatch helpers (arange, array, concat, convert_data,
create_multihot_col, series_has_nulls) and Series/DataFrame methods that pandas and cudf share (sort_values,
shift, isin, groupby.transform, repeat, iloc). Tested on pandas only. Two pandas-only spots: list columns
are cut with one np.split on pandas (the dispatch helper's pandas path loops per row in Python; cudf still
goes through create_multihot_col), and the length sampler always draws on the host (numpy).
"""
from __future__ import annotations

import functools
import os
import zlib
from typing import Optional, Sequence

import numpy as np
import pandas as pd

import merlin.dtypes as md
from merlin.core.dispatch import (
    arange,
    array,
    concat,
    convert_data,
    create_multihot_col,
    is_list_dtype,
    list_val_dtype,
    series_has_nulls,
)
from merlin.dag import ColumnSelector, DataFormats
from merlin.dag.ops.stat_operator import StatOperator
from merlin.dtypes.base import ElementType
from merlin.dtypes.shape import DefaultShapes
from merlin.schema import ColumnSchema, Schema, Tags

# contract names of the output columns
USER_ID, REQUEST_ID, REQUEST_TIME = "user_id", "request_id", "request_time"
HIST_ITEM_ID, HIST_TIMESTAMP, CAND_ITEM_ID = "hist_item_id", "hist_timestamp", "cand_item_id"

DEFAULT_LABEL_TAGS = (Tags.TARGET, Tags.BINARY_CLASSIFICATION)

# scratch column names; the leading underscores keep them away from user columns
_ROW, _POS, _IS_EVENT, _REQ, _BEFORE, _USER_START = (
    "__rg_row", "__rg_pos", "__rg_is_event", "__rg_req", "__rg_before", "__rg_user_start")
_KEY_USER, _KEY_TIME = "__rg_user", "__rg_time"

# properties that mark a column as already encoded (Categorify): such ids no longer match the raw log
_ENCODED_MARKERS = ("cat_path", "embedding_sizes")


class RequestGrouping(StatOperator):
    """Groups impression rows into one row per request and attaches each user's prior event history.

    Apply it to the impression columns: user, request id, request time, item, every label column and any
    candidate feature (each selected column that has no other role becomes cand_<name>)::

        grouped = ["user_id", "request_id", "request_time", "item_id", "price", "click"] >> RequestGrouping(
            events_df, label_columns=["click"], max_history=512)
        workflow = nvt.Workflow(grouped)

    Parameters
    ----------
    events : DataFrame (pandas or cudf), merlin.io.Dataset, or parquet path(s)
        The event log [user, item, timestamp, event features...]; read once at construction.
    label_columns : sequence of str
        Impression columns that are labels (output as lists, tagged TARGET). May be empty (serving).
    max_history : int
        Most recent events kept per request.
    event_features : sequence of str, optional
        Event columns to output as hist_<name>; default every event column besides user, item, timestamp.
    user_col, item_col : str
        User and item columns, shared by both logs.
    timestamp_col : str
        Event time column of the event log.
    request_col, request_time_col : str
        Request id and request time columns of the impression log.
    length_sampler : BetaLengthSampler, optional
        When set, each history keeps only a sampled most-recent suffix (length extrapolation for training
        sets; see merlin_longseq.extrapolation). Off by default.
    seed : int
        Seed of the sampler's numpy Generator. Each transform call seeds with (seed, first request id of the
        partition), so output is deterministic for a seed and a partitioning.
    label_tags : sequence of Tags
        Tags of the label columns besides LIST; default TARGET + BINARY_CLASSIFICATION.

    Fitting (Workflow.fit) computes no statistic the transform uses: it only refuses a request whose rows
    sit in several partitions (see the module docstring). A direct transform needs no fit.
    """

    def __init__(
        self,
        events,
        *,
        label_columns: Sequence[str],
        max_history: int,
        event_features: Optional[Sequence[str]] = None,
        user_col: str = "user_id",
        item_col: str = "item_id",
        timestamp_col: str = "timestamp",
        request_col: str = "request_id",
        request_time_col: str = "request_time",
        length_sampler=None,
        seed: int = 0,
        label_tags: Sequence[Tags] = DEFAULT_LABEL_TAGS,
    ):
        super().__init__()
        if isinstance(label_columns, str):
            label_columns = [label_columns]
        if int(max_history) < 1:
            raise ValueError(f"max_history must be >= 1, got {max_history}")
        self.label_columns = list(label_columns)
        self.max_history = int(max_history)
        self.user_col, self.item_col, self.timestamp_col = user_col, item_col, timestamp_col
        self.request_col, self.request_time_col = request_col, request_time_col
        self.length_sampler = length_sampler
        self.seed = int(seed)
        self.label_tags = list(label_tags)

        frame, self.events_schema = _read_events(events)
        self._datetime_times = _is_datetime(frame[timestamp_col]) if timestamp_col in frame.columns else False
        if timestamp_col in frame.columns and not (_is_integer(frame[timestamp_col]) or self._datetime_times):
            raise TypeError(f"the events' '{timestamp_col}' is {frame[timestamp_col].dtype}: event times must be "
                            "integers in one unit or datetime64, never floats")
        base = [user_col, item_col, timestamp_col]
        _require_columns(frame.columns, base + list(event_features or []), "events")
        if event_features is None:
            event_features = [c for c in frame.columns if c not in base]
        self.event_features = list(event_features)
        self.events = _sorted_events(frame[base + self.event_features], user_col, timestamp_col, item_col)
        self._device_events = None  # the events in the frame type of the last transform (not pickled)
        self._check_output_names(self._candidate_features([]))

    # ---- roles and names ----------------------------------------------------------------------------------
    @property
    def required_columns(self) -> list:
        return [self.user_col, self.request_col, self.request_time_col, self.item_col, *self.label_columns]

    def _candidate_features(self, selected_names) -> list:
        roles = set(self.required_columns)
        return [name for name in selected_names if name not in roles]

    def _check_output_names(self, candidate_features):
        names = self._output_names(candidate_features)
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"RequestGrouping would write the output column(s) {repeated} twice; "
                             "rename the label, candidate or event feature that collides")

    def _output_names(self, candidate_features) -> list:
        return [USER_ID, REQUEST_ID, REQUEST_TIME, HIST_ITEM_ID, HIST_TIMESTAMP,
                *[f"hist_{f}" for f in self.event_features], CAND_ITEM_ID,
                *[f"cand_{f}" for f in candidate_features], *self.label_columns]

    def column_mapping(self, col_selector):
        u, r, t = self.user_col, self.request_col, self.request_time_col
        candidate_features = self._candidate_features(col_selector.names)
        mapping = {USER_ID: [u], REQUEST_ID: [r], REQUEST_TIME: [t]}
        # a history depends on who asked and when
        for name in [HIST_ITEM_ID, HIST_TIMESTAMP, *[f"hist_{f}" for f in self.event_features]]:
            mapping[name] = [u, t]
        mapping[CAND_ITEM_ID] = [r, self.item_col]
        for feature in candidate_features:
            mapping[f"cand_{feature}"] = [r, feature]
        for label in self.label_columns:
            mapping[label] = [r, label]
        return mapping

    # ---- schema -------------------------------------------------------------------------------------------
    def compute_output_schema(self, input_schema: Schema, col_selector: ColumnSelector,
                              prev_output_schema: Optional[Schema] = None) -> Schema:
        col_selector = (col_selector or ColumnSelector(input_schema.column_names)).resolve(input_schema)
        names = col_selector.names
        _require_columns(names, self.required_columns, "the impressions selected for RequestGrouping")
        self._check_not_encoded(input_schema)
        candidate_features = self._candidate_features(names)
        self._check_output_names(candidate_features)

        hist_dims = (None, (0, self.max_history))
        cand_dims = (None, (1, None))  # a request exists only through its candidate rows
        item_tags = [Tags.ITEM_ID, Tags.ITEM, Tags.CATEGORICAL, Tags.LIST]
        columns = [
            ColumnSchema(USER_ID, dtype=self._output_dtype_of(input_schema, self.user_col),
                         tags=[Tags.USER_ID, Tags.USER, Tags.CATEGORICAL]),
            ColumnSchema(REQUEST_ID, dtype=self._output_dtype_of(input_schema, self.request_col), tags=[Tags.ID]),
            ColumnSchema(REQUEST_TIME, dtype=self._output_dtype_of(input_schema, self.request_time_col),
                         tags=[Tags.TIME]),
            ColumnSchema(HIST_ITEM_ID, dtype=_normalized_dtype(md.dtype(self.events[self.item_col].dtype)),
                         tags=item_tags + [Tags.SEQUENCE], dims=hist_dims),
            ColumnSchema(HIST_TIMESTAMP, dtype=md.int64, tags=[Tags.TIME, Tags.LIST, Tags.SEQUENCE],
                         dims=hist_dims),
        ]
        for feature in self.event_features:
            source = self.events_schema[feature] if feature in self.events_schema.column_names else None
            dtype = md.dtype(self.events[feature].dtype)
            tags = _feature_tags(source, dtype) + [Tags.LIST, Tags.SEQUENCE]
            properties = _plain_properties(source)
            if "domain" not in properties and dtype.element_type in (ElementType.Int, ElementType.UInt):
                # the operator holds the whole event log, so the value range is known: the request blocks size
                # their action table from it (STCABlock.from_schema needs no num_actions=)
                properties["domain"] = _int_domain(self.events[feature])
            columns.append(ColumnSchema(f"hist_{feature}", dtype=dtype, tags=tags,
                                        properties={k: v for k, v in properties.items() if v is not None},
                                        dims=hist_dims))
        columns.append(ColumnSchema(CAND_ITEM_ID, dtype=self._output_dtype_of(input_schema, self.item_col),
                                    tags=item_tags, dims=cand_dims))
        for feature in candidate_features:
            source = input_schema[feature]
            columns.append(ColumnSchema(f"cand_{feature}", dtype=source.dtype,
                                        tags=_feature_tags(source, source.dtype) + [Tags.LIST],
                                        properties=_plain_properties(source), dims=cand_dims))
        for label in self.label_columns:
            source = input_schema[label]
            columns.append(ColumnSchema(label, dtype=source.dtype, tags=self.label_tags + [Tags.LIST],
                                        properties=_plain_properties(source), dims=cand_dims))
        return Schema(columns)

    def _output_dtype_of(self, input_schema, name):
        return _normalized_dtype(input_schema[name].dtype)

    def _check_not_encoded(self, input_schema):
        # user and item ids are matched against the raw event log, so they must arrive unencoded
        for name in (self.user_col, self.item_col):
            if any(key in input_schema[name].properties for key in _ENCODED_MARKERS):
                raise ValueError(
                    f"column '{name}' reaches RequestGrouping already encoded (Categorify), but the event "
                    "log holds raw ids; encode after grouping instead (see build_request_workflow)")

    @property
    def supported_formats(self) -> DataFormats:
        return DataFormats.PANDAS_DATAFRAME | DataFormats.CUDF_DATAFRAME

    # ---- transform ----------------------------------------------------------------------------------------
    def transform(self, col_selector: ColumnSelector, df):
        _require_columns(df.columns, self.required_columns, "the impressions")
        candidate_features = self._candidate_features(col_selector.names)
        _require_columns(df.columns, candidate_features, "the impressions")
        used = [*self.required_columns, *candidate_features]
        _check_no_nulls(df, used, "impressions")
        request_time = df[self.request_time_col]
        if not (_is_integer(request_time) or _is_datetime(request_time)):
            raise TypeError(f"'{self.request_time_col}' is {request_time.dtype}: request and event times must be "
                            "integers in one unit (e.g. int64 seconds) or datetime64, never floats (a rounded "
                            "float time can move an event across the request time)")
        if _is_datetime(df[self.request_time_col]) != self._datetime_times:
            event_kind = "datetime64" if self._datetime_times else "integer"
            raise TypeError(f"'{self.request_time_col}' is {df[self.request_time_col].dtype} but the events' "
                            f"'{self.timestamp_col}' is {event_kind}; both must be integers in one unit "
                            "or both datetime64")

        impressions = self._candidate_rows(df[used])
        requests = _first_rows_of_requests(impressions, self.request_col, self.user_col, self.request_time_col)
        events = self._events_for(df, requests[self.user_col])
        hist_start, hist_length = self._history_ranges(requests, events)

        out = {
            USER_ID: requests[self.user_col],
            REQUEST_ID: requests[self.request_col],
            REQUEST_TIME: requests[self.request_time_col],
        }
        hist_rows = _range_positions(hist_start, hist_length, like=df)
        hist_offsets = _offsets(hist_length)
        hist_sources = [(HIST_ITEM_ID, self.item_col), (HIST_TIMESTAMP, self.timestamp_col),
                        *[(f"hist_{f}", f) for f in self.event_features]]
        for name, source in hist_sources:
            values = events[source].iloc[hist_rows].reset_index(drop=True)
            out[name] = _list_column(hist_offsets, values)
        cand_offsets = _offsets(requests[_POS].shift(-1, fill_value=len(impressions)) - requests[_POS])
        cand_sources = [(CAND_ITEM_ID, self.item_col), *[(f"cand_{f}", f) for f in candidate_features],
                        *[(label, label) for label in self.label_columns]]
        for name, source in cand_sources:
            out[name] = _list_column(cand_offsets, impressions[source])
        return type(df)({name: column.reset_index(drop=True) for name, column in out.items()})

    transform.__doc__ = StatOperator.transform.__doc__

    # ---- fit: requests must not span partitions ----------------------------------------------------------
    def fit(self, col_selector: ColumnSelector, ddf):
        return split_requests(ddf, self.request_col)

    def fit_finalize(self, split):
        _refuse_split_requests(split, self.request_col)

    def clear(self):
        pass  # the fit check keeps no statistics

    def _candidate_rows(self, impressions):
        """Impression rows without duplicates, sorted by (request, first appearance)."""
        impressions = impressions.copy()
        for name in (self.user_col, self.request_col, self.request_time_col, self.item_col):
            impressions[name] = _as_int64_if_integer(impressions[name])
        impressions[_ROW] = arange(len(impressions), like_df=impressions, dtype="int64")
        # duplicates sit next to each other after this sort, the earliest row first
        impressions = impressions.sort_values([self.request_col, self.item_col, _ROW], ignore_index=True)
        repeated = (_same_as_previous(impressions[self.request_col])
                    & _same_as_previous(impressions[self.item_col]))
        impressions = impressions[~repeated]
        impressions = impressions.sort_values([self.request_col, _ROW], ignore_index=True)
        impressions[_POS] = arange(len(impressions), like_df=impressions, dtype="int64")
        return impressions

    def _events_for(self, like_df, users):
        """The sorted events of `users`, in the frame type of `like_df`, positions 0..n-1."""
        if self._device_events is None or type(self._device_events) is not type(like_df):
            self._device_events = convert_data(self.events, cpu=isinstance(like_df, pd.DataFrame))
        events = self._device_events
        for name in (self.user_col, self.item_col):
            if events[name].dtype != like_df[name].dtype and not _both_integer(events[name], like_df[name]):
                raise TypeError(f"column '{name}' is {like_df[name].dtype} in the impressions but "
                                f"{events[name].dtype} in the events; one id space needs one type")
        # a boolean filter keeps the (user, timestamp, row) order
        return events[events[self.user_col].isin(users)].reset_index(drop=True)

    def _history_ranges(self, requests, events):
        """Per request: position of its first history event in `events`, and the history length."""
        end, available = _events_strictly_before(
            requests[self.user_col], requests[self.request_time_col],
            events[self.user_col], events[self.timestamp_col])
        length = available.clip(upper=self.max_history)
        if self.length_sampler is not None:
            length = self._sampled_lengths(length, requests[self.request_col])
        return end - length, length

    def _sampled_lengths(self, lengths, request_ids):
        if len(lengths) == 0:
            return lengths
        host_lengths = _to_numpy(lengths)
        first_request = _to_numpy(request_ids.iloc[:1])[0]
        rng = np.random.default_rng([self.seed, _seed_word(first_request)])
        sampled = np.asarray(self.length_sampler.sample_numpy(host_lengths, rng), dtype=np.int64)
        if sampled.shape != host_lengths.shape or (sampled < 0).any() or (sampled > host_lengths).any():
            raise ValueError("length_sampler must return one length per history, 0 <= new <= old")
        return type(lengths)(array(sampled, like_df=lengths), dtype="int64")

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_device_events"] = None  # a cache of self.events, possibly on the GPU
        return state


# ---- frame helpers (pandas and cudf) ------------------------------------------------------------------------
def _read_events(events):
    """Host pandas DataFrame of the event log, and its Merlin schema (empty unless a Dataset gave one)."""
    from merlin.io import Dataset

    schema = Schema()
    if isinstance(events, (str, os.PathLike)) or (
            isinstance(events, (list, tuple)) and events and isinstance(events[0], (str, os.PathLike))):
        events = Dataset(events, engine="parquet")
    if isinstance(events, Dataset):
        schema = events.schema
        events = events.to_ddf().compute()
    if not hasattr(events, "columns"):
        raise TypeError(f"events must be a DataFrame, a merlin.io.Dataset or parquet path(s), "
                        f"got {type(events).__name__}")
    return convert_data(events, cpu=True).reset_index(drop=True), schema


def _sorted_events(events, user_col, timestamp_col, item_col):
    _check_no_nulls(events, list(events.columns), "events")
    events = events.copy()
    for name in (user_col, timestamp_col, item_col):
        events[name] = _as_int64_if_integer(events[name])
    if not _is_integer(events[timestamp_col]):
        raise TypeError(f"event column '{timestamp_col}' must hold integer or datetime64 times, "
                        f"got {events[timestamp_col].dtype}")
    # the row number makes ties deterministic on any backend: (user, timestamp, log order)
    events[_ROW] = arange(len(events), like_df=events, dtype="int64")
    events = events.sort_values([user_col, timestamp_col, _ROW], ignore_index=True)
    return events.drop(columns=[_ROW])


def _first_rows_of_requests(impressions, request_col, user_col, time_col):
    """One row per request (its first candidate row); errors if a request has two users or two times."""
    same_request = _same_as_previous(impressions[request_col])
    consistent = _same_as_previous(impressions[user_col]) & _same_as_previous(impressions[time_col])
    conflicting = same_request & ~consistent
    if bool(conflicting.any()):
        bad = impressions[request_col][conflicting].iloc[:1]
        raise ValueError(f"request {_to_numpy(bad)[0]} has rows with different {user_col} or {time_col}; "
                         "every row of a request must share both")
    return impressions[~same_request].reset_index(drop=True)


def _events_strictly_before(request_users, request_times, event_users, event_times):
    """(end, available) per request: `end` is the position in the (user, time)-sorted events just past the
    user's last event with time < request time; `available` is how many of the user's events that is."""
    frame_type = type(request_users.to_frame())  # pandas or cudf DataFrame
    requests = frame_type({_KEY_USER: request_users.reset_index(drop=True),
                           _KEY_TIME: request_times.reset_index(drop=True)})
    requests[_IS_EVENT] = 0
    requests[_REQ] = arange(len(requests), like_df=requests, dtype="int64")
    events = frame_type({_KEY_USER: event_users.reset_index(drop=True),
                         _KEY_TIME: event_times.reset_index(drop=True)})
    events[_IS_EVENT] = 1
    events[_REQ] = -1
    # a request sorts before the events of its own timestamp: those are not strictly before it
    merged = concat([requests, events], ignore_index=True)
    merged = merged.sort_values([_KEY_USER, _KEY_TIME, _IS_EVENT], ignore_index=True)
    merged[_BEFORE] = merged[_IS_EVENT].cumsum() - merged[_IS_EVENT]
    # `before` never decreases, so its minimum over the user's rows is where the user's events start
    merged[_USER_START] = merged.groupby(_KEY_USER)[_BEFORE].transform("min")
    at_requests = merged[merged[_IS_EVENT] == 0].sort_values(_REQ, ignore_index=True)
    end = at_requests[_BEFORE].astype("int64")
    return end, end - at_requests[_USER_START].astype("int64")


def _range_positions(starts, lengths, like):
    """Flat positions start[i], ..., start[i] + length[i] - 1 for every i, in order (numpy or cupy)."""
    total = int(lengths.sum())
    first_slot = lengths.cumsum() - lengths
    shift = (starts - first_slot).repeat(_values(lengths))
    return _values(shift) + arange(total, like_df=like, dtype="int64")


def _offsets(lengths):
    """List offsets [0, l0, l0 + l1, ...] as a Series of n + 1 values."""
    lengths = lengths.reset_index(drop=True).astype("int64")
    zero = type(lengths)([0], dtype="int64")
    return concat([zero, lengths.cumsum()], ignore_index=True)


def _list_column(offsets, values):
    """List Series whose row i holds values[offsets[i]:offsets[i + 1]]."""
    if isinstance(values, pd.Series):
        # the dispatch helper's pandas path slices a Series once per row (about 80 us each); one np.split
        # gives the same numpy rows at a fraction of the cost
        bounds = offsets.to_numpy()
        if len(bounds) == 1:
            return pd.Series([], dtype=object)
        return pd.Series(np.split(values.to_numpy(), bounds[1:-1]), dtype=object)
    return create_multihot_col(offsets, values)


def _same_as_previous(series):
    """Boolean Series: row i equals row i - 1 (False for row 0). No float detour, so large ids compare exactly."""
    series = series.reset_index(drop=True)
    if len(series) == 0:
        return series == series
    same = series == series.shift(1, fill_value=series.iloc[0])
    same.iloc[0] = False
    return same


def _check_no_nulls(df, columns, where):
    with_nulls = [name for name in columns if series_has_nulls(df[name])]
    if with_nulls:
        raise ValueError(f"null values in {where} column(s) {with_nulls}: every candidate needs its item, "
                         "features and labels (a null label would make the label list shorter than the "
                         "candidate list) and every event its fields; fill or drop them upstream")


def _require_columns(available, required, where):
    available = set(available)
    missing = [name for name in required if name not in available]
    if missing:
        raise ValueError(f"missing column(s) {missing} in {where}")


def _is_integer(series) -> bool:
    return md.dtype(series.dtype).element_type in (ElementType.Int, ElementType.UInt)


def _is_datetime(series) -> bool:
    return md.dtype(series.dtype).element_type == ElementType.DateTime


def _seed_word(value) -> int:
    """A non-negative integer for numpy's SeedSequence from a request id of any type."""
    if isinstance(value, (int, np.integer)):
        return int(value) & 0xFFFFFFFFFFFFFFFF
    return zlib.crc32(str(value).encode())


def _both_integer(a, b) -> bool:
    return _is_integer(a) and _is_integer(b)


def _as_int64_if_integer(series):
    """Integer and datetime64 columns become int64 (the contract); others (e.g. string ids) stay as they are.

    Unsigned values above the int64 maximum would wrap to negative ids: refused.
    """
    element = md.dtype(series.dtype).element_type
    if element is ElementType.UInt and len(series) and int(series.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"column '{series.name}' holds ids above the int64 maximum ({int(series.max())}); the "
                         "request contract's ids are int64: re-map them first (e.g. Categorify or a hash)")
    if element is ElementType.DateTime:
        # cudf keeps s / ms / us units; nanoseconds first, so both logs' times land in one integer unit
        return series.astype("datetime64[ns]").astype("int64")
    if element in (ElementType.Int, ElementType.UInt):
        return series.astype("int64")
    return series


def _normalized_dtype(dtype):
    """Schema counterpart of _as_int64_if_integer."""
    if dtype is not None and dtype.element_type in (ElementType.Int, ElementType.UInt, ElementType.DateTime):
        return md.int64
    return dtype


def _feature_tags(source: Optional[ColumnSchema], dtype) -> list:
    """Tags of a feature turned into a list: its own, or CATEGORICAL / CONTINUOUS guessed from the dtype."""
    tags = [t for t in (source.tags if source is not None else []) if t not in (Tags.LIST, Tags.SEQUENCE)]
    if Tags.CATEGORICAL in tags or Tags.CONTINUOUS in tags or dtype is None:
        return tags
    if dtype.element_type in (ElementType.Int, ElementType.UInt):
        return tags + [Tags.CATEGORICAL]
    if dtype.element_type == ElementType.Float:
        return tags + [Tags.CONTINUOUS]
    return tags


def _plain_properties(source: Optional[ColumnSchema]) -> dict:
    # value_count describes the scalar source; the list shape is set from dims instead
    if source is None:
        return {}
    return {k: v for k, v in source.properties.items() if k != "value_count"}


def _int_domain(series) -> Optional[dict]:
    """{"min", "max"} of an integer column (None for an empty one: no range to state)."""
    if len(series) == 0:
        return None
    return {"min": int(series.min()), "max": int(series.max())}


def _values(series):
    return series.values  # numpy for pandas, cupy for cudf


def _to_numpy(series):
    return series.to_numpy() if hasattr(series, "to_numpy") else np.asarray(series)


# ---- requests split over partitions ---------------------------------------------------------------------------
def split_requests(ddf, request_col: str = "request_id"):
    """Lazy (dask) Series: for each request id found in more than one partition of `ddf`, in how many.

    One pass over the id column: each partition's distinct ids, then a count per id spread over as many
    output partitions as the input has, so only the (usually empty) result comes back to the client.
    """
    ids = ddf[request_col]
    distinct = ids.map_partitions(_distinct, meta=ids._meta)
    partitions_per_id = distinct.value_counts(split_out=max(1, ddf.npartitions))
    return partitions_per_id[partitions_per_id > 1]


def check_request_partitions(data, request_col: str = "request_id") -> None:
    """Raise ValueError, naming a request, when some request's rows sit in several partitions of `data`
    (a merlin.io.Dataset or a dask DataFrame); RequestGrouping would turn such a request into several rows.
    A single partition (or a DataFrame) passes without any work."""
    ddf = data.to_ddf() if hasattr(data, "to_ddf") else data
    if not hasattr(ddf, "npartitions") or ddf.npartitions <= 1:
        return
    _require_columns(ddf.columns, [request_col], "the impressions")
    import dask

    _refuse_split_requests(dask.compute(split_requests(ddf, request_col))[0], request_col)


def _distinct(series):
    return series.drop_duplicates()


def _refuse_split_requests(split, request_col):
    """`split`: the computed split_requests Series (request id -> number of partitions)."""
    if len(split) == 0:
        return
    split = split.sort_index()  # the same example on every run
    first, partitions = _to_numpy(split.index[:1])[0], int(_to_numpy(split.iloc[:1])[0])
    first = first.item() if hasattr(first, "item") else first
    others = f" (and {len(split) - 1} more request(s))" if len(split) > 1 else ""
    raise ValueError(
        f"{request_col} {first!r} has rows in {partitions} partitions{others}: NVTabular runs RequestGrouping on "
        "each partition on its own, so the request would come out as several rows, each with part of its "
        "candidates. Put all rows of a request into one partition first, e.g. "
        f"dataset.shuffle_by_keys([{request_col!r}]) (or sort by {request_col!r} and cut between requests)")


# ---- merlin's dtype capture and empty lists --------------------------------------------------------------------
def _capture_reads_empty_lists():
    """Let LocalExecutor's dtype capture (Workflow.fit) handle a pandas list column whose rows are all empty.

    merlin 23.08 takes a pandas list column's dtype from its first value (list_val_dtype); with every list
    empty there is none, it gets None and fails with a TypeError: a partition of new users broke fit, in
    this node and in every node downstream that passes the lists on. No representation of empty lists in
    pandas gives it a value, so the capture itself is extended, for that case only: the dtype of the rows'
    numpy arrays (RequestGrouping's are typed), else the dtype the node's schema declares. Everything merlin
    can read goes to merlin unchanged. Installed on import, so Dask workers that unpickle the operator get it.
    """
    try:
        from merlin.dag.executors import LocalExecutor
    except ImportError:
        return
    capture = getattr(LocalExecutor, "_build_schema_from_data", None)
    if capture is None or getattr(capture, "_reads_empty_lists", False):
        return  # another merlin version, or already installed

    @functools.wraps(capture)
    def build_schema_from_data(self, output_data, col_name, output_col_schema):
        column = output_data[col_name]
        if not (isinstance(column, pd.Series) and is_list_dtype(column) and list_val_dtype(column) is None):
            return capture(self, output_data, col_name, output_col_schema)
        first = getattr(column.iloc[0], "dtype", None)
        dtype = first if first is not None and first != np.dtype(object) else output_col_schema.dtype
        shape = output_col_schema.shape
        if not shape.is_list or shape.is_unknown:
            shape = DefaultShapes.LIST  # what merlin sets for a list column
        return output_col_schema.with_dtype(dtype).with_shape(shape)

    build_schema_from_data._reads_empty_lists = True
    LocalExecutor._build_schema_from_data = build_schema_from_data


_capture_reads_empty_lists()


# ---- convenience workflow -------------------------------------------------------------------------------------
try:
    from nvtabular import Workflow as _Workflow
except ImportError:  # merlin-core alone runs the operator; the workflows below need NVTabular
    _Workflow = object


class RequestWorkflow(_Workflow):
    """An nvt.Workflow that refuses to transform a merlin.io.Dataset in which a request spans partitions.

    Workflow.fit is checked by RequestGrouping itself; this adds the check for datasets the workflow was not
    fitted on (check_request_partitions: one pass over the request id column before the transform).
    Saved and loaded like any nvt.Workflow (the class is pickled by reference).
    """

    def __init__(self, output_node, client=None, *, request_col: str = "request_id"):
        super().__init__(output_node, client)
        self.request_col = request_col

    def transform(self, data):
        from merlin.io import Dataset

        if isinstance(data, Dataset):
            check_request_partitions(data, self.request_col)
        return super().transform(data)


def build_request_workflow(
    events,
    *,
    label_columns: Sequence[str],
    max_history: int,
    candidate_features: Sequence[str] = (),
    event_features: Optional[Sequence[str]] = None,
    categorify: bool = True,
    out_path: Optional[str] = None,
    user_col: str = "user_id",
    item_col: str = "item_id",
    timestamp_col: str = "timestamp",
    request_col: str = "request_id",
    request_time_col: str = "request_time",
    length_sampler=None,
    seed: int = 0,
    categorify_options: Optional[dict] = None,
    item_token: Optional[str] = None,
):
    """An nvt.Workflow from an impression log to the request contract, item ids optionally encoded.

    The workflow selects [user, request, request time, item, *candidate_features, *label_columns] from the
    impressions, groups them with RequestGrouping, then (categorify=True) encodes hist_item_id and
    cand_item_id JOINTLY with nvt.ops.Categorify(encode_type="joint"): one vocabulary over both list
    columns, so a raw item gets the same id in the history and among the candidates. Encoding after the
    grouping is what makes this possible: the event log never passes through the workflow's inputs.
    Categorify writes its vocabulary under `out_path`, required with categorify=True (without one,
    Categorify would write a categories/ folder into the working directory).

    Use::

        workflow = build_request_workflow(events, label_columns=["click"], max_history=512, out_path=dir)
        workflow.fit(impressions_dataset)          # a merlin.io.Dataset; every request within one partition
        workflow.transform(impressions_dataset).to_parquet(output_dir)

    The result is a RequestWorkflow: fit and transform both refuse a dataset in which a request's rows span
    partitions (repartition with impressions_dataset.shuffle_by_keys([request_col]) first).

    The grouping runs once per branch of the graph (the Categorify branch and the pass-through branch), so a
    categorified workflow groups each partition twice.

    item_token: a column of both logs (e.g. "category_id") whose values hist_item_id and cand_item_id carry
    instead of the item ids. The requests are still grouped by item (one candidate per distinct item, the
    first row wins), but each event and candidate is written as its token (its category), so a block embeds
    a coarser id space: one that generalises where most items are seen once. The raw item lists are not
    written; the token goes through the same joint Categorify (categorify=True).
    """
    import nvtabular as nvt
    from merlin.dag import Node
    from merlin.dag.ops.grouping import GroupingOp

    if categorify and out_path is None:
        raise ValueError("build_request_workflow(categorify=True) needs out_path: the folder for the "
                         "item vocabulary (Categorify would otherwise write into the working directory)")
    label_columns = [label_columns] if isinstance(label_columns, str) else list(label_columns)
    candidate_features = list(candidate_features)
    if item_token is not None:
        if item_token in (user_col, item_col, timestamp_col, request_col, request_time_col, *label_columns):
            raise ValueError(f"item_token={item_token!r} must be a column of its own (e.g. the item's category), "
                             "not the user, item, time, request or a label column")
        candidate_features = [*[f for f in candidate_features if f != item_token], item_token]
        if event_features is not None:
            event_features = [*[f for f in event_features if f != item_token], item_token]
    selected = [user_col, request_col, request_time_col, item_col, *candidate_features, *label_columns]
    grouping = RequestGrouping(
        events, label_columns=label_columns, max_history=max_history, event_features=event_features,
        user_col=user_col, item_col=item_col, timestamp_col=timestamp_col, request_col=request_col,
        request_time_col=request_time_col, length_sampler=length_sampler, seed=seed)
    if item_token is not None and item_token not in grouping.event_features:
        raise ValueError(f"item_token={item_token!r} is not a column of the event log "
                         f"(its columns: {list(grouping.events.columns)})")
    grouped = selected >> grouping
    item_lists = [HIST_ITEM_ID, CAND_ITEM_ID]
    contract_order = grouping.output_column_names(ColumnSelector(selected)).names
    if item_token is None:
        token_lists = item_lists
    else:
        # hist_<token> / cand_<token> are written under the item lists' names, in their place
        token_lists = [f"hist_{item_token}", f"cand_{item_token}"]
        contract_order = [name for name in contract_order if name not in token_lists]
    rest = [name for name in contract_order if name not in item_lists]
    if not categorify:
        if item_token is None:
            return RequestWorkflow(grouped, request_col=request_col)
        return RequestWorkflow((_as_item_lists(grouped[token_lists], token_lists) + grouped[rest])[contract_order],
                               request_col=request_col)
    # Categorify takes column groups from a grouping parent: under one, the two columns share one vocabulary.
    # The grouping op gets an explicit selector, else its input schema also pulls in the raw impression
    # columns and the executor would glue those (one row per impression) beside the grouped rows.
    as_one_group = Node.construct_from(GroupingOp(ColumnSelector(token_lists)))
    as_one_group.add_parent(grouped[token_lists])
    joint = as_one_group >> nvt.ops.Categorify(encode_type="joint", out_path=str(out_path),
                                               **(categorify_options or {}))
    if item_token is not None:
        joint = _as_item_lists(joint, token_lists)
    return RequestWorkflow((joint + grouped[rest])[contract_order], request_col=request_col)


def _as_item_lists(node, token_lists):
    """The token lists (hist_<token>, cand_<token>) renamed to hist_item_id / cand_item_id, with the item tags."""
    import nvtabular as nvt

    names = dict(zip(token_lists, [HIST_ITEM_ID, CAND_ITEM_ID]))
    renamed = node >> nvt.ops.Rename(f=lambda name: names.get(name, name))
    return renamed >> nvt.ops.AddTags([Tags.ITEM_ID, Tags.ITEM, Tags.CATEGORICAL])
