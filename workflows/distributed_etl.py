"""The request-grouping ETL on a Dask cluster: a LocalCluster of CPU workers, or dask-cuda's LocalCUDACluster
(one worker per GPU), or any running cluster you hand in as a distributed.Client.

NVTabular runs a workflow partition by partition, each partition a pandas (or cudf) frame on some worker.
RequestGrouping (workflows/request_grouping.py) groups WITHIN a partition, so the one rule is: all impression
rows of a request must sit in one partition. Its event log does not constrain the partitioning: the operator
holds the whole log and is shipped (pickled) to every worker, so a request sees all of its user's events
whatever partition it lands in. We partition the impressions BY USER (hash of user id): that keeps every
request whole (a request has one user) and puts each user's requests together, which is what a future
per-partition event log would need too. The request workflow refuses a request split over partitions
(request_grouping.check_request_partitions) at fit and at transform.

Equal output to a single process: the grouping of a request depends only on its own rows and its user's
events, and Categorify(encode_type="joint") builds one vocabulary from the statistics of all partitions; the
rows come out in a different order (per partition, sorted by request id inside it), so compare by request.
One exception: with a length_sampler the Beta draws are seeded per partition (seed, first request id of the
partition), so sampled windows change with the partitioning; unsampled output does not.

    with local_cluster(n_workers=4) as client:
        workflow, grouped = run_request_etl(impressions, events, label_columns=["click"], max_history=1024,
                                            workflow_dir="etl/", out_dir="etl/train")
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional, Sequence

from merlin_longseq.workflows.request_grouping import build_request_workflow


@contextlib.contextmanager
def local_cluster(n_workers: int = 2, threads_per_worker: int = 1, *, cuda: bool = False,
                  processes: bool = True, **cluster_options) -> Iterator["distributed.Client"]:  # noqa: F821
    """A Dask LocalCluster (CPU) or LocalCUDACluster (cuda=True, needs dask-cuda) with a Client that NVTabular
    uses for everything run inside the block; both are closed on exit."""
    import distributed
    from merlin.core.utils import set_dask_client

    if n_workers < 1 or threads_per_worker < 1:
        raise ValueError(f"need n_workers >= 1 and threads_per_worker >= 1, got {n_workers}, {threads_per_worker}")
    options = dict(dashboard_address=None)  # no web dashboard: a fixed port could clash between runs
    options.update(cluster_options)
    if cuda:
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError as err:
            raise ImportError("local_cluster(cuda=True) needs dask-cuda (and RAPIDS cudf)") from err
        cluster = LocalCUDACluster(n_workers=n_workers, threads_per_worker=threads_per_worker, **options)
    else:
        cluster = distributed.LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker,
                                           processes=processes, **options)
    client = distributed.Client(cluster)
    set_dask_client(client)
    try:
        yield client
    finally:
        set_dask_client("auto")  # back to merlin's default: pick up whatever client is current
        client.close()
        cluster.close()


_ROW = "__etl_row"  # scratch column: the input row order, restored after the shuffle


def partition_by_user(dataset, user_col: str = "user_id", npartitions: Optional[int] = None):
    """A merlin.io.Dataset whose partitions hold whole users (and so whole requests), rows in input order.

    The hash shuffle moves a user's rows from several input partitions into one but does not keep their
    order (seen here: a request's rows came back rotated), and RequestGrouping orders candidates by their
    first row; so the global row number rides along and each partition is sorted by it afterwards.
    """
    from merlin.io import Dataset

    ddf = dataset.to_ddf()
    if _ROW in ddf.columns:
        raise ValueError(f"the impressions already have a column named {_ROW!r}")
    ddf = ddf.assign(**{_ROW: 1})
    ddf[_ROW] = ddf[_ROW].cumsum()  # global row number (a scan over the partitions in order)
    shuffled = Dataset(ddf).shuffle_by_keys([user_col], npartitions=npartitions).to_ddf()
    return Dataset(shuffled.map_partitions(_in_input_order))


def _in_input_order(frame):
    return frame.sort_values(_ROW).drop(columns=[_ROW]).reset_index(drop=True)


def run_request_etl(impressions, events, *, label_columns: Sequence[str], max_history: int,
                    workflow_dir: Optional[str] = None, out_dir: Optional[str] = None,
                    npartitions: Optional[int] = None, partition: bool = True, categorify: bool = True,
                    user_col: str = "user_id", request_col: str = "request_id", **workflow_options):
    """Fit and apply build_request_workflow on the current Dask client (or locally when there is none).

    impressions: a pandas/cudf DataFrame, a merlin.io.Dataset or parquet path(s). npartitions: how many
    partitions to cut it into (default: as read). partition=True partitions by user first (see the module
    docstring); partition=False trusts the input and only checks it. categorify=True writes the item
    vocabulary under workflow_dir/categories (required then). out_dir: write the grouped rows as parquet
    (with schema.pbtxt) there and save the fitted workflow to workflow_dir/workflow.
    Returns (fitted workflow, grouped merlin.io.Dataset).
    """
    from merlin.io import Dataset

    if categorify and workflow_dir is None:
        raise ValueError("run_request_etl(categorify=True) needs workflow_dir for the item vocabulary")
    if isinstance(impressions, Dataset):
        dataset = impressions
        if npartitions is not None and dataset.to_ddf().npartitions != npartitions:
            dataset = Dataset(dataset.to_ddf().repartition(npartitions=npartitions), schema=dataset.schema)
    elif isinstance(impressions, (str, os.PathLike, list, tuple)):
        dataset = Dataset(impressions, engine="parquet")
        if npartitions is not None:
            dataset = Dataset(dataset.to_ddf().repartition(npartitions=npartitions), schema=dataset.schema)
    else:
        dataset = Dataset(impressions, npartitions=npartitions or 1)
    if partition:
        dataset = partition_by_user(dataset, user_col, npartitions)
    workflow = build_request_workflow(
        events, label_columns=label_columns, max_history=max_history, categorify=categorify,
        out_path=os.path.join(workflow_dir, "categories") if workflow_dir else None, user_col=user_col,
        request_col=request_col, **workflow_options)
    workflow.fit(dataset)
    grouped = workflow.transform(dataset)
    if out_dir is not None:
        grouped.to_parquet(out_dir)
        if workflow_dir is not None:
            workflow.save(os.path.join(workflow_dir, "workflow"))
    return workflow, grouped
