"""The recommendation workload: DLRM, synthetic click logs with a planted model, and the
binary metrics. No network; every test runs in about a second or less."""
from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from paratrain.data.clicks import ClickConfig, build_clicks, zipf_ranks
from paratrain.errors import ConfigError
from paratrain.models.dlrm import DLRM, DLRMConfig, build_dlrm, click_loss
from paratrain.metrics import binary_logloss, roc_auc

SMALL_TABLES = (1000, 100, 10)


@pytest.fixture(scope="module")
def small_logs():
    return build_clicks(num_train=40_000, num_heldout=20_000, table_sizes=SMALL_TABLES, num_dense=5, seed=3)


def small_config(**overrides) -> DLRMConfig:
    options = dict(num_dense=5, table_sizes=SMALL_TABLES, embedding_dim=8, bottom_mlp=(16,), top_mlp=(16,))
    return DLRMConfig(**{**options, **overrides})


# ---- configs ---------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("num_dense", 0), ("num_dense", True), ("num_dense", 2.0), ("embedding_dim", 0),
    ("table_sizes", ()), ("table_sizes", (10, 0)), ("table_sizes", 10), ("table_sizes", (10, True)),
    ("bottom_mlp", (16, -1)), ("top_mlp", "64"), ("bottom_relu_last", 1),
])
def test_dlrm_config_rejects_bad_values_naming_field_and_value(field, value):
    with pytest.raises(ConfigError, match=rf"{field}={value!r}".replace("(", r"\(").replace(")", r"\)")):
        small_config(**{field: value})


def test_dlrm_config_takes_lists_and_counts_interactions():
    config = small_config(table_sizes=[7, 8, 9, 10], bottom_mlp=[], top_mlp=[])
    assert config.table_sizes == (7, 8, 9, 10) and config.bottom_mlp == () and config.top_mlp == ()
    assert config.num_interactions == 5 * 4 // 2    # bottom output + 4 embeddings, each pair once
    with pytest.raises(TypeError):
        DLRMConfig(5, (10,))                         # keyword-only


@pytest.mark.parametrize("options, field", [
    (dict(num_train=0), "num_train"), (dict(num_heldout=1.5), "num_heldout"),
    (dict(zipf_exponent=5.0), "zipf_exponent"), (dict(table_sizes=(10, 0)), "table_sizes"),
    (dict(table_sizes=(2**31,)), "table_sizes"), (dict(click_rate=1.0), "click_rate"),
    (dict(signal_rows=0), "signal_rows"), (dict(latent_dim=True), "latent_dim"),
    (dict(num_dense=0), "num_dense"), (dict(dense_strength=-1.0), "dense_strength"),
])
def test_build_clicks_rejects_bad_values(options, field):
    with pytest.raises(ConfigError, match=field):
        build_clicks(**{"num_train": 10, "num_heldout": 10, "table_sizes": (10,), **options})


def test_build_clicks_rejects_unknown_options():
    with pytest.raises(ConfigError, match=r"unknown click-log option\(s\) \['signal_row'\].*signal_rows"):
        build_clicks(num_train=10, num_heldout=10, table_sizes=(10,), signal_row=3)


# ---- the model -------------------------------------------------------------------------

def test_forward_shape_and_interactions_match_a_direct_computation():
    model = build_dlrm(small_config(bottom_mlp=(), top_mlp=()), seed=0)   # bottom and top: one Linear each
    dense, sparse = torch.randn(6, 5), torch.stack([torch.randint(0, n, (6,)) for n in SMALL_TABLES], dim=1)
    logits = model(dense, sparse)
    assert logits.shape == (6,) and logits.dtype == torch.float32
    bottom = model.bottom(dense)
    vectors = [bottom] + [model.tables[t](sparse[:, t]) for t in range(3)]
    pairs = [(vectors[a] * vectors[b]).sum(1) for a in range(4) for b in range(a)]   # each pair once, no self
    expected = model.top(torch.cat([bottom, torch.stack(pairs, dim=1)], dim=1)).squeeze(1)
    torch.testing.assert_close(logits, expected)


def test_bottom_relu_last_makes_the_bottom_output_non_negative():
    dense = torch.randn(64, 5)
    assert (build_dlrm(small_config(bottom_relu_last=True), seed=0).bottom(dense) >= 0).all()
    assert (build_dlrm(small_config(), seed=0).bottom(dense) < 0).any()


def test_forward_rejects_mismatched_inputs():
    model = build_dlrm(small_config(), seed=0)
    with pytest.raises(ValueError, match=r"sparse \(B, 3\)"):
        model(torch.randn(4, 5), torch.zeros(4, 2, dtype=torch.long))


def test_backward_gives_sparse_table_gradients_for_the_batch_rows_only(small_logs):
    train, _ = small_logs
    model = build_dlrm(small_config(), seed=0)
    batch = train.batch(torch.arange(32))
    click_loss(model(batch["dense"], batch["sparse"]), batch).backward()
    for index, table in enumerate(model.tables):
        grad = table.weight.grad
        assert grad.layout == torch.sparse_coo
        touched = set(grad.coalesce().indices()[0].tolist())
        assert touched == set(batch["sparse"][:, index].tolist())
    dense_grads = [param.grad for name, param in model.named_parameters() if not name.startswith("tables.")]
    assert all(grad.layout == torch.strided and grad.abs().sum() > 0 for grad in dense_grads)


class HashedEmbedding(nn.Module):
    """A table that folds ids onto a few rows: any module with nn.Embedding's forward works."""

    def __init__(self, num_rows: int, dim: int, buckets: int = 7):
        super().__init__()
        self.num_rows, self.buckets = num_rows, buckets
        self.weight = nn.Parameter(torch.randn(buckets, dim) * 0.1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids % self.buckets]


def test_embedding_factory_builds_every_table():
    calls = []

    def factory(num_rows, dim):
        calls.append((num_rows, dim))
        return HashedEmbedding(num_rows, dim)

    model = build_dlrm(small_config(), seed=0, embedding_factory=factory)
    assert calls == [(rows, 8) for rows in SMALL_TABLES]
    assert isinstance(model.tables, nn.ModuleList) and all(isinstance(t, HashedEmbedding) for t in model.tables)
    logits = model(torch.randn(4, 5), torch.tensor([[999, 99, 9]] * 4))
    logits.sum().backward()
    assert model.tables[0].weight.grad is not None


class RemoteTable(nn.Module):
    """Stands in for a table whose rows live elsewhere (as a server-side embedding):
    it knows its shape and holds no rows."""

    def __init__(self, num_rows: int, dim: int):
        super().__init__()
        self.num_rows, self.dim = num_rows, dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        assert int(ids.max()) < self.num_rows
        return torch.zeros(*ids.shape, self.dim)


def test_dense_part_does_not_depend_on_table_sizes_and_huge_tables_need_no_memory():
    def dense_numel(model):
        return sum(p.numel() for name, p in model.named_parameters() if not name.startswith("tables."))

    tracemalloc.start()
    huge = DLRM(small_config(table_sizes=(4_000_000, 1_000_000, 10)), embedding_factory=RemoteTable)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    small = DLRM(small_config(table_sizes=(10, 10, 10)))
    assert [table.num_rows for table in huge.tables] == [4_000_000, 1_000_000, 10]
    assert dense_numel(huge) == dense_numel(small)
    assert sum(t.numel() for t in huge.state_dict().values()) == dense_numel(small)
    assert peak < 2**20
    assert huge(torch.randn(3, 5), torch.tensor([[3_999_999, 999_999, 9]] * 3)).shape == (3,)


def test_build_dlrm_seed_fixes_the_weights():
    first, second = build_dlrm(small_config(), seed=5), build_dlrm(small_config(), seed=5)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    other = build_dlrm(small_config(), seed=6)
    assert not torch.equal(first.tables[0].weight, other.tables[0].weight)


def test_click_loss_is_binary_cross_entropy_on_the_click_field():
    logits, clicks = torch.randn(10), torch.randint(0, 2, (10,)).float()
    batch = {"click": clicks}
    torch.testing.assert_close(click_loss(logits, batch), F.binary_cross_entropy_with_logits(logits, clicks))
    torch.testing.assert_close(click_loss(logits, batch, reduction="sum"), 10 * click_loss(logits, batch))
    with pytest.raises(ConfigError, match="reduction='none'"):
        click_loss(logits, batch, reduction="none")


# ---- the click logs --------------------------------------------------------------------

def test_items_and_batches_have_the_documented_fields(small_logs):
    train, heldout = small_logs
    item = train[3]
    assert set(item) == {"dense", "sparse", "click"}
    assert item["dense"].shape == (5,) and item["dense"].dtype == torch.float32
    assert item["sparse"].shape == (3,) and item["sparse"].dtype == torch.int64
    assert item["click"].shape == () and item["click"].dtype == torch.float32
    assert train.task == "clicks" and train.table_sizes == SMALL_TABLES and train.num_dense == 5
    loader_batch = next(iter(torch.utils.data.DataLoader(train, batch_size=4)))
    gathered = train.batch(torch.arange(4))
    assert all(torch.equal(loader_batch[key], gathered[key]) for key in gathered)
    for split in small_logs:
        for column, rows in zip(split.sparse.T, SMALL_TABLES):
            assert 0 <= int(column.min()) and int(column.max()) < rows


def test_logs_are_a_function_of_seed_and_sample_index():
    first = build_clicks(num_train=3000, num_heldout=500, table_sizes=(50, 20), num_dense=3, seed=1)
    again = build_clicks(num_train=1000, num_heldout=500, table_sizes=(50, 20), num_dense=3, seed=1)
    other = build_clicks(num_train=1000, num_heldout=500, table_sizes=(50, 20), num_dense=3, seed=2)
    for field in ("dense", "sparse", "click"):
        assert torch.equal(getattr(first[0], field)[:1000], getattr(again[0], field))   # a prefix, whatever num_train
        assert torch.equal(getattr(first[1], field), getattr(again[1], field))          # same held-out split
        assert not torch.equal(getattr(first[1], field), getattr(other[1], field))
    assert not torch.equal(first[0].sparse[:500], first[1].sparse)                      # splits differ


def test_zipf_ranks_follow_the_truncated_power_law():
    uniform = (np.arange(200_000) + 0.5) / 200_000          # a uniform grid: the exact quantiles
    ranks = zipf_ranks(uniform, 1_000_000, 1.1)
    for k in (1, 10, 100, 10_000):
        expected = (1 - (k + 1) ** -0.1) / (1 - 1_000_001 ** -0.1)     # P(rank < k) of the bounded Pareto
        assert abs(np.mean(ranks < k) - expected) < 1e-3
    assert ranks.min() == 0 and ranks.max() < 1_000_000
    assert np.all(np.diff(ranks) >= 0)                       # monotone in u: an inverse CDF


def test_the_most_frequent_ids_dominate():
    train, _ = build_clicks(num_train=50_000, num_heldout=10, table_sizes=(1_000_000,), num_dense=1)
    counts = torch.bincount(train.sparse[:, 0]).sort(descending=True).values
    top_share = float(counts[:100].sum()) / len(train)       # 0.01% of the rows
    assert top_share > 0.3
    assert counts[0] > 50 * counts[1000]
    assert len(counts.nonzero()) > 10_000                    # and a long tail is touched too


def test_a_4m_row_table_costs_no_per_row_memory():
    def peak_bytes(rows):
        tracemalloc.start()
        train, _ = build_clicks(num_train=20_000, num_heldout=100, table_sizes=(rows, 10), num_dense=2)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return peak, train

    small_peak, _ = peak_bytes(40)
    huge_peak, train = peak_bytes(4_000_000)
    ids = train.sparse[:, 0]
    assert 0 <= int(ids.min()) and int(ids.max()) < 4_000_000
    assert int(ids.max()) > 3_000_000                        # hot ids are spread over the whole range
    assert huge_peak < small_peak + 2**20                    # a per-row table would add >= 32 MB


def test_planted_model_beats_the_base_rate_and_is_the_best_predictor(small_logs):
    _, heldout = small_logs
    assert 0.15 < heldout.click_rate < 0.25
    assert heldout.planted_logloss < heldout.base_rate_logloss - 0.03
    assert 0.65 < heldout.planted_auc < 0.95
    logit = torch.logit(heldout.probability)
    assert heldout.planted_logloss == pytest.approx(binary_logloss(logit, heldout.click))
    for wrong in (logit * 0.7, logit * 1.3, logit + 0.3, logit - 0.3):
        assert binary_logloss(wrong, heldout.click) > heldout.planted_logloss


def test_bias_is_solved_for_the_click_rate():
    for rate in (0.05, 0.3):
        train, _ = build_clicks(num_train=40_000, num_heldout=10, table_sizes=(100, 10), num_dense=3, click_rate=rate)
        assert abs(float(train.probability.mean()) - rate) < 0.01


def test_dlrm_learns_the_planted_signal_quickly(small_logs):
    torch.set_num_threads(1)
    train, heldout = small_logs
    model = build_dlrm(small_config(), seed=0)
    tables = list(model.tables.parameters())
    others = [p for name, p in model.named_parameters() if not name.startswith("tables.")]
    optimizers = [torch.optim.SparseAdam(tables, lr=0.03), torch.optim.Adam(others, lr=5e-3)]
    for start in range(0, len(train), 200):
        batch = train.batch(torch.arange(start, start + 200))
        loss = click_loss(model(batch["dense"], batch["sparse"]), batch)
        for optimizer in optimizers:
            optimizer.zero_grad()
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
    with torch.no_grad():
        logits = model(heldout.dense, heldout.sparse)
    signal = heldout.base_rate_logloss - heldout.planted_logloss
    assert binary_logloss(logits, heldout.click) < heldout.base_rate_logloss - 0.4 * signal
    assert roc_auc(logits, heldout.click) > 0.5 + 0.6 * (heldout.planted_auc - 0.5)


# ---- metrics ---------------------------------------------------------------------------

def test_metrics_match_sklearn_with_ties():
    from sklearn.metrics import log_loss, roc_auc_score

    generator = torch.Generator().manual_seed(0)
    labels = (torch.rand(5000, generator=generator) < 0.3).float()
    scores = torch.round(torch.randn(5000, generator=generator) + labels, decimals=1)   # many ties
    assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels.numpy(), scores.numpy()), abs=1e-12)
    assert binary_logloss(scores, labels) == pytest.approx(
        log_loss(labels.numpy(), torch.sigmoid(scores.double()).numpy()), abs=1e-9)
    assert roc_auc(torch.zeros(4), torch.tensor([0, 1, 0, 1])) == 0.5
    assert roc_auc(torch.tensor([0.1, 0.9]), torch.tensor([0.0, 1.0])) == 1.0
    assert binary_logloss(torch.tensor([0.0]), torch.tensor([1.0])) == pytest.approx(math.log(2))


def test_metrics_reject_bad_input():
    with pytest.raises(ConfigError, match="both classes"):
        roc_auc(torch.randn(5), torch.ones(5))
    with pytest.raises(ConfigError, match="differ in length"):
        binary_logloss(torch.randn(5), torch.ones(4))
    with pytest.raises(ConfigError, match="0 or 1"):
        roc_auc(torch.randn(3), torch.tensor([0.0, 2.0, 1.0]))


def test_click_config_defaults_are_valid():
    config = ClickConfig()
    assert max(config.table_sizes) >= 1_000_000 and 1.05 <= config.zipf_exponent <= 1.2
