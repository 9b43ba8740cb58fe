"""Parameter server pieces without a network: sharding, wire format, optimizers,
policies, and a whole server driven through the in-process transport."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from paratrain.comm.wire import tensor_bytes
from paratrain.errors import ConfigError, PeerError
from paratrain.ps import protocol
from paratrain.optimizers import build_server_optimizer as build_optimizer
from paratrain.ps.optimizer import SGD, Adam
from paratrain.ps.policies import AsyncPolicy, SliceState, StalenessPolicy, SyncPolicy, build_policy
from paratrain.comm.security import new_secret
from paratrain.ps.admission import check_hello, control_change
from paratrain.ps.protocol import Op, ProtocolError, RequestRejected
from paratrain.ps.sharding import key_name, plan_key, server_for_key, split_range

# ----------------------------------------------------------------------------- sharding


def test_small_key_lives_whole_on_its_hash_server():
    plan = plan_key("weight", 6, num_servers=3)
    assert len(plan) == 1 and (plan[0].start, plan[0].stop) == (0, 6)
    assert plan[0].server == server_for_key("weight", 3)


def test_large_key_is_split_contiguously_over_all_servers():
    plan = plan_key(7, 1200 * 1200, num_servers=2)
    assert [(s.server, s.start, s.stop) for s in plan] == [(0, 0, 720000), (1, 720000, 1440000)]
    plan = plan_key(7, 10, num_servers=3, bound=5)
    assert [(s.start, s.stop) for s in plan] == [(0, 4), (4, 7), (7, 10)]


def test_bound_is_exclusive_like_mxnet():
    assert len(plan_key(1, 999_999, 2)) == 1
    assert len(plan_key(1, 1_000_000, 2)) == 2


def test_hash_is_stable_and_keys_of_different_types_differ():
    # crc32 of the names: identical in every process, unlike hash() on str.
    assert [server_for_key(k, 4) for k in ("a", "b", 0, 1)] == [server_for_key(k, 4) for k in ("a", "b", 0, 1)]
    assert key_name(1) != key_name("1")
    spread = {server_for_key(i, 4) for i in range(64)}
    assert spread == {0, 1, 2, 3}


def test_split_range_covers_everything():
    for numel in (0, 1, 5, 16, 17):
        for parts in (1, 2, 3, 5):
            ranges = split_range(numel, parts)
            assert ranges[0][0] == 0 and ranges[-1][1] == numel
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            sizes = [b - a for a, b in ranges]
            assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("bad", [dict(numel=-1, num_servers=1), dict(numel=4, num_servers=0),
                                 dict(numel=4, num_servers=1, bound=0)])
def test_plan_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        plan_key("k", **bad)


# ----------------------------------------------------------------------------- protocol


def test_round_trip_is_zero_copy_on_receive():
    value = torch.arange(12, dtype=torch.bfloat16)
    frames = protocol.encode(Op.PUSH, key="s:w", request_id=9, dtype=value.dtype, shape=(3, 4),
                             offset=0, length=12, scale=0.5, payload=tensor_bytes(value))
    message = protocol.decode(frames, max_payload_bytes=1 << 20)
    assert (message.op, message.key, message.request_id, message.shape, message.scale) == \
        (Op.PUSH, "s:w", 9, (3, 4), 0.5)
    assert torch.equal(message.tensor(), value)
    assert message.tensor().data_ptr() == memoryview(frames[2]).obj.__array_interface__["data"][0]


def _good_push() -> list:
    value = torch.ones(4)
    return protocol.encode(Op.PUSH, key="i:1", request_id=1, shape=(4,), length=4,
                           payload=tensor_bytes(value))


@pytest.mark.parametrize("mangle", [
    lambda f: f[:1],                                        # too few frames
    lambda f: f + [b"x", b"y"],                             # too many
    lambda f: [f[0][:-1]] + f[1:],                          # truncated header
    lambda f: [b"XXXX" + f[0][4:]] + f[1:],                 # bad magic
    lambda f: [f[0][:5] + b"\x63" + f[0][6:]] + f[1:],      # unknown op
    lambda f: [f[0][:6] + b"\x63" + f[0][7:]] + f[1:],      # unknown dtype
    lambda f: [f[0][:7] + b"\x09" + f[0][8:]] + f[1:],      # ndim > 8
    lambda f: f[:2] + [bytes(f[2])[:-1]],                   # truncated payload
    lambda f: [f[0], b"\xff\xfe"] + f[2:],                  # key not utf-8
    lambda f: [f[0], b"k" * 300] + f[2:],                   # key too long
])
def test_malformed_messages_are_rejected(mangle):
    frames = [bytes(memoryview(f)) for f in _good_push()]
    with pytest.raises(ProtocolError):
        protocol.decode(mangle(frames), max_payload_bytes=1 << 20)


def test_oversized_payload_is_rejected():
    with pytest.raises(ProtocolError, match="exceeds"):
        protocol.decode(_good_push(), max_payload_bytes=8)


def test_a_hello_speaks_for_the_rank_its_key_proved():
    hello = {"rank": 1, "num_workers": 2, "mode": "dist_sync", "staleness": 0}
    rank, terms = check_hello(hello, None, proved_rank=1, job_workers=2)
    assert rank == 1 and terms.num_workers == 2
    with pytest.raises(RequestRejected, match="hello says rank 1, but the peer's key is worker 0's"):
        check_hello(hello, None, proved_rank=0)
    with pytest.raises(RequestRejected, match="differs from the 3 workers this server was started for"):
        check_hello(hello, None, proved_rank=1, job_workers=3)


def test_control_changes_only_from_worker_0_before_training_or_unchanged():
    sgd, fast = {"type": "sgd", "lr": 0.1}, {"type": "sgd", "lr": 1000.0}
    change = control_change
    assert change("SET_OPTIMIZER", rank=0, current=None, requested=sgd, fixed=False, started=False)
    assert not change("SET_OPTIMIZER", rank=3, current=sgd, requested=sgd, fixed=True, started=True)
    for rank, fixed, started, fragment in ((0, True, False, "the job's configuration fixes it"),
                                           (1, False, False, "from worker 1 refused: only worker 0"),
                                           (0, False, True, "pushes were applied already")):
        with pytest.raises(RequestRejected, match=fragment):
            change("SET_OPTIMIZER", rank=rank, current=sgd, requested=fast, fixed=fixed, started=started)
    # A job that does not lock its control (a library job, as MXNet's KVStore) lets worker 0
    # change it after pushes, and the server says so; paratrain train locks it.
    assert change("SET_OPTIMIZER", rank=0, current=sgd, requested=fast, fixed=False, started=True, locked=False)
    with pytest.raises(RequestRejected, match="only worker 0"):
        change("SET_OPTIMIZER", rank=1, current=sgd, requested=fast, fixed=False, started=True, locked=False)


# ----------------------------------------------------------------------------- optimizers


@pytest.mark.parametrize("server, make_torch", [
    (SGD(lr=0.1, momentum=0.9, weight_decay=0.01), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9,
                                                                              weight_decay=0.01)),
    (Adam(lr=0.01, weight_decay=0.001), lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.001)),
])
def test_server_optimizers_match_torch(server, make_torch):
    torch.manual_seed(0)
    weight = torch.randn(50)
    reference = torch.nn.Parameter(weight.clone())
    optimizer, state = make_torch([reference]), {}
    for _ in range(5):
        grad = torch.randn(50)
        reference.grad = grad.clone()
        optimizer.step()
        server.update(weight, grad, state)
    torch.testing.assert_close(weight, reference.detach(), rtol=1e-6, atol=1e-6)


def test_optimizer_specs_are_validated():
    assert isinstance(build_optimizer({"type": "adam", "betas": (0.8, 0.9)}), Adam)
    with pytest.raises(ConfigError, match="unknown option"):
        build_optimizer({"type": "sgd", "lr": 0.1, "momentun": 0.9})
    with pytest.raises(ConfigError, match="lr=-1"):
        build_optimizer({"type": "sgd", "lr": -1})
    with pytest.raises(ConfigError, match="rmsprop"):
        build_optimizer({"type": "rmsprop"})


# ----------------------------------------------------------------------------- policies


def _state(workers: int) -> SliceState:
    return SliceState(value=torch.zeros(3), full_shape=(3,), offset=0, num_workers=workers)


def test_sync_sums_in_rank_order_whatever_the_arrival():
    applied = []
    state, policy = _state(3), SyncPolicy()
    for rank in (2, 0):
        policy.on_push(state, rank, torch.full((3,), float(rank + 1)), 1.0, lambda s, g, k: applied.append(g * k))
    assert applied == [] and policy.blocking_workers(state, 0) == [1]
    policy.on_push(state, 1, torch.full((3,), 2.0), 1.0, lambda s, g, k: applied.append(g * k))
    assert len(applied) == 1 and torch.equal(applied[0], torch.full((3,), 6.0))
    assert policy.blocking_workers(state, 0) == []


def test_sync_round_with_different_scales_scales_each_push():
    applied = []
    state, policy = _state(2), SyncPolicy()
    policy.on_push(state, 1, torch.full((3,), 4.0), 0.25, lambda s, g, k: applied.append(g * k))
    policy.on_push(state, 0, torch.full((3,), 2.0), 0.5, lambda s, g, k: applied.append(g * k))
    assert torch.equal(applied[0], torch.full((3,), 2.0))


def test_async_never_blocks_and_ssp_blocks_beyond_staleness():
    state = _state(2)
    async_policy, ssp = AsyncPolicy(), StalenessPolicy(2)
    for _ in range(3):
        async_policy.on_push(state, 0, torch.zeros(3), 1.0, lambda s, g, k: None)
    assert async_policy.blocking_workers(state, 0) == []
    assert ssp.blocking_workers(state, 0) == [1]          # 3 pushes vs 0: 3 > 2 ahead
    ssp.on_push(state, 1, torch.zeros(3), 1.0, lambda s, g, k: None)
    assert ssp.blocking_workers(state, 0) == []            # 3 vs 1: exactly 2 ahead
    with pytest.raises(ConfigError):
        build_policy("dist_ssp", staleness=-1)
    with pytest.raises(ConfigError):
        build_policy("dist_bogus")


# ----------------------------------------------------------------------------- whole server in-process


def _in_threads(fns):
    results, errors = [None] * len(fns), []

    def run(i):
        try:
            results[i] = fns[i]()
        except BaseException as exc:  # surfaced below
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    if errors:
        raise errors[0]
    return results


@pytest.mark.timeout(60)
def test_inproc_sync_single_worker_split_key(job):
    j = job(num_servers=3)
    kv = j.worker(0, 1, bigarray_bound=10)
    kv.init("w", torch.zeros(5, 4))
    kv.push("w", [torch.ones(5, 4), 2 * torch.ones(5, 4)])
    out = torch.empty(5, 4)
    kv.pull("w", out=out)
    assert torch.equal(out, torch.full((5, 4), 3.0))
    assert all(s.stats["pushes"] == 1 for s in j.servers)  # 20 elements over 3 servers
    value = torch.arange(20.0).reshape(5, 4)
    kv.pushpull("w", value)                                   # out defaults to the value
    assert torch.equal(value, torch.arange(20.0).reshape(5, 4))
    kv.pushpull("w", 2 * value, out=out)
    assert torch.equal(out, 2 * value)
    kv.close()


@pytest.mark.timeout(60)
def test_inproc_two_workers_with_server_sgd(job):
    j = job(num_servers=2)

    def work(rank):
        kv = j.worker(rank, 2)
        kv.init(3, torch.full((4,), 10.0 * (rank + 1)))   # rank 0's value wins
        kv.set_optimizer({"type": "sgd", "lr": 0.5})
        out = torch.empty(4)
        for _ in range(3):
            kv.push(3, torch.ones(4) * (rank + 1))
            kv.pull(3, out=out)
        kv.close()
        return out
    outs = _in_threads([lambda: work(0), lambda: work(1)])
    for out in outs:
        assert torch.equal(out, torch.full((4,), 10.0 - 3 * 0.5 * 3))


@pytest.mark.timeout(60)
def test_inproc_bad_requests_get_clear_errors(job):
    j = job(num_servers=1)
    kv = j.worker(0, 1, mode="dist_async")
    kv.init("k", torch.zeros(3))
    with pytest.raises(ConfigError, match="set_optimizer"):
        kv.push("k", torch.ones(3))
    with pytest.raises(ConfigError, match="shape"):
        kv.push("k", torch.ones(4))
    with pytest.raises(ConfigError, match="not initialized"):
        kv.pull("nope", out=torch.empty(3))
    with pytest.raises(ConfigError, match="already initialized"):
        kv.init("k", torch.zeros(3))
    with pytest.raises(PeerError, match="could not prove it holds this job's key .* another job secret"):
        j.worker(0, 1, mode="dist_async", secret=new_secret())
    kv.close()


@pytest.mark.timeout(60)
def test_inproc_compressed_pushes_decode_on_the_server(job):
    j = job(num_servers=2, locked=True)   # as paratrain train runs its servers
    kv = j.worker(0, 1, bigarray_bound=8)
    kv.init("g", torch.zeros(20))
    kv.set_gradient_compression({"type": "2bit", "threshold": 0.5})
    grad = torch.linspace(-1, 1, 20)
    out = torch.empty(20)
    kv.pushpull("g", grad, out=out)
    expected = torch.where(grad >= 0.5, 0.5, torch.where(grad <= -0.5, -0.5, 0.0))
    assert torch.equal(out, expected)
    with pytest.raises(PeerError, match="a running job's SET_COMPRESSION never changes"):
        kv.set_gradient_compression("fp16")   # pushes were applied: the job's codec is fixed
    with pytest.raises(ConfigError):
        kv.set_gradient_compression("powersgd")
    kv.close()
    kv = job(num_servers=2).worker(0, 1, bigarray_bound=8)
    kv.init("g", torch.zeros(20))
    kv.set_gradient_compression("fp16")
    kv.pushpull("g", grad, out=out)
    assert torch.equal(out, grad.half().float())
    kv.close()
    kv = job(num_servers=2).worker(0, 1, bigarray_bound=8)
    kv.init("g", torch.zeros(20))
    kv.set_gradient_compression("2bit")   # scaled: each slice's scales travel with it
    kv.pushpull("g", grad, out=out)
    states = kv._keys["g"].codec_states
    assert len(states) == 2                # two slices, one residual each
    residual = torch.cat([states[start].residual for start in sorted(states)])
    assert torch.allclose(out + residual, grad, atol=1e-6) and (out != 0).sum() >= 10
    for unsupported in ("powersgd", "quant"):
        with pytest.raises(ConfigError):
            kv.set_gradient_compression(unsupported)
    kv.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("update_on_kvstore", [True, False], ids=["server_update", "local_update"])
def test_parameter_server_sync_matches_local_training(job, update_on_kvstore):
    from paratrain.train.trainer import Trainer

    def run(kvstore):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        trainer = Trainer(model, "sgd", {"lr": 0.1, "momentum": 0.9}, kvstore=kvstore,
                          update_on_kvstore=update_on_kvstore if kvstore != "local" else None)
        for step in range(4):
            batch = 5 + step  # a changing batch size: the rescale must follow it
            x = torch.randn(batch, 6, generator=torch.Generator().manual_seed(step))
            y = torch.arange(batch) % 3
            torch.nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
            trainer.step(batch)
        trainer.close()
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    j = job(num_servers=2)
    on_servers = run(j.worker(0, 1, bigarray_bound=20))
    torch.testing.assert_close(on_servers, run("local"), rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(60)
def test_deferred_pushes_wait_for_the_commit_and_its_scale(job):
    """Pushes sent before the scale is known (backward hooks) are applied only at
    kv.commit(scale), with that scale; until then the worker may only push more."""
    j = job(num_servers=2)

    def work(rank):
        kv = j.worker(rank, 2, bigarray_bound=4)   # "w" is split over both servers
        kv.init("w", torch.zeros(6))
        kv.init("b", torch.zeros(2))
        kv.set_optimizer({"type": "sgd", "lr": 1.0})
        w, b = torch.empty(6), torch.empty(2)
        handles = [kv.pushpull("w", torch.full((6,), rank + 1.0), out=w, block=False, defer_scale=True),
                   kv.pushpull("b", torch.ones(2), out=b, block=False, defer_scale=True)]
        with pytest.raises(ConfigError, match="commit"):
            kv.pull("w", out=w)
        with pytest.raises(ConfigError, match="commit"):
            kv.push("b", torch.ones(2))
        with pytest.raises(ConfigError, match="commit"):
            handles[0].wait(5)
        kv.commit(0.5).wait(30)
        for handle in handles:
            handle.wait(30)
        kv.close()
        return w, b
    for w, b in _in_threads([lambda: work(0), lambda: work(1)]):
        assert torch.equal(w, torch.full((6,), -1.5))   # -(1 + 2) * 0.5
        assert torch.equal(b, torch.full((2,), -1.0))


@pytest.mark.timeout(60)
def test_server_refuses_other_requests_while_pushes_wait_and_a_wrong_commit(job):
    j = job(num_servers=1)
    kv = j.worker(0, 1)
    kv.init("k", torch.zeros(3))
    server = j.servers[0]
    kv.pushpull("k", torch.ones(3), out=torch.empty(3), block=False, defer_scale=True)
    # Bypass the client's own check: a PULL while a push waits is refused by the server.
    kv._deferred.clear()
    with pytest.raises(PeerError, match="wait for their COMMIT"):
        kv.pull("k", out=torch.empty(3))
    # A commit that counts the held pushes wrong applies none of them.
    request = kv._connection.request(0, Op.COMMIT, scale=1.0, clock=2)
    with pytest.raises(PeerError, match="none applied"):
        kv._collect([request], "commit")
    assert server.stats["pushes"] == 0 and not server.deferred
    out = torch.empty(3)
    kv.pushpull("k", torch.full((3,), 2.0), out=out)      # the server still works
    assert torch.equal(out, torch.full((3,), 2.0))
    kv.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fixed_by_the_job", [True, False])
def test_async_rank_0_killed_before_its_set_optimizer_rejoins_and_training_goes_on(job, fixed_by_the_job):
    """Issue 14 finding 3: rank 0 dies after its init, before its SET_OPTIMIZER; rank 1
    waits at the set_optimizer barrier. The restarted rank 0 rejoins (it skips that
    barrier): the barrier lets rank 1 go once the servers run an optimizer (the job's
    configuration fixes it, or the rejoined rank 0 sends it), and both ranks' pushes
    are applied."""
    sgd = {"type": "sgd", "lr": 0.5}
    j = job(num_servers=1, timeout_s=8.0, **({"optimizer": sgd} if fixed_by_the_job else {}))
    first = j.worker(0, 2, mode="dist_async")
    first.init("k", torch.zeros(4))
    first._connection.close()   # killed: no goodbye, no set_optimizer

    def rank_1():
        kv = j.worker(1, 2, mode="dist_async")
        kv.init("k", torch.zeros(4))
        kv.set_optimizer(sgd)   # waits at the barrier for rank 0
        kv.push("k", torch.ones(4))
        kv.close()

    def rank_0_again():
        time.sleep(0.5)   # rank 1 is at its barrier by now
        kv = j.worker(0, 2, mode="dist_async", rejoin=True)
        kv.init("k", torch.zeros(4))   # a rejoining rank 0 keeps the value the servers hold
        kv.set_optimizer(sgd)
        kv.push("k", torch.ones(4))
        kv.close()
    _in_threads([rank_1, rank_0_again])
    server = j.servers[0]
    assert server.stats["pushes"] == 2 and server.stats["rejoins"] == 1
    (state,) = server.keys.values()
    assert torch.equal(state.value, torch.full((4,), -1.0))   # two pushes of ones at lr 0.5


def test_a_timeout_names_who_was_waited_for_never_none_seconds():
    """Issue 14 finding 6: a wait without its own limit read "timed out after Nones"."""
    from paratrain.errors import CommTimeout
    from paratrain.kvstore.base import Handle

    def named(timeout):
        raise CommTimeout("no reply from parameter server 0 (tcp://127.0.0.1:5) within 70s")

    def bare(timeout):
        raise TimeoutError("socket")
    with pytest.raises(CommTimeout) as caught:
        Handle(named, "push of key 'w'").wait(None)
    assert str(caught.value) == "no reply from parameter server 0 (tcp://127.0.0.1:5) within 70s"
    with pytest.raises(CommTimeout, match=r"^timed out after the default limit waiting for pull of key 'w': socket$"):
        Handle(bare, "pull of key 'w'").wait(None)
    with pytest.raises(CommTimeout, match=r"^timed out after 2.5s waiting"):
        Handle(bare, "pull of key 'w'").wait(2.5)


def test_server_adamw_matches_torch_adamw_bitwise():
    from paratrain.ps.optimizer import AdamW
    torch.manual_seed(0)
    start = torch.randn(10)
    reference, mine, state = torch.nn.Parameter(start.clone()), start.clone(), {}
    optimizer = torch.optim.AdamW([reference], lr=0.01, weight_decay=0.1)
    rule = AdamW(lr=0.01, weight_decay=0.1)
    for _ in range(5):
        grad = torch.randn(10)
        reference.grad = grad.clone()
        optimizer.step()
        rule.update(mine, grad, state)
    assert torch.equal(reference.detach(), mine)
