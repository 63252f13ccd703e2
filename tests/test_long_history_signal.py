"""The synthetic generator puts signal far back in the history: a model that reads the long history
beats the same model restricted to the last 50 events (semi-local window, same data, same steps)."""
import pytest
import torch

from merlin_longseq.data.synthetic import SyntheticConfig, generate_events
from merlin_longseq.models.hstu import HSTUConfig, HSTUNextItemModel
from merlin_longseq.training import UserSequences, evaluate_last_item, train_next_item

MAX_LEN = 400


def _train(seqs, window, items):
    torch.manual_seed(0)
    cfg = HSTUConfig(d_model=32, n_heads=1, n_layers=1, max_seq_len=MAX_LEN, dropout=0.0, local_window=window,
                     num_time_buckets=0, num_position_buckets=128)
    model = HSTUNextItemModel(items, cfg)
    losses = train_next_item(model, seqs.recent(MAX_LEN, drop_last=True), epochs=12, batch_size=4, lr=1e-2,
                             progress=False)
    return losses, evaluate_last_item(model, seqs)


def test_long_history_beats_last_50_events():
    # 80 interests visited round-robin, one event each: the next item was last seen ~80 events ago
    data = SyntheticConfig(num_users=96, num_items=300, num_topics=100, interests_per_user=80,
                           favorites_per_topic=1, p_favorite=0.9, mean_session_len=1.0,
                           min_history=MAX_LEN // 2, max_history=MAX_LEN, seed=1)
    seqs = UserSequences.from_events(generate_events(data))
    long_losses, long_metrics = _train(seqs, window=None, items=data.num_items)
    short_losses, short_metrics = _train(seqs, window=50, items=data.num_items)
    assert long_losses[-1] < long_losses[0] and short_losses[-1] < short_losses[0]
    assert long_metrics["hr@10"] >= 0.25, long_metrics
    assert long_metrics["hr@10"] > short_metrics["hr@10"] + 0.1, (long_metrics, short_metrics)
    assert long_metrics["ndcg@10"] > short_metrics["ndcg@10"]


def test_generator_is_deterministic_and_well_formed():
    cfg = SyntheticConfig(num_users=5, min_history=3, max_history=30, seed=7)
    a, b = generate_events(cfg), generate_events(cfg)
    assert a.equals(b)
    assert a.groupby("user_id").timestamp.apply(lambda t: t.is_monotonic_increasing).all()
    assert a.item_id.between(1, cfg.num_items).all() and a.action.isin([1, 2, 3]).all()
    lengths = a.groupby("user_id").size()
    assert lengths.between(3, 30).all() and len(lengths) == 5
    with pytest.raises(ValueError, match="min_history"):
        SyntheticConfig(min_history=10, max_history=5)
