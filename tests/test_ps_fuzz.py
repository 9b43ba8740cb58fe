"""Bad input against a live parameter-server process: thousands of random and
truncated frames from peers without the job's keys (raw TCP, plain ZeroMQ, another
job's CURVE keys, a key outside the job), a wrong secret, oversized messages, and bad
requests from an authenticated worker. Afterwards the server is alive, its state is
unchanged, and a normal worker gets the exact expected values."""
from __future__ import annotations

import os
import random
import socket

import pytest
import torch
import zmq

from paratrain.comm import security
from paratrain.comm.security import JobKeys, new_secret
from paratrain.comm.transport import get_transport
from paratrain.comm.wire import tensor_bytes
from paratrain.errors import PeerError
from paratrain.kvstore.dist import DistKVStore, DistKVStoreConfig
from paratrain.ps import protocol
from paratrain.ps.protocol import Op
from ps_harness import PSJob

SHAPE = (2, 3)


def _valid_push(request_id: int = 1, key: str = "s:w", dtype=torch.float32, shape=SHAPE, length=6) -> list:
    value = torch.full(shape, -1.0).to(dtype)
    return protocol.encode(Op.PUSH, key=key, request_id=request_id, dtype=dtype, shape=shape,
                           offset=0, length=length, payload=bytes(tensor_bytes(value)))


def _junk(rng: random.Random) -> list[bytes]:
    kind = rng.randrange(4)
    frames = [bytes(memoryview(f)) for f in _valid_push(rng.randrange(1 << 32))]
    if kind == 0:      # random bytes in random frames
        return [os.urandom(rng.randrange(0, 200)) for _ in range(rng.randrange(1, 5))]
    if kind == 1:      # a valid message cut short somewhere
        flat = b"".join(frames)
        cut = rng.randrange(len(flat))
        return [flat[:cut]] if rng.random() < 0.5 else [frames[0][:rng.randrange(len(frames[0]))], frames[1]]
    if kind == 2:      # a valid header with random bytes flipped
        header = bytearray(frames[0])
        for _ in range(rng.randrange(1, 6)):
            header[rng.randrange(len(header))] = rng.randrange(256)
        return [bytes(header)] + frames[1:]
    return frames      # a well-formed push without authentication


def _dealer(context: zmq.Context, address: str, keys: JobKeys | None = None, role: str = "worker/0") -> zmq.Socket:
    """A DEALER as an attacker opens it: plain, or CURVE with ``keys``' key of ``role``."""
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        security.configure_curve_client(sock, keys.keypair(role), keys.public_key("server/0"))
    sock.connect(address)
    return sock


def _send_junk(sock, frames: list[bytes]) -> None:
    """A socket whose handshake never completes has no pipe: the send is refused at once."""
    try:
        sock.send_multipart(frames, zmq.NOBLOCK)
    except zmq.Again:
        pass


def _raw_junk(address: str, rng: random.Random, count: int) -> None:
    """``count`` random writes over raw TCP, half after a ZeroMQ greeting."""
    host, port = address[len("tcp://"):].rsplit(":", 1)
    greeting = b"\xff" + bytes(8) + b"\x7f" + bytes([3, 0]) + b"NULL".ljust(20, b"\0") + b"\0" + bytes(31)
    for index in range(count):
        try:
            with socket.create_connection((host, int(port)), timeout=2.0) as conn:
                conn.sendall((greeting if index % 2 else b"") + os.urandom(rng.randrange(1, 400)))
        except OSError:
            pass


def _pull(kv: DistKVStore) -> torch.Tensor:
    out = torch.empty(SHAPE)
    kv.pull("w", out=out)
    return out


def _authenticated_bad_requests(kv: DistKVStore) -> list[str]:
    """Send bad requests through a worker's own, authenticated connection; return
    the server's error texts."""
    bad = [
        _valid_push(key="s:unknown"),                                          # unknown key
        _valid_push(shape=(3, 2)),                                             # shape mismatch
        _valid_push(dtype=torch.float64),                                      # dtype mismatch
        _valid_push(shape=(6,), length=6),                                     # same numel, other shape
        protocol.encode(Op.PUSH, key="s:w", request_id=1, shape=SHAPE, offset=3, length=3,
                        payload=bytes(12)),                                    # wrong slice
        protocol.encode(Op.PUSH, key="s:w", request_id=1, shape=SHAPE, length=6, status=1,
                        payload=bytes(24)),                                    # compressed, no codec
        protocol.encode(Op.SET_OPTIMIZER, request_id=1, payload=b'{"type": "evil"}'),
        protocol.encode(Op.SET_OPTIMIZER, request_id=1, payload=b"\x80\x04pickle"),
        protocol.encode(Op.DATA, request_id=1),                                # a reply is no request
        [b"garbage", b"", b""],                                                # malformed
    ]
    errors = []
    for frames in bad:
        kv._connection.channel.send(0, frames)
        item = kv._connection.channel.recv(5.0)
        assert item is not None, f"no answer to {frames[:2]}"
        message = protocol.decode(item[1], max_payload_bytes=1 << 20)
        assert message.op == Op.ERROR
        errors.append(message.control()["error"])
    return errors


@pytest.mark.timeout(180)
def test_live_server_survives_bad_input_and_keeps_exact_state():
    rng = random.Random(1234)
    with PSJob(num_workers=1, num_servers=1, timeout_s=10, server_args=["--max-message-mb", "1"]) as job:
        [address] = job.start_servers()
        kv = DistKVStore(DistKVStoreConfig("dist_sync"), rank=0, num_workers=1, addresses=[address],
                         secret=job.secret, timeout_s=10)
        kv.init("w", torch.ones(SHAPE))
        kv.set_optimizer({"type": "sgd", "lr": 2.0})
        before = _pull(kv)

        context = zmq.Context()
        other = JobKeys(new_secret())
        attackers = [_dealer(context, address), _dealer(context, address, other),
                     _dealer(context, address, JobKeys(job.secret), role="worker/5")]   # a 1-worker job
        for _ in range(3000):
            _send_junk(rng.choice(attackers), _junk(rng))
        _raw_junk(address, rng, 200)
        # A key outside the job may not even queue one message: 1000 of them, all refused.
        for _ in range(1000):
            _send_junk(attackers[2], _valid_push(9))
        # Oversized, from a connection with the job's key: libzmq drops it (MAXMSGSIZE of 1 MB).
        big = get_transport("zmq").connect([address], keys=JobKeys(job.secret).ps_client(0, 1))
        big.send(0, [b"x" * (2 << 20)])
        with pytest.raises(PeerError, match="could not prove it holds this job's key"):
            DistKVStore(DistKVStoreConfig("dist_sync"), rank=0, num_workers=1, addresses=[address],
                        secret=new_secret(), timeout_s=5)

        errors = _authenticated_bad_requests(kv)
        assert any("unknown key" in e for e in errors) and any("holds torch.float32" in e for e in errors)
        assert any("evil" in e for e in errors) and any("malformed" in e for e in errors)

        after = _pull(kv)
        assert torch.equal(before, after) and torch.equal(after, torch.ones(SHAPE))
        kv.push("w", -torch.ones(SHAPE))
        assert torch.equal(_pull(kv), torch.full(SHAPE, 3.0))   # 1 - lr * (-1)
        big.close()
        for sock in attackers:
            sock.close()
        context.term()
        assert job.servers[0].poll() is None, "the server died"
        kv.close()
        assert job.wait_servers_exit() == [0]


@pytest.mark.timeout(120)
def test_server_exits_when_the_store_goes_away():
    job = PSJob(num_workers=2, num_servers=1, timeout_s=8)
    try:
        job.start_servers()
        assert job.servers[0].poll() is None
        job.store = None            # the launcher's store ends with the job
        import gc
        gc.collect()
        assert job.wait_servers_exit(timeout_s=30) == [0]
    finally:
        job.close()


def test_create_rejects_unknown_options_and_missing_servers():
    from paratrain.env import DistEnv
    from paratrain.errors import ConfigError
    from paratrain.kvstore.dist import create_dist_kvstore

    with pytest.raises(ConfigError, match="bigarray_bnd"):
        create_dist_kvstore("dist_sync", bigarray_bnd=5)
    with pytest.raises(ConfigError, match="--servers"):
        create_dist_kvstore("dist_sync", env=DistEnv(num_servers=0))
    with pytest.raises(ConfigError, match="dist_bogus"):
        create_dist_kvstore("dist_bogus")
