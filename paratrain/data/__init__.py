"""Datasets that need no download, and deterministic sharded samplers."""
from paratrain.data.datasets import DATASETS, TensorDataset, build_dataset
from paratrain.data.sampler import ShardedBatchSampler

__all__ = ["DATASETS", "TensorDataset", "build_dataset", "ShardedBatchSampler"]
