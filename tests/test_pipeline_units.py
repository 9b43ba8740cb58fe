"""Pipeline pieces without a process group: partitioning and schedules (pure
functions), the mesh, the p2p wire format and a real ZeroMQ link inside one process,
and the errors bad input must raise."""
from __future__ import annotations

import threading

import pytest
import torch
import torch.distributed as dist
from torch import nn

from paratrain.env import read_env
from paratrain.errors import CommTimeout, ConfigError, PeerError
from paratrain.comm import wire
from paratrain.parallel import p2p
from paratrain.parallel.hybrid import build_mesh
from paratrain.parallel.pipeline import (Action, balance_by_cost, build_schedule, build_stage_module,
                                         counts_from_split_points, one_f_one_b_schedule, resolve_partition,
                                         simulate_schedules, split_by_counts, theoretical_bubble)
from paratrain.parallel.stage_runner import ActivationMeter
from paratrain.train.pipeline_strategy import PipelineStrategy, assemble_stage_states
from paratrain.train.strategy import TrainSpec


def tiny_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


# ---------------------------------------------------------------- partitioning


def test_balance_by_cost_minimises_the_slowest_stage():
    assert balance_by_cost([1, 1, 1, 1], 4) == [1, 1, 1, 1]
    assert balance_by_cost([5, 1, 1, 1, 1, 1], 2) == [1, 5]
    assert balance_by_cost([1, 1, 1, 1, 1, 5], 2) == [5, 1]
    assert balance_by_cost([3, 3, 2, 2, 2], 2) == [2, 3]   # max 6 either way: earliest cut wins


def test_resolve_partition_modes():
    model = tiny_model()
    assert resolve_partition(model, 2, "uniform") == [3, 2]
    # Parameters: 144, 0, 272, 0, 68 -> cutting before Linear2 gives 144 vs 340, the best
    # possible; the parameter-free ReLU may go either side, the earliest cut wins.
    assert resolve_partition(model, 2, "params") == [1, 4]
    assert resolve_partition(model, 3, [1, 2, 2]) == [1, 2, 2]
    assert resolve_partition(model, 3, ["2", "4"]) == [2, 2, 1]
    timed = resolve_partition(model, 2, "time", sample_input=torch.randn(4, 8))
    assert sum(timed) == 5 and len(timed) == 2
    # The split keeps the full model's names, so stage state dicts merge into the full one.
    stages = [build_stage_module(model, b) for b in split_by_counts([2, 3])]
    merged = {**stages[0].state_dict(), **stages[1].state_dict()}
    assert merged.keys() == model.state_dict().keys()
    x = torch.randn(3, 8)
    assert torch.equal(stages[1](stages[0](x)), model(x))


@pytest.mark.parametrize("balance, message", [
    ("fastest", "balance='fastest'"),
    ([1, 1], "must list 3 layer counts"),
    ([1, 1, 1], "sums to 3, but the model has 5 layers"),
    ([1, 0, 4], "layer count 0 for stage 1"),
    (["9", "3"], "split point '9' is not a layer"),
    (["3", "2"], "distinct and in model order"),
    (["0", "2"], "is the first layer"),
])
def test_resolve_partition_rejects_bad_balance(balance, message):
    with pytest.raises(ConfigError, match=message):
        resolve_partition(tiny_model(), 3, balance)


def test_more_stages_than_layers_is_a_config_error():
    with pytest.raises(ConfigError, match="stages=6 is more than the model's 5 layers"):
        resolve_partition(tiny_model(), 6)
    with pytest.raises(TypeError, match="nn.Sequential"):
        resolve_partition(nn.Linear(2, 2), 1)
    with pytest.raises(ConfigError, match="split point 'fc9'"):
        counts_from_split_points(["fc1", "fc2"], ["fc9"])


# ------------------------------------------------------------------- schedules


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("stages, micro", [(2, 1), (2, 2), (2, 4), (2, 8), (4, 4), (4, 8), (3, 5)])
def test_schedules_are_complete_deadlock_free_and_have_the_textbook_bubble(schedule, stages, micro):
    lists = [build_schedule(schedule, stages, micro, s) for s in range(stages)]
    for actions in lists:   # every micro-batch once forward, once backward, forward first
        assert sorted((a.kind, a.micro_batch) for a in actions) == sorted(
            [("forward", m) for m in range(micro)] + [("backward", m) for m in range(micro)])
        for m in range(micro):
            assert actions.index(Action("forward", m)) < actions.index(Action("backward", m))
    run = simulate_schedules(lists)
    for idle in run.idle_fraction:
        assert idle == pytest.approx(theoretical_bubble(stages, micro))
    if schedule == "gpipe":
        assert run.peak_in_flight == [micro] * stages
    else:   # 1F1B's point: in-flight activations bounded by the depth, not by M
        assert run.peak_in_flight == [min(stages - s, micro) for s in range(stages)]


def test_one_f_one_b_order():
    assert repr(one_f_one_b_schedule(2, 3, 0)) == "[F0, F1, B0, F2, B1, B2]"
    assert repr(one_f_one_b_schedule(2, 3, 1)) == "[F0, B0, F1, B1, F2, B2]"


def test_simulation_detects_deadlock():
    bad = [[Action("forward", 0), Action("backward", 0)], [Action("backward", 0), Action("forward", 0)]]
    with pytest.raises(ValueError, match="deadlock"):
        simulate_schedules(bad)


def test_bad_schedule_arguments():
    with pytest.raises(ConfigError, match="schedule='zigzag'"):
        build_schedule("zigzag", 2, 2, 0)
    with pytest.raises(ConfigError, match="stage=2"):
        build_schedule("gpipe", 2, 2, 2)


# ------------------------------------------------------------------------ mesh


def test_mesh_layout():
    mesh = build_mesh(stages=2, replicas=3, rank=3, world_size=6)
    assert (mesh.replica, mesh.stage) == (1, 1)
    assert mesh.stage_ranks(1) == [1, 3, 5]
    assert (mesh.previous_rank, mesh.next_rank) == (2, None)
    with pytest.raises(ConfigError, match=r"stages=2 x replicas=3 = 6 processes, but WORLD_SIZE=4"):
        build_mesh(stages=2, replicas=3, rank=0, world_size=4)


# ------------------------------------------------------------------------- p2p


@pytest.mark.parametrize("tensor", [
    torch.randn(3, 5), torch.arange(7, dtype=torch.int64), torch.randn(2, 3).to(torch.bfloat16),
    torch.tensor(2.5, dtype=torch.float64), torch.zeros(0, 4), torch.tensor([True, False]),
    torch.randn(4, 6)[:, ::2],   # non-contiguous
])
def test_wire_format_roundtrip(tensor):
    fields = p2p.encode_header(7, tensor)
    tag, dtype, shape = p2p.decode_header(fields)
    out = wire.copy_tensor(bytes(wire.tensor_bytes(tensor)), dtype, shape)
    assert tag == 7 and out.dtype == tensor.dtype and torch.equal(out, tensor)
    out.add_(1) if out.dtype != torch.bool else None   # received tensors are writable


def test_wire_format_rejects_unsupported():
    with pytest.raises(TypeError, match="complex64"):
        p2p.encode_header(0, torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(PeerError, match="corrupt"):
        p2p.decode_header([0, 99, 1] + [0] * p2p.MAX_DIMS)


def _open_pair(timeout_s: float = 5.0):
    """Both ends of a ZeroMQ link in this process, found through a real TCP store."""
    master = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, use_libuv=True)
    # One client per end, as in two processes: a store client blocked in wait() serves no one else.
    stores = {0: master, 1: dist.TCPStore("127.0.0.1", master.port, is_master=False, use_libuv=True)}
    ends = {}

    def open_end(rank, peer):
        ends[rank] = p2p.open_channel("zmq", stores[rank], "link", rank=rank, peer=peer, timeout_s=timeout_s)

    binder = threading.Thread(target=open_end, args=(0, 1))
    binder.start()
    open_end(1, 0)
    binder.join(timeout_s)
    return ends[0], ends[1]


@pytest.mark.timeout(30)
def test_zmq_channel_carries_tensors_in_order_and_times_out():
    a, b = _open_pair(timeout_s=20.0)   # generous: the machine is shared
    b.timeout_s = 0.5
    try:
        for m in range(3):
            a.send(torch.full((2, 2), float(m)), tag=m)
        b.send(torch.ones(5, dtype=torch.int32), tag=0)
        assert [float(b.recv(expected_tag=m)[0, 0]) for m in range(3)] == [0.0, 1.0, 2.0]
        assert torch.equal(a.recv(expected_tag=0), torch.ones(5, dtype=torch.int32))
        assert a.bytes_sent == 3 * 16
        a.send(torch.zeros(1), tag=4)
        with pytest.raises(PeerError, match="sent tag 4, expected 3"):
            b.recv(expected_tag=3)
        with pytest.raises(CommTimeout, match="no tensor from rank 0 within 0.5s"):
            b.recv()
    finally:
        a.close()
        b.close()


def test_open_channel_rejects_bad_arguments():
    with pytest.raises(ConfigError, match="transport='carrier-pigeon'"):
        p2p.open_channel("carrier-pigeon", None, "k", rank=0, peer=1)
    with pytest.raises(ConfigError, match="needs the job's store"):
        p2p.open_channel("zmq", None, "k", rank=0, peer=1)


# ---------------------------------------------------------- activation meter


def test_activation_meter_counts_saved_activations_until_backward():
    model = tiny_model()
    meter = ActivationMeter(list(model.parameters()))
    x = torch.randn(32, 8)
    meter.reset(exclude=[x])
    with meter.hooks():
        losses = [model(x).sum() for _ in range(3)]
    alive_three = meter.live
    assert alive_three > 0 and meter.peak == alive_three
    for loss in losses:
        loss.backward()
    assert meter.live == 0 and meter.peak == alive_three   # freed, high-water mark kept
    with meter.hooks():
        model(x).sum().backward()
    assert meter.peak == alive_three and 3 * meter.live == 0


# ------------------------------------------------------------------ bad input


def _env(world: int, rank: int = 0):
    return read_env({"RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_PORT": "1"})


def test_strategy_rejects_bad_configuration_without_touching_the_network():
    with pytest.raises(ConfigError, match=r"stages=2 x replicas=2 = 4 processes, but WORLD_SIZE=3"):
        PipelineStrategy(stages=2, micro_batches=2, replicas=2, env=_env(3))
    with pytest.raises(ConfigError, match="schedule='interleaved'"):
        PipelineStrategy(stages=1, micro_batches=2, schedule="interleaved", env=_env(1))
    with pytest.raises(ConfigError, match="balance='time' needs sample_input"):
        PipelineStrategy(stages=1, micro_batches=2, balance="time", env=_env(1))
    with pytest.raises(ConfigError, match="balance='even'"):
        PipelineStrategy(stages=1, micro_batches=2, balance="even", env=_env(1))
    with pytest.raises(ConfigError, match="micro_batches=0"):
        PipelineStrategy(stages=1, micro_batches=0, env=_env(1))
    # More stages than layers fails in setup before any process waits for a peer.
    strategy = PipelineStrategy(stages=8, micro_batches=2, env=_env(8))
    with pytest.raises(ConfigError, match="stages=8 is more than the model's 5 layers"):
        strategy.setup(tiny_model(), TrainSpec(optimizer="sgd", optimizer_params={"lr": 0.1}))
    strategy = PipelineStrategy(stages=2, micro_batches=4, replicas=2, env=_env(4))
    with pytest.raises(ConfigError, match=r"batch size 12 must be a positive multiple of replicas=2 x micro_batches=4"):
        strategy.validate(12, 4)
    with pytest.raises(ConfigError, match="WORLD_SIZE=2"):
        strategy.validate(16, 2)
    with pytest.raises(ConfigError, match="stages=3 is more than the model's 2 layers"):
        PipelineStrategy(stages=3, micro_batches=1, env=_env(3)).validate(
            4, 3, model_factory=lambda: nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    strategy.validate(16, 4, model_factory=tiny_model)


def test_single_stage_pipeline_trains_and_checks_micro_batches():
    """S=1 needs no peers: the micro-batch check in train_step and the step itself."""
    strategy = PipelineStrategy(stages=1, micro_batches=3, env=_env(1))
    strategy.setup(tiny_model(), TrainSpec(optimizer="sgd", optimizer_params={"lr": 0.1}))
    x, y = torch.randn(10, 8), torch.randint(0, 4, (10,))
    with pytest.raises(ConfigError, match="batch size 10 must be a positive multiple of replicas=1 x micro_batches=3"):
        strategy.train_step((x, y), 10)
    before = {k: v.clone() for k, v in strategy.full_model_state().items()}
    result = strategy.train_step((x[:9], y[:9]), 9)
    assert result.samples == 9 and result.loss > 0
    after = strategy.full_model_state()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # An epoch's short tail is cut into nearly equal micro-batches, not rejected...
    assert strategy.train_step((x[:4], y[:4]), 4).samples == 4
    assert strategy.train_step((x[:2], y[:2]), 2).samples == 2   # fewer samples than micro-batches
    with pytest.raises(ConfigError, match="global batch 12 is larger than the validated batch size 9"):
        strategy.train_step((torch.randn(12, 8), torch.randint(0, 4, (12,))), 12)
    assert assemble_stage_states([strategy.state_dict()]).keys() == after.keys()
    evaluation = strategy.evaluate([(x, y)])
    assert evaluation.samples == 10
    strategy.close()


@pytest.mark.timeout(30)
def test_zmq_channel_delivers_what_was_sent_just_before_close():
    a, b = _open_pair(timeout_s=20.0)
    try:
        big = torch.randn(1 << 20)   # 4 MB: still in ZeroMQ's queue when close() runs
        a.send(big, tag=1)
        a.close()
        assert torch.equal(b.recv(expected_tag=1), big)
    finally:
        a.close()
        b.close()
