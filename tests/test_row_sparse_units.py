"""Row-sparse keys without a network: row initializers, row ranges, the row ops of the
wire format, the lazy server rules against torch's sparse optimizers, a round's sum,
snapshots, optimizer-state transfer, and whole servers over the in-process transport
(ServerEmbedding through a Trainer against nn.Embedding(sparse=True))."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from paratrain.comm.wire import tensor_bytes
from paratrain.errors import ConfigError, PeerError
from paratrain.nn import ServerEmbedding, local_parameters
from paratrain.optimizers import build_server_optimizer
from paratrain.ps import protocol
from paratrain.ps.lazy_optimizer import Adagrad, LazyAdam, LazySGD, MXNetTest
from paratrain.ps.optimizer import SGD, Adam
from paratrain.ps.protocol import Op, ProtocolError
from paratrain.ps.row_init import BLOCK_ROWS, RowInitializer, fill_rows
from paratrain.ps.row_sparse import RowGradient, RowSliceState, sum_row_gradients
from paratrain.ps.sharding import plan_rows
from paratrain.ps.snapshot import slice_from_dict, slice_to_dict
from paratrain.ps.state_transfer import decode_state, encode_state
from paratrain.train.trainer import Trainer

# ----------------------------------------------------------------------------- rows and ranges


@pytest.mark.parametrize("kind", ["uniform", "normal", "zeros"])
def test_a_row_is_the_same_whatever_range_makes_it(kind):
    init = RowInitializer(kind=kind, low=-0.5, high=0.5, seed=7)
    rows = 2 * BLOCK_ROWS + 123
    whole = fill_rows(init, torch.empty(rows, 3), 0)
    for cuts in ([0, 1, rows], [0, BLOCK_ROWS - 1, BLOCK_ROWS + 5, rows], [0, 4000, 8000, rows]):
        parts = [fill_rows(init, torch.empty(b - a, 3), a) for a, b in zip(cuts, cuts[1:])]
        assert torch.equal(torch.cat(parts), whole)
    if kind == "uniform":
        assert float(whole.min()) >= -0.5 and float(whole.max()) < 0.5 and float(whole.std()) > 0.2
    other = fill_rows(RowInitializer(kind=kind, low=-0.5, high=0.5, seed=8), torch.empty(rows, 3), 0)
    assert torch.equal(other, whole) == (kind == "zeros")


@pytest.mark.parametrize("spec, match", [({"kind": "gaussian"}, "kind"), ({"kind": "uniform", "low": 1, "high": 0},
                                         "low < high"), ({"kind": "normal", "std": 0}, "std"),
                                         ({"seed": -1}, "seed"), ({"scale": 2}, "unknown"), (3, "RowInitializer")])
def test_initializer_specs_are_checked(spec, match):
    with pytest.raises(ConfigError, match=match):
        RowInitializer.from_spec(spec)


def test_row_ranges_cover_the_table_in_server_order():
    assert [(p.server, p.start, p.stop) for p in plan_rows(10, 3)] == [(0, 0, 4), (1, 4, 7), (2, 7, 10)]
    assert [(p.server, p.start, p.stop) for p in plan_rows(2, 3)] == [(0, 0, 1), (1, 1, 2)]
    with pytest.raises(ValueError):
        plan_rows(0, 2)


# ----------------------------------------------------------------------------- wire format


def _row_push(ids=(1, 3), dim=4, **overrides):
    ids = torch.tensor(ids, dtype=torch.int64)
    values = torch.ones(len(ids), dim)
    fields = dict(key="s:emb", request_id=5, shape=(10, dim), offset=0, length=len(ids),
                  payload=tensor_bytes(ids), values=tensor_bytes(values))
    fields.update(overrides)
    return protocol.encode(Op.ROW_PUSH, **fields)


def test_row_push_round_trips_ids_and_values():
    message = protocol.decode(_row_push(), max_payload_bytes=1 << 20)
    assert message.row_ids().tolist() == [1, 3] and torch.equal(message.rows(), torch.ones(2, 4))
    empty = protocol.decode(_row_push(ids=()), max_payload_bytes=1 << 20)
    assert empty.length == 0 and empty.rows().shape == (0, 4)


@pytest.mark.parametrize("mangle", [
    lambda f: f[:3],                                  # no values frame
    lambda f: f[:3] + [bytes(f[3])[:-4]],             # values one float short
    lambda f: [f[0], f[1], bytes(f[2])[:-8], f[3]],   # ids one short
])
def test_malformed_row_messages_are_rejected(mangle):
    frames = [bytes(memoryview(f)) for f in _row_push()]
    with pytest.raises(ProtocolError):
        protocol.decode(mangle(frames), max_payload_bytes=1 << 20)


def test_row_ops_need_a_table_shape_and_others_have_no_fourth_frame():
    with pytest.raises(ProtocolError, match="table shape"):
        protocol.decode(_row_push(shape=(10,)), max_payload_bytes=1 << 20)
    push = protocol.encode(Op.PUSH, key="i:1", shape=(2,), length=2, payload=tensor_bytes(torch.ones(2)))
    with pytest.raises(ProtocolError, match="at most 3 frames"):
        protocol.decode(push + [b"x"], max_payload_bytes=1 << 20)


def test_optimizer_state_round_trips_and_malformed_descriptions_are_refused():
    state = {"step": 3, "exp_avg": torch.randn(4, 2), "exp_avg_sq": torch.rand(4, 2).double()}
    description, values = encode_state(state)
    back = decode_state(protocol.decode_json(description), values)
    assert back["step"] == 3 and all(torch.equal(back[k], state[k]) for k in ("exp_avg", "exp_avg_sq"))
    for bad in ({"tensors": [["x", 1, [3]]]}, {"tensors": [["x", 99, [0]]]}, {"numbers": {"step": "3"}},
                {"tensors": [["x", 1, [-1]]]}):
        with pytest.raises(ProtocolError):
            decode_state(bad, b"")
    with pytest.raises(ProtocolError, match="left over"):
        decode_state({"tensors": []}, b"1234")
    with pytest.raises(TypeError):
        encode_state({"odd": None})


# ----------------------------------------------------------------------------- a round's sum, lazy rules


def test_a_sync_round_of_rows_sums_like_the_dense_round_in_rank_order():
    torch.manual_seed(0)
    pushes = []
    for rows in ([0, 2, 5], [2, 3], [5, 9]):
        pushes.append((RowGradient(torch.tensor(rows), torch.randn(len(rows), 3)), 0.25))
    total, scale = sum_row_gradients(pushes)
    dense = [torch.zeros(10, 3).index_copy_(0, g.rows, g.values) for g, _ in pushes]
    expected, _ = RowSliceState.__mro__[1].sum_round([(d, 0.25) for d in dense])
    assert scale == 0.25 and total.rows.tolist() == [0, 2, 3, 5, 9]
    assert torch.equal(total.values, expected[total.rows])


def _torch_reference(name: str, weight: torch.Tensor, lr: float):
    param = torch.nn.Parameter(weight.clone())
    make = {"sgd": lambda: torch.optim.SGD([param], lr=lr), "adam": lambda: torch.optim.SparseAdam([param], lr=lr),
            "adagrad": lambda: torch.optim.Adagrad([param], lr=lr)}
    return param, make[name]()


@pytest.mark.parametrize("name, rule", [("sgd", LazySGD(lr=0.3)), ("adam", LazyAdam(lr=0.05)),
                                        ("adagrad", Adagrad(lr=0.2))])
def test_lazy_rules_match_torchs_sparse_optimizers(name, rule):
    torch.manual_seed(1)
    weight = torch.randn(20, 3)
    param, optimizer = _torch_reference(name, weight, rule.lr)
    state = {}
    for step in range(6):
        ids = torch.randint(0, 20, (8,))
        values = torch.randn(8, 3)
        param.grad = torch.sparse_coo_tensor(ids[None], values, (20, 3), check_invariants=True)
        optimizer.step()
        grad = param.grad.coalesce()
        rule.update_rows(weight, grad.indices()[0], grad.values() * 2.0, state, scale=0.5)
    torch.testing.assert_close(weight, param.detach(), rtol=1e-6, atol=1e-6)


def test_lazy_sgd_momentum_touches_only_pushed_rows():
    rule, weight, state = LazySGD(lr=0.5, momentum=0.5), torch.zeros(4, 2), {}
    rule.update_rows(weight, torch.tensor([1]), torch.ones(1, 2), state)
    rule.update_rows(weight, torch.tensor([1, 3]), torch.ones(2, 2), state)
    assert weight[:, 0].tolist() == [0.0, -0.5 - 0.5 * 1.5, 0.0, -0.5]      # buf 1, then 1.5; row 3: 1
    assert state["momentum"][[0, 2]].abs().sum() == 0


def test_dense_arithmetic_of_the_registered_rules_is_the_dense_rules_own():
    assert type(build_server_optimizer("sgd")) is LazySGD and type(build_server_optimizer("adam")) is LazyAdam
    for lazy, dense in ((LazySGD(lr=0.1, momentum=0.9, weight_decay=0.01), SGD(lr=0.1, momentum=0.9, weight_decay=0.01)),
                        (LazyAdam(lr=0.01), Adam(lr=0.01))):
        a, b, state_a, state_b = torch.randn(30), None, {}, {}
        b = a.clone()
        for step in range(3):
            grad = torch.randn(30, generator=torch.Generator().manual_seed(step))
            lazy.update(a, grad, state_a, 0.5)
            dense.update(b, grad, state_b, 0.5)
        assert torch.equal(a, b)


def test_mxnet_test_rule_adds_rescaled_gradients():
    rule, weight = MXNetTest(rescale_grad=0.5), torch.ones(3, 2)
    rule.update_rows(weight, torch.tensor([2]), torch.full((1, 2), 4.0), {})
    rule.update(weight.view(-1), torch.ones(6), {})
    assert weight[:, 0].tolist() == [1.5, 1.5, 3.5]


def test_a_row_range_survives_a_snapshot_with_its_queued_pushes():
    state = RowSliceState(value=torch.randn(5, 2), full_shape=(9, 2), offset=4, num_workers=2, lr_mult=3.0)
    state.optimizer_state = {"step": 2, "exp_avg": torch.ones(5, 2)}
    state.pending[1].append((RowGradient(torch.tensor([0, 3]), torch.randn(2, 2)), 0.5))
    state.pushes = [0, 1]
    saved = slice_to_dict(state)
    import io
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    back = slice_from_dict(torch.load(buffer, weights_only=True))
    assert isinstance(back, RowSliceState) and back.lr_mult == 3.0 and back.offset == 4 and back.pushes == [0, 1]
    grad, scale = back.pending[1][0]
    assert scale == 0.5 and torch.equal(grad.values, state.pending[1][0][0].values)
    assert torch.equal(back.value, state.value) and back.optimizer_state["step"] == 2


# ----------------------------------------------------------------------------- in-process servers


def _table(rows=10, dim=3):
    return torch.zeros((rows, dim), layout=torch.sparse_coo)


def _grad(ids, values, rows=10):
    return torch.sparse_coo_tensor(torch.tensor(ids)[None], values, (rows, values.shape[1]), check_invariants=True)


@pytest.mark.timeout(60)
def test_inproc_row_sparse_semantics_and_bytes(job):
    j = job(num_servers=2)
    kv = j.worker(0, 1)
    kv.init("emb", _table(), initializer={"kind": "uniform", "low": -1, "high": 1, "seed": 5})
    start = fill_rows(RowInitializer("uniform", -1, 1, seed=5), torch.empty(10, 3), 0)
    out = torch.empty(4, 3)
    kv.row_sparse_pull("emb", out=out, row_ids=torch.tensor([9, 1, 9, 0]))
    assert torch.equal(out, start[[9, 1, 9, 0]])
    kv.push("emb", _grad([7, 1, 7], torch.ones(3, 3)))            # no optimizer: the rows become the sum
    before = kv.bytes_sent
    kv.push("emb", [_grad([7], torch.ones(1, 3)), _grad([2], torch.ones(1, 3))])
    assert kv.bytes_sent - before == 2 * (8 + 12)                # two rows, one per server, ids + values
    kv.row_sparse_pull("emb", out=out, row_ids=torch.tensor([7, 1, 2, 0]))
    assert out[:, 0].tolist() == [1.0, 1.0, 1.0, float(start[0, 0])]
    assert [s.keys["s:emb"].value.shape[0] for s in j.servers] == [5, 5]   # each server holds its half
    kv.close()


@pytest.mark.timeout(60)
def test_inproc_row_sparse_errors_are_clear(job):
    j = job(num_servers=2)
    kv = j.worker(0, 1)
    kv.init("emb", _table())
    kv.init("w", torch.zeros(3))
    with pytest.raises(ConfigError, match="row-sparse"):
        kv.pull("emb", out=torch.empty(10, 3))
    with pytest.raises(ConfigError, match="sparse tensor where a dense one"):
        kv.push("w", _grad([0], torch.ones(1, 1), rows=3))
    with pytest.raises(ConfigError, match="not a row-sparse key"):
        kv.row_sparse_pull("w", out=torch.empty(1, 3), row_ids=torch.tensor([0]))
    with pytest.raises(ConfigError, match=r"in \[0, 10\)"):
        kv.row_sparse_pull("emb", out=torch.empty(1, 3), row_ids=torch.tensor([10]))
    with pytest.raises(ConfigError, match="out must be"):
        kv.row_sparse_pull("emb", out=torch.empty(2, 3), row_ids=torch.tensor([1]))
    with pytest.raises(ConfigError, match="holds no entries"):
        kv.init("bad", _grad([1], torch.ones(1, 3)))
    with pytest.raises(ConfigError, match="shape"):
        kv.push("emb", _grad([1], torch.ones(1, 3), rows=11))
    kv.set_gradient_compression("2bit")
    with pytest.raises(ConfigError, match="residual of the whole table"):
        kv.push("emb", _grad([1], torch.ones(1, 3)))
    kv.set_gradient_compression("fp16")                          # casts compose
    kv.push("emb", _grad([1], torch.full((1, 3), 0.1)))
    out = torch.empty(1, 3)
    kv.row_sparse_pull("emb", out=out, row_ids=torch.tensor([1]))
    assert torch.equal(out, torch.full((1, 3), 0.1).half().float())
    # A raw dense PULL of a row-sparse key (bypassing the client's checks) is refused by the server.
    request = kv._connection.request(0, Op.PULL, key="s:emb", shape=(10, 3), length=15)
    with pytest.raises(PeerError, match="row-sparse"):
        kv._collect([request], "pull")
    kv.close()


@pytest.mark.timeout(60)
def test_inproc_optimizer_states_save_and_load(job, tmp_path):
    j = job(num_servers=2)
    kv = j.worker(0, 1, bigarray_bound=4)
    kv.init("emb", _table())
    kv.init("w", torch.zeros(6))
    kv.set_optimizer({"type": "adam", "lr": 0.1})
    kv.push("emb", _grad([1, 8], torch.ones(2, 3)))
    kv.push("w", torch.ones(6))
    kv.save_optimizer_states(tmp_path / "states.pt", dump_optimizer=True)
    saved = torch.load(tmp_path / "states.pt", weights_only=True)
    assert saved["optimizer"]["type"] == "adam" and set(saved["keys"]) == {"s:emb", "s:w"}
    assert saved["keys"]["s:emb"][0]["step"] == 1 and saved["keys"]["s:emb"][5]["exp_avg"].shape == (5, 3)
    rows, moments = torch.empty(2, 3), [s.keys["s:emb"].optimizer_state["exp_avg"].clone() for s in j.servers]
    kv.push("emb", _grad([1], torch.ones(1, 3)))                  # moves the state on
    kv.load_optimizer_states(tmp_path / "states.pt")              # and back
    assert [torch.equal(s.keys["s:emb"].optimizer_state["exp_avg"], m) for s, m in zip(j.servers, moments)] == [True] * 2
    kv.row_sparse_pull("emb", out=rows, row_ids=torch.tensor([1, 8]))
    assert kv.is_capable("optimizer_states") and kv.is_capable("row_sparse")
    with pytest.raises(ConfigError, match="capability"):
        kv.is_capable("telepathy")
    kv.close()


ROWS, DIM, BATCH, STEPS = 50, 4, 16, 5


class _Net(torch.nn.Module):
    def __init__(self, table: torch.nn.Module):
        super().__init__()
        self.table, self.linear = table, torch.nn.Linear(3 + 2 * DIM, 1)

    def forward(self, ids, x):
        return self.linear(torch.cat([self.table(ids).flatten(1), x], 1)).squeeze(1)


def _batch(step):
    g = torch.Generator().manual_seed(step)
    return torch.randint(0, ROWS, (BATCH, 2), generator=g), torch.randn(BATCH, 3, generator=g), torch.randn(BATCH, generator=g)


def _server_net():
    torch.manual_seed(0)
    return _Net(ServerEmbedding(ROWS, DIM, initializer={"kind": "uniform", "low": -0.1, "high": 0.1}))


def _one_process(name: str, lr: float):
    """nn.Embedding(sparse=True) with torch's sparse optimizer, the rest dense, on the global batch."""
    net = _server_net()
    table = torch.nn.Embedding(ROWS, DIM, sparse=True)
    table.weight.data = fill_rows(net.table.initializer, torch.empty(ROWS, DIM), 0)
    net.table = table
    sparse_cls = {"adam": torch.optim.SparseAdam, "sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad}[name]
    dense_cls = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad}[name]
    optimizers = [sparse_cls([table.weight], lr=lr), dense_cls(list(net.linear.parameters()), lr=lr)]
    for step in range(STEPS):
        ids, x, y = _batch(step)
        for optimizer in optimizers:
            optimizer.zero_grad()
        F.mse_loss(net(ids, x), y).backward()
        for optimizer in optimizers:
            optimizer.step()
    return table.weight.detach(), net.linear.weight.detach()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name, lr", [("adam", 0.05), ("sgd", 0.5), ("adagrad", 0.2)])
def test_server_embedding_through_a_trainer_equals_a_sparse_embedding(job, name, lr):
    j = job(num_servers=2)
    kv = j.worker(0, 1)
    net = _server_net()
    trainer = Trainer(net, name, {"lr": lr}, kvstore=kv)
    assert net.table.bound and [id(p) for p in local_parameters(net)] == [id(p) for p in net.linear.parameters()]
    for step in range(STEPS):
        ids, x, y = _batch(step)
        F.mse_loss(net(ids, x), y, reduction="sum").backward()
        trainer.step(BATCH)
    table = torch.empty(ROWS, DIM)
    kv.row_sparse_pull(trainer.sync._tables[0].key, out=table, row_ids=torch.arange(ROWS))
    expected_table, expected_linear = _one_process(name, lr)
    torch.testing.assert_close(table, expected_table, rtol=0, atol=1e-5)
    torch.testing.assert_close(net.linear.weight.detach(), expected_linear, rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="live on the parameter servers"):
        net.state_dict()
    trainer.close()


def test_server_embedding_is_a_plain_embedding_elsewhere_and_holds_nothing_until_made():
    import resource
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    big = ServerEmbedding(50_000_000, 64)                          # 12.8 GB as a real tensor
    assert big.weight.shape == (50_000_000, 64) and big.weight.untyped_storage().nbytes() == 4
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000   # KB
    net = _server_net()
    trainer = Trainer(net, "sgd", {"lr": 0.1}, kvstore="local")
    assert not net.table.bound and net.table.weight.is_contiguous()
    assert torch.equal(net.table.weight.detach(), fill_rows(net.table.initializer, torch.empty(ROWS, DIM), 0))
    ids, x, y = _batch(0)
    F.mse_loss(net(ids, x), y, reduction="sum").backward()
    trainer.step(BATCH)
    assert net.table.weight.grad is None and "table.weight" in net.state_dict()
    reference = torch.nn.Embedding(ROWS, DIM)
    reference.weight.data = net.table.weight.detach().clone()
    assert torch.equal(net.table(ids), reference(ids))
    with pytest.raises(ConfigError, match="num_rows"):
        ServerEmbedding(0, 3)


def test_local_kvstore_takes_lists_of_keys_row_sparse_keys_and_an_updater():
    """MXNet's local store: lists of keys in one call (an AttributeError before), a
    clear error for a sparse value given to a dense key (a raw copy_ error before),
    row-sparse keys, and _set_updater."""
    from paratrain import kvstore

    kv = kvstore.create("local")
    kv.init(["a", "b"], [torch.zeros(2), torch.zeros(3)])
    kv.init("c", [torch.full((2,), 4.0)])                        # init(key, [value]): one value per device
    kv.push(["a", "b"], [[torch.ones(2), torch.ones(2)], torch.full((3,), 2.0)])   # a list of values is summed
    outs = [torch.empty(2), torch.empty(3), torch.empty(2)]
    kv.pull(["a", "b", "c"], out=outs)
    assert [o.tolist() for o in outs] == [[2.0, 2.0], [2.0] * 3, [4.0, 4.0]]
    with pytest.raises(ConfigError, match="sparse tensor where a dense one is expected"):
        kv.push("a", torch.ones(2).to_sparse())
    kv.init("emb", _table(), initializer={"kind": "uniform", "low": -1, "high": 1, "seed": 5})
    kv._set_updater(lambda key, pushed, stored: stored.add_(pushed.to_dense() if pushed.is_sparse else pushed,
                                                            alpha=-0.5))
    kv.push("emb", _grad([3, 3, 7], torch.ones(3, 3)))          # duplicates summed: row 3 gets 2
    rows = torch.empty(3, 3)
    kv.row_sparse_pull("emb", out=rows, row_ids=torch.tensor([7, 3, 0]))
    start = fill_rows(RowInitializer("uniform", -1, 1, seed=5), torch.empty(10, 3), 0)
    assert torch.equal(rows, start[[7, 3, 0]] - 0.5 * torch.tensor([[1.0], [2.0], [0.0]]))
    with pytest.raises(ConfigError, match="row_sparse_pull"):
        kv.pull("emb", out=torch.empty(10, 3))
