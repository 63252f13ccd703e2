"""MovieLens readers, leave-one-out sequences, day requests, and a tiny end-to-end run on the real ML-100K.

The readers and splits are checked on small hand-written files whose right answer is written out here; the
NVTabular split is also checked against a plain-pandas statement of the rule. The real data is read from
../shared/data/ml-100k (or $MERLIN_LONGSEQ_ML100K) and never copied; those tests skip when it is absent.
"""
import math
import urllib.error
import warnings

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.merlin

ml = pytest.importorskip("merlin_longseq.workflows.movielens")

# user, item, rating, timestamp -- user 2's two events at t=100 must keep the file's order (item 30, then 10)
RAW = [
    (2, 30, 4, 100), (1, 10, 5, 50), (2, 10, 2, 100), (1, 20, 3, 40), (2, 40, 1, 90),
    (1, 30, 1, 60), (2, 50, 5, 200),
]
# expected per-user order after sorting by time (ties: file order)
ORDER = {1: [20, 10, 30], 2: [40, 30, 10, 50]}


def _write_udata(path):
    path.write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in RAW))
    return path


def _write_dat(path):
    path.write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in RAW))
    return path


def _write_csv(path, ratings=None):
    rows = [(u, i, r if ratings is None else ratings[k], t) for k, (u, i, r, t) in enumerate(RAW)]
    path.write_text("userId,movieId,rating,timestamp\n" + "".join(f"{u},{i},{r},{t}\n" for u, i, r, t in rows))
    return path


def _check_frame(frame):
    assert list(frame.columns) == ml.EVENT_COLUMNS
    assert all(str(frame[c].dtype) == "int64" for c in ("user_id", "item_id", "timestamp", "action"))
    for user, items in ORDER.items():
        assert frame.loc[frame.user_id == user, "item_id"].tolist() == items
    assert frame["user_id"].tolist() == sorted(frame["user_id"].tolist())


@pytest.mark.parametrize("writer, reader, name", [
    (_write_udata, ml.read_ml100k, "u.data"),
    (_write_dat, ml.read_ratings_dat, "ratings.dat"),
    (_write_csv, ml.read_ratings_csv, "ratings.csv"),
])
def test_readers_give_time_ordered_event_log(tmp_path, writer, reader, name):
    path = writer(tmp_path / name)
    frame = reader(path)
    _check_frame(frame)
    # rating buckets equal the integer ratings; the generic reader and a folder path give the same frame
    raw = {(u, i): r for u, i, r, _ in RAW}
    assert [raw[(u, i)] for u, i in zip(frame.user_id, frame.item_id)] == frame["action"].tolist()
    pd.testing.assert_frame_equal(ml.read_movielens(tmp_path), frame)
    pd.testing.assert_frame_equal(ml.read_movielens(path), frame)


def test_positive_action_and_half_star_buckets(tmp_path):
    halves = [3.5, 0.5, 4.0, 2.5, 5.0, 1.0, 3.0]
    frame = ml.read_ratings_csv(_write_csv(tmp_path / "ratings.csv", halves))
    by_key = frame.set_index(["user_id", "item_id"])
    for (u, i, _, _), rating in zip(RAW, halves):
        assert by_key.loc[(u, i), "rating"] == rating
        assert by_key.loc[(u, i), "action"] == math.ceil(rating)  # half stars round up
    positive = ml.read_ratings_csv(tmp_path / "ratings.csv", action="positive").set_index(["user_id", "item_id"])
    for (u, i, _, _), rating in zip(RAW, halves):
        assert positive.loc[(u, i), "action"] == int(rating >= 4)


def test_u_info_count_mismatch_warns(tmp_path):
    _write_udata(tmp_path / "u.data")
    (tmp_path / "u.info").write_text("2 users\n5 items\n8 ratings\n")
    with pytest.warns(UserWarning, match="truncated"):
        ml.read_ml100k(tmp_path)
    (tmp_path / "u.info").write_text(f"2 users\n5 items\n{len(RAW)} ratings\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # counts agree: no warning
        ml.read_ml100k(tmp_path)


def test_reader_errors_are_clear(tmp_path, monkeypatch):
    (tmp_path / "u.data").write_text("1\t2\t3\n")
    with pytest.raises(ValueError, match="4 fields"):
        ml.read_ml100k(tmp_path)
    (tmp_path / "u.data").write_text("1\tx\t3\t4\n")
    with pytest.raises(ValueError, match="non-numeric"):
        ml.read_ml100k(tmp_path)
    (tmp_path / "u.data").write_text("1\t2\t9\t4\n")
    with pytest.raises(ValueError, match="outside"):
        ml.read_ml100k(tmp_path)
    (tmp_path / "ratings.csv").write_text("user,item,rating,time\n1,2,3,4\n")
    with pytest.raises(ValueError, match="header"):
        ml.read_ratings_csv(tmp_path)
    with pytest.raises(ValueError, match="action"):
        ml.read_ml100k(_write_udata(tmp_path / "u.data"), action="stars")
    missing = tmp_path / "nothing-here"
    with pytest.raises(FileNotFoundError, match="download=True"):
        ml.read_movielens(missing)

    # asked to download while offline: a ConnectionError that says so, no network touched
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(ml.urllib.request, "urlopen", offline)
    with pytest.raises(ConnectionError, match="offline"):
        ml.read_movielens(tmp_path / "ml-1m", download=True)
    assert not (tmp_path / "ml-1m" / "ml-1m.zip").exists()
    with pytest.raises(ValueError, match="unknown MovieLens dataset"):
        ml.download_movielens("ml-7", tmp_path)


def _decoded_sequences(path, categories):
    """{user: [raw item ids]} of a split, padding removed, checking the right-padding layout on the way."""
    import merlin.io

    frame = merlin.io.Dataset(path, engine="parquet").to_ddf().compute()
    vocab = pd.read_parquet(f"{categories}/categories/unique.item_id.parquet")
    raw_of = dict(zip(vocab.index, vocab["item_id"]))  # encoded id -> raw id (the parquet index is the id)
    out = {}
    for user, seq in zip(frame["user_id"], frame["item_id_seq"]):
        seq = list(seq)
        n = sum(1 for v in seq if v != 0)
        assert all(v != 0 for v in seq[:n]) and all(v == 0 for v in seq[n:]), "must be right-padded with 0"
        out[int(user)] = [int(raw_of[v]) for v in seq[:n]]
        width = len(seq)
    return out, width


def test_leave_one_out_split(tmp_path):
    # user 1: 7 events; user 2: 5 events with a time tie; user 3: 4 events (< min_user_events=5, dropped)
    rows = [(1, 100 + k, 3, 10 * k) for k in range(7)]
    rows += [(2, 7, 4, 5), (2, 8, 4, 5), (2, 9, 4, 3), (2, 1, 4, 8), (2, 2, 4, 9)]
    rows += [(3, 5, 4, k) for k in range(4)]
    events = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    paths = ml.run_leave_one_out_etl(events, tmp_path / "etl", max_seq_len=4, min_user_events=5)
    expected = {
        "train": {1: [101, 102, 103, 104], 2: [9, 7, 8]},  # events 1..n-2, the 4 most recent
        "valid": {1: [102, 103, 104, 105], 2: [9, 7, 8, 1]},  # 1..n-1
        "test": {1: [103, 104, 105, 106], 2: [7, 8, 1, 2]},  # 1..n
    }
    reference = ml.leave_one_out_frames(events, max_seq_len=4, min_user_events=5)
    for split in ("train", "valid", "test"):
        got, width = _decoded_sequences(paths[split], paths["categories"])
        assert width == 4
        assert got == expected[split] == reference[split], split
    # raw ids 1..9 and 100..106 plus the three reserved ids (padding, out-of-vocabulary, null)
    assert paths["num_items"] == 3 + len(set(events["item_id"]))
    with pytest.raises(ValueError, match="min_user_events"):
        ml.run_leave_one_out_etl(events, tmp_path / "bad", max_seq_len=4, min_user_events=3)


def test_daily_requests_group_one_users_day():
    day = ml.SECONDS_PER_DAY
    events = pd.DataFrame(
        [(1, 10, 5.0, day + 50), (1, 11, 3.0, day + 10), (1, 12, 4.0, 2 * day - 1),  # user 1, day 1
         (1, 13, 2.0, 2 * day),  # just past midnight: day 2
         (2, 10, 4.5, day + 20), (2, 14, 1.0, 3 * day + 5)],
        columns=["user_id", "item_id", "rating", "timestamp"])
    req = ml.daily_requests(events)
    assert req["request_id"].tolist() == [0, 0, 0, 1, 2, 3]
    assert req["item_id"].tolist() == [11, 10, 12, 13, 10, 14]  # time order inside the day
    assert req["request_time"].tolist() == [day + 10] * 3 + [2 * day, day + 20, 3 * day + 5]
    assert req["positive"].tolist() == [0, 1, 1, 0, 1, 0]  # rating >= 4
    with pytest.raises(ValueError, match="rating"):
        ml.daily_requests(events.drop(columns=["rating"]))


def test_request_etl_histories_end_before_the_day(tmp_path):
    import merlin.io

    day = ml.SECONDS_PER_DAY
    # user 1 rates on days 1, 2, 3 (two items on day 2); the last day goes to eval
    events = pd.DataFrame(
        [(1, 10, 5.0, day + 1), (1, 11, 4.0, 2 * day + 1), (1, 12, 1.0, 2 * day + 2), (1, 13, 4.0, 3 * day)],
        columns=["user_id", "item_id", "rating", "timestamp"])
    paths = ml.run_request_etl(events, tmp_path / "req", max_history=8, eval_fraction=0.3)
    vocab = pd.read_parquet(next((tmp_path / "req" / "categories").rglob("unique.*.parquet")))
    raw_of = dict(zip(vocab.index, vocab.iloc[:, 0]))
    decode = lambda ids: [int(raw_of[i]) for i in ids]  # noqa: E731
    train = merlin.io.Dataset(paths["train"], engine="parquet").to_ddf().compute().sort_values("request_id")
    evals = merlin.io.Dataset(paths["eval"], engine="parquet").to_ddf().compute()
    assert [decode(h) for h in train["hist_item_id"]] == [[], [10]]
    assert [decode(c) for c in train["cand_item_id"]] == [[10], [11, 12]]
    assert [list(p) for p in train["positive"]] == [[1], [1, 0]]
    assert [decode(h) for h in evals["hist_item_id"]] == [[10, 11, 12]]  # day 3's own event is not history
    assert [decode(c) for c in evals["cand_item_id"]] == [[13]]
    assert "hist_action" not in train.columns  # no action in the log: none in the rows
    # with the reader's action column (the rating bucket) the history carries it, in event order
    paths = ml.run_request_etl(events.assign(action=events["rating"].astype("int64")), tmp_path / "act",
                               max_history=8, eval_fraction=0.3)
    train = merlin.io.Dataset(paths["train"], engine="parquet").to_ddf().compute().sort_values("request_id")
    evals = merlin.io.Dataset(paths["eval"], engine="parquet").to_ddf().compute()
    assert [list(a) for a in train["hist_action"]] == [[], [5]]
    assert [list(a) for a in evals["hist_action"]] == [[5, 4, 1]]


# ------------------------------------------------------------------------------------ on the real ML-100K

def _ml100k_or_skip():
    folder = ml.default_ml100k_dir()
    if not (folder / "u.data").is_file():
        pytest.skip(f"ML-100K not found at {folder} (set ${ml.ENV_ML100K}); its license forbids a copy in the repo")
    return folder


def test_ml100k_reader_reads_every_line():
    folder = _ml100k_or_skip()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frame = ml.read_movielens(folder)
    lines = [line.split("\t") for line in (folder / "u.data").read_text().splitlines() if line.strip()]
    assert len(frame) == len(lines)
    assert sorted(zip(frame.user_id, frame.item_id)) == sorted((int(u), int(i)) for u, i, _, _ in lines)
    # the README: 100,000 ratings by 943 users on 1,682 movies; a copy with another count must say so
    truncated = [w for w in caught if "truncated" in str(w.message)]
    assert bool(truncated) == (len(frame) != 100_000)
    assert frame.user_id.nunique() == 943 and frame.item_id.nunique() == 1682
    assert frame.groupby("user_id").size().min() >= 20
    assert frame["action"].between(1, 5).all()
    assert (np.diff(frame["timestamp"].to_numpy())[np.diff(frame["user_id"].to_numpy()) == 0] >= 0).all()


def test_ml100k_next_item_end_to_end(tmp_path):
    """A few hundred users, one epoch, every arch: the pipeline runs, metrics are in range, the T4R metrics
    equal an independent full-ranking computation, and every block is causal (the check can fail: the
    XLNet default, bidirectional, is not)."""
    import merlin.io
    import torch
    from transformers4rec.torch.utils.data_utils import MerlinDataLoader

    from merlin_longseq.jobs import movielens as job

    _ml100k_or_skip()
    cfg = job.MovieLensJobConfig.quick(max_users=150, max_seq_len=40)
    out = job.run(str(tmp_path / "run"), cfg, log=lambda *_: None)
    assert {s["arch"] for s in out["summary"]} == set(job.ARCHS)
    for row in out["runs"]:
        for split in ("valid", "test"):
            hr10, hr50 = row[f"{split}_hr@10"], row[f"{split}_hr@50"]
            nd10, nd50 = row[f"{split}_ndcg@10"], row[f"{split}_ndcg@50"]
            assert 0.0 <= nd10 <= hr10 <= hr50 <= 1.0 and nd10 <= nd50 <= hr50
        assert math.isfinite(row["train_loss"])
    assert (tmp_path / "run" / "movielens_next_item.json").is_file()
    assert "| hstu |" in (tmp_path / "run" / "report.md").read_text()

    # independent metric check on one freshly trained model
    paths = {s: str(tmp_path / "run" / "etl" / s) for s in ("train", "valid", "test")}
    schema = merlin.io.Dataset(paths["train"], engine="parquet").schema.select_by_name(["item_id_seq"])
    row = job.train_and_evaluate(paths, schema, "sasrec", 0, cfg, str(tmp_path / "one"))
    model = row["model"].eval()
    loader = MerlinDataLoader.from_schema(schema, paths["test"], batch_size=64,
                                          max_sequence_length=cfg.max_seq_len, shuffle=False)
    hits, gains = {10: [], 50: []}, {10: [], 50: []}
    with torch.no_grad():
        for inputs, _ in loader:
            scores = model(inputs, testing=True)["predictions"]  # [B, all items]: one head, a tensor
            scores = scores["next-item"] if isinstance(scores, dict) else scores
            items = inputs["item_id_seq"]
            target = items[torch.arange(len(items)), (items != 0).sum(1) - 1]  # the held-out last item
            rank = (scores > scores.gather(1, target[:, None])).sum(1)  # items ranked above it, all items
            for k in (10, 50):
                hits[k] += (rank < k).float().tolist()
                gains[k] += torch.where(rank < k, 1.0 / torch.log2(rank + 2.0), torch.zeros(())).tolist()
    for k in (10, 50):
        assert np.mean(hits[k]) == pytest.approx(row[f"test_hr@{k}"], abs=1e-5)
        assert np.mean(gains[k]) == pytest.approx(row[f"test_ndcg@{k}"], abs=1e-5)

    from merlin_longseq.t4r.causal import check_causal

    batch = next(iter(loader))[0]
    for arch, options in (("hstu", {}), ("sasrec", {}), ("xlnet", {}), ("xlnet", {"causal": False})):
        built = job.build_model(schema, arch, job.MovieLensJobConfig.quick(max_seq_len=40,
                                                                            arch_options={arch: options}))
        built(batch, training=True)  # builds the lazy layers
        change = check_causal(built, batch, position=10)
        if options.get("causal", True):
            assert change == 0.0, arch
        else:
            assert change > 0.0  # bidirectional XLNet reads later items: the check detects leakage


def test_job_config_rejects_bad_values():
    from merlin_longseq.jobs import movielens as job

    with pytest.raises(ValueError, match="unknown arch"):
        job.MovieLensJobConfig(archs=("bert",))
    with pytest.raises(ValueError, match="divisible"):
        job.MovieLensJobConfig(d_model=50, n_heads=3)
    with pytest.raises(ValueError, match="seed"):
        job.MovieLensJobConfig(seeds=())


def test_uniform_negatives_cover_every_id(tmp_path):
    """T4R's sampler keeps the lowest ids (log-uniform draws, then a sorted cut); the uniform option must draw
    ids above and below the middle about equally often."""
    import torch
    from merlin.schema import ColumnSchema, Schema, Tags
    from transformers4rec.torch.model.prediction_task import LogUniformSampler

    from merlin_longseq.jobs import movielens as job

    n_items = 1000
    schema = Schema([ColumnSchema(
        "item_id_seq", dtype="int64", is_list=True, is_ragged=False, dims=(None, 20),
        tags=[Tags.ITEM_ID, Tags.ITEM, Tags.ID, Tags.CATEGORICAL, Tags.SEQUENCE, Tags.LIST],
        properties={"domain": {"min": 0, "max": n_items - 1, "name": "item_id"}})])
    shares = {}
    for sampler_name in ("log-uniform", "uniform"):
        cfg = job.MovieLensJobConfig.quick(max_seq_len=20, num_negatives=32, negative_sampler=sampler_name)
        [sampler] = [m for m in job.build_model(schema, "sasrec", cfg).modules() if isinstance(m, LogUniformSampler)]
        torch.manual_seed(0)
        drawn = torch.cat([sampler.sample(torch.tensor([5]))[0] for _ in range(100)])
        assert drawn.min() >= 1  # never the padding id
        shares[sampler_name] = float((drawn >= n_items // 2).float().mean())
    assert 0.4 < shares["uniform"] < 0.6
    assert shares["log-uniform"] < 0.1


def _item_schema(n_items, seq_len):
    from merlin.schema import ColumnSchema, Schema, Tags

    return Schema([ColumnSchema(
        "item_id_seq", dtype="int64", is_list=True, is_ragged=False, dims=(None, seq_len),
        tags=[Tags.ITEM_ID, Tags.ITEM, Tags.ID, Tags.CATEGORICAL, Tags.SEQUENCE, Tags.LIST],
        properties={"domain": {"min": 0, "max": n_items - 1, "name": "item_id"}})])


@pytest.mark.parametrize("arch", ["hstu", "sasrec", "xlnet"])
def test_l2_normalize_gives_unit_item_rows_and_sequence_outputs(arch):
    """With l2_normalize the weights the tied output layer reads are unit-norm rows with a zero padding row, the
    input lookup reads the same rows, the sequence output is unit-norm, every score is a cosine / temperature,
    and all of it still holds after an optimiser step (which moves the underlying parameter)."""
    import torch
    from transformers4rec.torch.model.prediction_task import _NextItemPredictionTask

    from merlin_longseq.jobs import movielens as job
    from merlin_longseq.t4r.normalize import L2Normalize

    n_items, seq_len = 300, 20
    cfg = job.MovieLensJobConfig(**{**job.job_preset("published", quick=True), "max_seq_len": seq_len})
    torch.manual_seed(0)
    model = job.build_model(_item_schema(n_items, seq_len), arch, cfg)
    [out_layer] = [m for m in model.modules() if isinstance(m, _NextItemPredictionTask)]
    [table] = [m for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.num_embeddings == n_items]
    assert out_layer.item_embedding_table is table  # weight tying: one table, in and out
    outputs = []
    model.heads[0].body[-1].register_forward_hook(lambda mod, args, out: outputs.append(out))
    assert isinstance(model.heads[0].body[-1], L2Normalize)

    items = torch.randint(1, n_items, (8, seq_len), generator=torch.Generator().manual_seed(0))
    items[:4, 12:] = 0  # right padding
    batch = {"item_id_seq": items}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    original = table.parametrizations.weight.original.detach().clone()
    for _ in range(2):
        model.train()
        loss = model(batch, training=True)["loss"]
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        weight = out_layer.item_embedding_table.weight.detach()
        assert torch.allclose(weight[1:].norm(dim=1), torch.ones(n_items - 1), atol=1e-5)
        assert torch.count_nonzero(weight[0]) == 0
        assert torch.equal(table(items).detach(), weight[items])  # the input lookup reads the normalised rows
    assert not torch.equal(table.parametrizations.weight.original, original)  # it trained

    norms = outputs[-1].detach().norm(dim=-1)
    has_target = (items[:, :-1] != 0) & (items[:, 1:] != 0)  # clm: position i predicts item i + 1
    assert torch.allclose(norms[:, :-1][has_target], torch.ones(int(has_target.sum())), atol=1e-5)
    assert torch.all((norms - 1).abs().lt(1e-5) | norms.eq(0))  # elsewhere unit or zero (padding stays zero)
    model.eval()
    with torch.no_grad():
        scores = model(batch, testing=True)["predictions"]
    assert scores.shape == (8, n_items)
    assert scores.abs().max() <= 1.0 / cfg.softmax_temperature + 1e-4


def test_l2_normalize_embedding_alone():
    import torch

    from merlin_longseq.t4r.normalize import l2_normalize_embedding

    table = torch.nn.Embedding(5, 3, padding_idx=0)
    l2_normalize_embedding(table)
    assert torch.allclose(table.weight[1:].norm(dim=1), torch.ones(4))
    assert torch.count_nonzero(table.weight[0]) == 0
    table.weight.sum().backward()  # the padding row gets no gradient (a normalised zero row would get 1/eps)
    assert torch.count_nonzero(table.parametrizations.weight.original.grad[0]) == 0
    with pytest.raises(ValueError, match="already"):
        l2_normalize_embedding(table)


def test_published_recipe_preset():
    from merlin_longseq.jobs import movielens as job

    cfg = job.MovieLensJobConfig.published()
    assert (cfg.max_seq_len, cfg.d_model, cfg.n_heads, cfg.n_layers) == (200, 50, 1, 2)
    assert (cfg.dropout, cfg.learning_rate, cfg.weight_decay, cfg.batch_size) == (0.2, 1e-3, 0.0, 128)
    assert cfg.sampled_softmax and cfg.num_negatives == 128 and cfg.negative_sampler == "uniform"
    assert cfg.l2_normalize and cfg.softmax_temperature == 0.05
    assert cfg.epochs == 100
    assert not job.MovieLensJobConfig().l2_normalize  # the defaults are unchanged
    assert job.MovieLensJobConfig().softmax_temperature == 1.0
    # --quick shrinks the sizes and keeps the recipe's loss and normalisation; no recipe = the defaults
    quick = job.MovieLensJobConfig(**job.job_preset("published", quick=True))
    assert quick.epochs == 1 and quick.max_users == 200 and quick.l2_normalize and quick.softmax_temperature == 0.05
    assert job.job_preset(None, quick=False) == {}
    with pytest.raises(ValueError, match="temperature"):
        job.MovieLensJobConfig(softmax_temperature=0.0)
