"""fit takes the data and models PyTorch users have (issue 10): torch datasets and
DataLoaders, dict batches and outputs, iterable datasets, user losses and metrics;
loader workers and resume keep the run exact. One process (strategy local): these
exercise loading and scoring, not communication."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torch.utils.data import TensorDataset as TorchTensorDataset

import paratrain
from paratrain.data.batches import batch_len, move_to, split_batch
from paratrain.data.loading import ShardedIterable
from paratrain.data.sampler import ShardedBatchSampler
from paratrain.errors import ConfigError
from paratrain.train import Callback

X = torch.randn(96, 5, generator=torch.Generator().manual_seed(1))
Y = (X[:, 0] > 0).long()


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 2))


class DictData(Dataset):
    """Samples as dicts, as a tokenizer's datasets give them."""

    def __len__(self):
        return len(Y)

    def __getitem__(self, index):
        return {"features": X[index], "label": Y[index]}


def dict_step(model, batch):
    logits = model(batch["features"])
    accuracy = (logits.argmax(1) == batch["label"]).float().mean()
    return nn.functional.cross_entropy(logits, batch["label"]), {"acc": accuracy}


def fit(model=None, data=None, **options):
    options = {"strategy": "local", "epochs": 2, "batch_size": 16, "optimizer_params": {"lr": 0.1}, **options}
    return paratrain.fit(model or mlp(), data if data is not None else TorchTensorDataset(X, Y), **options)


def test_a_torch_tensor_dataset_trains_and_is_scored_as_classification():
    summary = fit(heldout=TorchTensorDataset(X[:32], Y[:32]))
    assert 0.0 <= summary["accuracy"] <= 1.0 and summary["heldout_loss"] > 0 and summary["steps"] == 12


def test_a_dataloader_gives_its_dataset_and_collate():
    seen = []

    def collate(samples):
        seen.append(len(samples))
        return torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])
    summary = fit(data=DataLoader(TorchTensorDataset(X, Y), batch_size=3, collate_fn=collate))
    assert summary["steps"] == 12 and set(seen) == {16}   # fit's batching, the loader's collate


def test_dict_batches_a_step_fn_with_metrics_and_heldout_metrics():
    summary = fit(data=DictData(), heldout=DictData(), step_fn=dict_step, loss_reduction="mean")
    assert summary["accuracy"] is None             # a user loss: fit does not guess accuracy
    assert 0.0 <= summary["heldout_acc"] <= 1.0 and summary["heldout_loss"] > 0


class DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = mlp()

    def forward(self, x):
        return {"logits": self.net(x)}


class ModelOutputLike(nn.Module):
    """Returns an object with .logits, as a transformers ModelOutput."""

    def __init__(self):
        super().__init__()
        self.net = mlp()

    def forward(self, x):
        from types import SimpleNamespace
        return SimpleNamespace(logits=self.net(x))


@pytest.mark.parametrize("model", [DictOut, ModelOutputLike])
def test_outputs_may_be_dicts_or_model_outputs(model):
    summary = fit(model=model(), heldout=TorchTensorDataset(X[:32], Y[:32]))
    assert summary["accuracy"] is not None and summary["final_loss"] is not None


def test_a_language_model_is_not_scored_as_classification():
    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Embedding(7, 8), nn.Linear(8, 7)

        def forward(self, ids):
            return self.head(self.embed(ids))       # [B, T, V]
    tokens = torch.randint(0, 7, (32, 6), generator=torch.Generator().manual_seed(2))
    data = TorchTensorDataset(tokens[:, :-1], tokens[:, 1:])
    summary = fit(model=TinyLM(), data=data, heldout=data, batch_size=8)
    assert summary["accuracy"] is None and summary["heldout_loss"] > 0


class Stream(IterableDataset):
    def __init__(self, count):
        self.count = count

    def __iter__(self):
        for index in range(self.count):
            yield X[index % len(X)], Y[index % len(X)]


def test_iterable_datasets_train_and_shard_disjointly():
    assert fit(data=Stream(80), epochs=1)["steps"] == 5    # 80 samples, 16 per step
    shards = [[int(x.sum() * 1e4) for x, _ in ShardedIterable(Stream(40), rank, 4)] for rank in range(4)]
    assert sum(len(s) for s in shards) == 40 and all(len(s) == 10 for s in shards)
    flat = [v for s in shards for v in s]
    assert len(set(flat)) == len(flat)       # every element once


def test_dict_batches_with_two_loader_workers_give_the_same_run():
    one = fit(data=DictData(), step_fn=dict_step, num_workers=0)
    two = fit(data=DictData(), step_fn=dict_step, num_workers=2, persistent_workers=True)
    assert one["param_checksum"] == two["param_checksum"]


class StopAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, state):
        if state.step == self.step:
            raise KeyboardInterrupt("stopped on purpose")


def test_stopping_mid_epoch_and_resuming_gives_the_straight_run(tmp_path):
    options = dict(data=DictData(), step_fn=dict_step, epochs=2, checkpoint_dir=str(tmp_path), checkpoint_every=4,
                   num_workers=2)
    straight = fit(**{**options, "checkpoint_dir": str(tmp_path / "straight")})
    with pytest.raises(KeyboardInterrupt):
        fit(**options, callbacks=[StopAt(7)])    # the last checkpoint is step 4, mid-epoch 0
    resumed = fit(**options, resume=True)
    assert resumed["param_checksum"] == straight["param_checksum"] and resumed["steps"] == straight["steps"]


def test_a_real_sampler_for_your_own_loader():
    sampler = ShardedBatchSampler(96, 16, rank=1, world=2, seed=3)
    sampler.set_epoch(1)
    loader = DataLoader(DictData(), batch_sampler=sampler)
    mine = [batch["label"] for batch in loader]
    assert len(mine) == 6 and all(len(labels) == 8 for labels in mine)
    assert [idx.tolist() for _, idx in sampler.batches(1)] == list(iter(sampler))


def test_batches_of_any_structure():
    batch = {"a": torch.zeros(6, 2), "b": [torch.ones(6), (torch.arange(6),)], "note": "kept"}
    assert batch_len(batch) == 6
    parts = split_batch(batch, 4)
    assert [batch_len(p) for p in parts] == [2, 2, 1, 1] and parts[0]["note"] == "kept"
    assert move_to(batch, "cpu")["b"][1][0].dtype == torch.int64


def test_bad_fit_arguments_are_clear():
    with pytest.raises(ConfigError, match="step_fn or loss_fn, not both"):
        fit(step_fn=dict_step, loss_fn=lambda o, b: o.sum())
    with pytest.raises(ConfigError, match="loss_reduction='avg'"):
        fit(step_fn=dict_step, loss_reduction="avg")
    with pytest.raises(ConfigError, match="max_grad_norm=-1"):
        fit(max_grad_norm=-1)
    with pytest.raises(ConfigError, match="batch_size=200 is larger than the 96 training samples"):
        fit(batch_size=200)
    with pytest.raises(TypeError, match="must be a torch.utils.data.Dataset"):
        fit(data=[1, 2, 3])
    with pytest.raises(TypeError, match=r"\(inputs, targets\) batches"):
        fit(data=DictData())
