"""From a dataset of any kind to this worker's batches, epoch by epoch.

``fit`` takes paratrain's in-memory :class:`~paratrain.data.datasets.TensorDataset`,
any map-style ``torch.utils.data.Dataset``, any ``IterableDataset``, or a
``DataLoader`` (whose dataset and loading options are used; the batching is fit's).

* map-style datasets are loaded by a real ``DataLoader`` on this worker's
  :class:`~paratrain.data.sampler.ShardedBatchSampler` (or the async strategies'
  dynamic one), with ``collate_fn``, ``num_workers``, ``pin_memory`` and
  ``persistent_workers``; so the same samples arrive in the same order for any number
  of workers at the same global batch, and a resume continues mid-epoch exactly.
* an ``IterableDataset`` is sharded by element: element ``i`` of the stream belongs to
  data-parallel rank ``i % W``, and of that rank's elements the ``j``-th goes to loader
  worker ``j % K``. Each rank batches its own elements; a step's global length is only
  known after the ranks compare (``global_len`` is None).
* the in-memory TensorDataset is indexed directly (no per-sample collate).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, runtime_checkable

from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate, get_worker_info

from paratrain.data.batches import batch_len
from paratrain.data.datasets import TensorDataset
from paratrain.errors import ConfigError


@dataclass(kw_only=True)
class LoaderConfig:
    """How samples are loaded and collated (``torch.utils.data.DataLoader``'s options)."""

    collate_fn: Callable | None = None
    num_workers: int = 0
    pin_memory: bool = False
    persistent_workers: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ConfigError(f"num_workers={self.num_workers!r} must be an integer >= 0 (loader processes)")
        if self.persistent_workers and not self.num_workers:
            raise ConfigError("persistent_workers=True needs num_workers >= 1")
        if self.collate_fn is not None and not callable(self.collate_fn):
            raise ConfigError(f"collate_fn={self.collate_fn!r} must be callable")

    def loader(self, dataset, **options) -> DataLoader:
        return DataLoader(dataset, collate_fn=EmptyIsNone(self.collate_fn or default_collate),
                          num_workers=self.num_workers, pin_memory=self.pin_memory,
                          persistent_workers=self.persistent_workers, **options)


class EmptyIsNone:
    """A collate function that gives None for a worker's empty share of a batch (the
    last, short batch of an epoch may leave a worker nothing, yet lockstep workers
    must still take part in the step)."""

    def __init__(self, collate: Callable) -> None:
        self.collate = collate

    def __call__(self, samples: list):
        return self.collate(samples) if samples else None


@runtime_checkable
class SupportsSetEpoch(Protocol):
    """An IterableDataset that reshuffles per epoch (``set_epoch``, as HF datasets do)."""

    def set_epoch(self, epoch: int) -> None: ...


def unwrap_loader(data: Any, config: LoaderConfig) -> tuple[Any, LoaderConfig]:
    """A ``DataLoader`` given as the data: its dataset and its loading options."""
    if not isinstance(data, DataLoader):
        return data, config
    return data.dataset, LoaderConfig(collate_fn=data.collate_fn, num_workers=data.num_workers,
                                      pin_memory=data.pin_memory, persistent_workers=data.persistent_workers)


def check_dataset(data: Any, what: str) -> None:
    if not isinstance(data, (TensorDataset, Dataset)):
        raise TypeError(f"{what} must be a torch.utils.data.Dataset, an IterableDataset, a DataLoader or a "
                        f"paratrain TensorDataset; got {type(data).__name__}")


def dataset_len(data: Any) -> int | None:
    """Samples in a map-style dataset; None for an iterable one."""
    return None if isinstance(data, IterableDataset) else len(data)


class EpochBatches:
    """This worker's batches, epoch by epoch: :meth:`epoch` yields ``(global_len,
    batch)``, ``global_len`` the samples of the whole step across workers (None for an
    IterableDataset, whose ranks must compare their lengths)."""

    def __init__(self, data: Any, *, sampler, config: LoaderConfig, local_batch: int, rank: int, world: int):
        self.data, self.sampler, self.config = data, sampler, config
        self.local_batch, self.rank, self.world = local_batch, rank, world
        self._loader: DataLoader | None = None

    @property
    def steps_per_epoch(self) -> int | None:
        return None if self.sampler is None else len(self.sampler)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[int | None, Any]]:
        if isinstance(self.data, TensorDataset):
            for global_len, indices in self.sampler.batches(epoch, start_batch):
                yield global_len, self.data.batch(indices)
            return
        if self.sampler is None:
            yield from self._stream(epoch, start_batch)
            return
        self.sampler.set_epoch(epoch, start_batch)
        for index, batch in enumerate(self._map_loader(), start_batch):
            yield self.sampler.global_len(index, batch_len(batch) if batch is not None else 0), batch

    def load(self, indices) -> Any:
        """The batch of the samples at ``indices`` of a map-style dataset, collated as
        the loader would (None for no indices): for a step whose slice must be cut
        again after the workers changed."""
        if self.sampler is None:
            raise ConfigError("an IterableDataset cannot load a given slice again; per-step fault tolerance "
                              "(--min-workers) needs a map-style dataset")
        if isinstance(self.data, TensorDataset):
            return self.data.batch(indices)
        return EmptyIsNone(self.config.collate_fn or default_collate)([self.data[int(i)] for i in indices])

    def _map_loader(self) -> DataLoader:
        if self._loader is None:   # kept, so persistent_workers outlive the epoch
            self._loader = self.config.loader(self.data, batch_sampler=self.sampler)
        return self._loader

    def _stream(self, epoch: int, start_batch: int):
        if self._loader is None:
            shard = ShardedIterable(self.data, self.rank, self.world)
            self._loader = self.config.loader(shard, batch_size=self.local_batch)
        if isinstance(self.data, SupportsSetEpoch):
            self.data.set_epoch(epoch)
        for index, batch in enumerate(self._loader):
            if index >= start_batch:
                yield None, batch


class ShardedIterable(IterableDataset):
    """The elements of ``dataset`` that belong to data-parallel rank ``rank`` of
    ``world``, split again over the loader's worker processes (module docstring)."""

    def __init__(self, dataset: IterableDataset, rank: int, world: int) -> None:
        self.dataset, self.rank, self.world = dataset, rank, world

    def __iter__(self):
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        mine = 0
        for index, item in enumerate(self.dataset):
            if index % self.world != self.rank:
                continue
            if mine % workers == worker:
                yield item
            mine += 1


def build_epoch_batches(data: Any, *, sampler_factory, global_batch: int, rank: int, world: int,
                        config: LoaderConfig) -> EpochBatches:
    """The :class:`EpochBatches` of ``data`` for this worker. ``sampler_factory(len)``
    makes the batch sampler of a map-style dataset (the strategy's: sharded, or dynamic
    for async training)."""
    data, config = unwrap_loader(data, config)
    check_dataset(data, "train_data")
    length = dataset_len(data)
    if length is not None and global_batch > length:
        raise ConfigError(f"batch_size={global_batch} is larger than the {length} training samples")
    sampler = sampler_factory(length) if length is not None else None
    return EpochBatches(data, sampler=sampler, config=config, local_batch=global_batch // world, rank=rank,
                        world=world)


def build_eval_batches(data: Any, *, global_batch: int, rank: int, world: int, config: LoaderConfig) -> EpochBatches:
    """Held-out batches: each of the ``world`` evaluating workers gets a disjoint share
    of every global batch, in dataset order, so the shares cover the set once."""
    from paratrain.data.sampler import ShardedBatchSampler
    data, config = unwrap_loader(data, config)
    check_dataset(data, "heldout")
    length = dataset_len(data)
    batch = max(world, global_batch - global_batch % world)
    sampler = ShardedBatchSampler(length, batch, rank, world, shuffle=False) if length else None
    return EpochBatches(data, sampler=sampler, config=config, local_batch=batch // world, rank=rank, world=world)
