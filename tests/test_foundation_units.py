"""Pure pieces of the foundation, no network: env, sampler, buckets, KVStore local,
checkpoints, optimizer building."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from paratrain.atomic import save_torch_atomic
from paratrain.data import ShardedBatchSampler, build_dataset
from paratrain.data.sampler import shard_bounds
from paratrain.env import read_env
from paratrain.errors import ConfigError
from paratrain.kvstore import create
from paratrain.parallel.data_parallel import assign_buckets
from paratrain.train import checkpoint as ckpt
from paratrain.optimizers import build_worker_optimizer as build_optimizer
from paratrain.train.trainer import param_checksum


def test_read_env_defaults_and_values():
    env = read_env({})
    assert (env.rank, env.world_size, env.distributed, env.launched) == (0, 1, False, False)
    env = read_env({"RANK": "2", "WORLD_SIZE": "4", "MASTER_PORT": "1234", "TORCHELASTIC_USE_AGENT_STORE": "True",
                    "TORCHELASTIC_RESTART_COUNT": "3"})
    assert (env.rank, env.world_size, env.master_port, env.store_hosted, env.restart_count) == (2, 4, 1234, True, 3)


@pytest.mark.parametrize("environ, fragment", [
    ({"RANK": "4", "WORLD_SIZE": "4"}, "RANK=4"),
    ({"WORLD_SIZE": "x"}, "WORLD_SIZE='x'"),
    ({"PARATRAIN_ROLE": "boss"}, "PARATRAIN_ROLE='boss'"),
    ({"PARATRAIN_TIMEOUT": "-1"}, "PARATRAIN_TIMEOUT=-1"),
])
def test_read_env_rejects_bad_values_naming_them(environ, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(")):
        read_env(environ)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sampler_sees_every_sample_once_per_epoch(world):
    seen = []
    for rank in range(world):
        sampler = ShardedBatchSampler(103, 12, rank, world, seed=5) if 12 % world == 0 else None
        if sampler is None:
            pytest.skip("batch not divisible")
        seen += [i for _, idx in sampler.batches(0) for i in idx.tolist()]
    assert sorted(seen) == list(range(103))


def test_sampler_global_batches_do_not_depend_on_worker_count():
    one = [idx.tolist() for _, idx in ShardedBatchSampler(200, 64, 0, 1, seed=9).batches(1)]
    per_rank = [[idx.tolist() for _, idx in ShardedBatchSampler(200, 64, r, 4, seed=9).batches(1)] for r in range(4)]
    for step, batch in enumerate(one):
        assert batch == [i for r in range(4) for i in per_rank[r][step]]


def test_sampler_reshuffles_each_epoch_from_the_seed():
    sampler = ShardedBatchSampler(50, 10, seed=1)
    assert not torch.equal(sampler.global_order(0), sampler.global_order(1))
    assert torch.equal(sampler.global_order(3), ShardedBatchSampler(50, 10, seed=1).global_order(3))
    assert not torch.equal(sampler.global_order(0), ShardedBatchSampler(50, 10, seed=2).global_order(0))


def test_sampler_resumes_mid_epoch():
    sampler = ShardedBatchSampler(100, 10, seed=4)
    full = [idx.tolist() for _, idx in sampler.batches(2)]
    assert [idx.tolist() for _, idx in sampler.batches(2, start_batch=4)] == full[4:]


def test_shard_bounds_cover_a_short_batch_exactly():
    bounds = [shard_bounds(7, r, 4) for r in range(4)]
    assert bounds == [(0, 2), (2, 4), (4, 6), (6, 7)]


def test_sampler_rejects_indivisible_batch():
    with pytest.raises(ConfigError, match="64 is not divisible .* 3"):
        ShardedBatchSampler(100, 64, 0, 3)


def test_digits_split_is_fixed_and_disjoint():
    (train, held), (train2, _) = build_dataset("digits"), build_dataset("digits")
    assert len(train) + len(held) == 1797 and torch.equal(train.inputs, train2.inputs)
    assert len(held) == 360


def test_assign_buckets_respects_caps_and_order():
    # A bucket closes once it reaches its cap (DDP's rule): the first one here at 8 >= 5.
    assert assign_buckets([4, 4, 4, 4], first_cap=5, cap=8) == [[0, 1], [2, 3]]
    assert assign_buckets([4, 4, 4, 4, 4], first_cap=5, cap=9) == [[0, 1], [2, 3, 4]]
    assert assign_buckets([1, 100, 1], first_cap=5, cap=8) == [[0, 1], [2]]   # the big tensor leaves early
    assert assign_buckets([100], first_cap=5, cap=8) == [[0]]          # an oversized tensor gets its own bucket
    assert sum(assign_buckets([1] * 10, 3, 4), []) == list(range(10))


def test_local_kvstore_semantics():
    kv = create("local")
    kv.init("w", torch.ones(2, 3))
    kv.push("w", [torch.ones(2, 3), 2 * torch.ones(2, 3)])     # a list is summed first
    out = torch.empty(2, 3)
    kv.pull("w", out=out)
    assert torch.equal(out, 3 * torch.ones(2, 3))
    with pytest.raises(ConfigError, match="'missing' was never initialised"):
        kv.pull("missing", out=out)
    with pytest.raises(ConfigError, match=r"shape \(3,\)"):
        kv.push("w", torch.ones(3))
    with pytest.raises(ConfigError, match="kvstore='bogus'"):
        create("bogus")


def test_build_optimizer_names_bad_values():
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert isinstance(build_optimizer(params, "adam", {"lr": 1e-3}), torch.optim.Adam)
    assert isinstance(build_optimizer(params, torch.optim.SGD, {"lr": 1}), torch.optim.SGD)
    with pytest.raises(ConfigError, match="optimizer='lion'"):
        build_optimizer(params, "lion", {})
    with pytest.raises(ConfigError, match="bogus"):
        build_optimizer(params, "sgd", {"lr": 0.1, "bogus": 1})


def test_param_checksum_sees_one_bit():
    a = [torch.zeros(3)]
    b = [torch.zeros(3)]
    b[0][1] = torch.finfo(torch.float32).tiny
    assert param_checksum(a) != param_checksum(b)
    assert param_checksum(a) == param_checksum([torch.zeros(3)])


def test_checkpoint_round_trip_weights_only(tmp_path):
    state = {"model": {"w": torch.arange(4.0)}, "epoch": 2, "rng": ckpt.rng_state()}
    save_torch_atomic(state, tmp_path / "model.pt")
    loaded = ckpt.load_checkpoint(tmp_path / "model.pt")
    assert torch.equal(loaded["model"]["w"], torch.arange(4.0)) and loaded["epoch"] == 2
    ckpt.set_rng_state(loaded["rng"])
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]      # no temporary left behind


@pytest.mark.timeout(60)
def test_checkpoint_killed_mid_write_leaves_previous_loadable(tmp_path):
    """SIGKILL a process while it rewrites a large checkpoint over and over: whatever
    instant the kill lands, model.pt is a complete checkpoint."""
    code = textwrap.dedent(f"""
        import sys, torch
        from paratrain.atomic import save_torch_atomic
        i = 0
        while True:
            save_torch_atomic({{"w": torch.full((2_000_000,), float(i)), "i": i}}, {str(tmp_path / 'model.pt')!r})
            i += 1
            if i == 2: print("ready", flush=True)
    """)
    for delay in (0.05, 0.13, 0.31):
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "ready"
            import time
            time.sleep(delay)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        loaded = ckpt.load_checkpoint(tmp_path / "model.pt")
        assert torch.all(loaded["w"] == float(loaded["i"]))


def test_launcher_tunes_the_allocator_unless_the_user_did(monkeypatch):
    from paratrain.env import ALLOCATOR_ENV
    from paratrain.launch import LaunchConfig, Launcher

    for name in [n for n in os.environ if n.startswith("MALLOC_") or n == "GLIBC_TUNABLES"]:
        monkeypatch.delenv(name)
    env = Launcher(LaunchConfig(num_workers=1), ["x.py"])._base_env(1234)
    assert {k: env[k] for k in ALLOCATOR_ENV} == ALLOCATOR_ENV
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")   # the user's own malloc settings win, all of them
    env = Launcher(LaunchConfig(num_workers=1), ["x.py"])._base_env(1234)
    assert env["MALLOC_ARENA_MAX"] == "2" and not set(ALLOCATOR_ENV) & set(env)
