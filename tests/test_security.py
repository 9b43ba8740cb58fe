"""CURVE authentication of the ZeroMQ links: key derivation and the secret file as
pure functions; then real sockets on loopback. Unauthenticated peers get nothing
queued, a server at a rewritten address is refused by the client, the sender's role
comes from its key, memory stays flat under a flood before authentication, and
the bytes on the wire do not hold the plaintext."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import zmq

from paratrain.comm import security
from paratrain.comm.security import JobKeys, KeyPair, hkdf_sha256, new_secret, read_secret_file
from paratrain.comm.transport import get_transport
from paratrain.env import ALLOCATOR_ENV
from paratrain.errors import CommTimeout, ConfigError, PeerError
from paratrain.parallel import p2p

SCRIPTS = Path(__file__).resolve().parent / "scripts"
REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20


# -- pure functions ------------------------------------------------------------------------

def test_hkdf_matches_rfc5869():
    # RFC 5869, test cases 1 and 3.
    okm = hkdf_sha256(bytes([0x0B] * 22), salt=bytes(range(13)), info=bytes(range(0xF0, 0xFA)), length=42)
    assert okm.hex() == ("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"
                         "34007208d5b887185865")
    okm = hkdf_sha256(bytes([0x0B] * 22), salt=b"", info=b"", length=42)
    assert okm.hex() == ("8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d"
                         "9d201395faa4b61a96c8")


def test_keys_are_deterministic_and_differ_by_role_and_secret():
    secret = new_secret()
    a, b, other = JobKeys(secret), JobKeys(secret), JobKeys(new_secret())
    roles = ["server/0", "server/1", "worker/0", "worker/1", "worker/10"]
    assert [a.keypair(r) for r in roles] == [b.keypair(r) for r in roles]
    assert len({a.public_key(r) for r in roles}) == len(roles)
    assert not {a.public_key(r) for r in roles} & {other.public_key(r) for r in roles}
    pair = a.keypair("worker/3")
    assert len(pair.secret_key) == len(pair.public_key) == 40
    assert zmq.curve_public(pair.secret_key) == pair.public_key
    assert pair.secret_key.decode() not in repr(pair) and secret not in repr(a)
    assert a.ps_server(1, 3).allowed == {f"worker/{r}": a.public_key(f"worker/{r}") for r in range(3)}
    assert a.ps_client(2, 2).server_public_keys == (a.public_key("server/0"), a.public_key("server/1"))


def test_a_process_share_acts_as_its_own_role_only():
    job = JobKeys(new_secret())
    share = job.share("worker/1", num_workers=2, num_servers=2)
    again = security.ProcessKeys.from_text(share.to_text())
    assert again.ps_client(1, 2) == job.ps_client(1, 2)
    assert again.public_key("worker/0") == job.public_key("worker/0")
    assert job.keypair("worker/1").secret_key.decode() not in repr(again)
    with pytest.raises(ConfigError, match="holds the secret key of 'worker/1' only, not of 'server/0'"):
        again.ps_server(0, 2)
    with pytest.raises(ConfigError, match="holds the secret key of 'worker/1' only, not of 'worker/0'"):
        again.ps_client(0, 2)
    forged = json.loads(share.to_text())
    forged["public_keys"]["worker/1"] = job.public_key("worker/0").decode()
    with pytest.raises(ConfigError, match="the public key does not match the secret key"):
        security.ProcessKeys.from_text(json.dumps(forged))
    with pytest.raises(ConfigError, match="process keys are not valid"):
        security.ProcessKeys.from_text('{"role": "worker/1", "secret_key": "short", "public_keys": {}}')


def test_worker_rank_reads_only_well_formed_roles():
    assert [security.worker_rank(r) for r in ("worker/0", "worker/17")] == [0, 17]
    assert [security.worker_rank(r) for r in (None, "", "server/0", "worker/", "worker/-1", "worker/01",
                                               "worker/1x")] == [None] * 7


def test_short_secret_is_refused():
    with pytest.raises(ConfigError, match="holds 16 bytes; a job secret needs at least 32"):
        JobKeys("0123456789abcdef")


def test_job_secret_comes_from_the_file_the_user_or_this_machine(tmp_path):
    path = tmp_path / "job.secret"
    path.write_text("f" * 64)
    path.chmod(0o600)
    resolve = security.resolve_job_secret
    assert resolve(secret_file=str(path), env_secret="e" * 64, nnodes=2) == "f" * 64
    assert resolve(secret_file=None, env_secret="e" * 64, nnodes=2) == "e" * 64
    fresh = {resolve(secret_file=None, env_secret="", nnodes=1) for _ in range(2)}
    assert len(fresh) == 2 and all(len(secret) == 64 for secret in fresh)
    with pytest.raises(ConfigError, match="nnodes=2: every node needs the same job secret"):
        resolve(secret_file=None, env_secret="", nnodes=2)
    with pytest.raises(ConfigError, match="PARATRAIN_SECRET holds 5 bytes"):
        resolve(secret_file=None, env_secret="short", nnodes=1)


def test_secret_file_permissions(tmp_path):
    path = tmp_path / "job.secret"
    secret = new_secret()
    path.write_text(secret + "\n")
    path.chmod(0o600)
    assert read_secret_file(str(path)) == secret
    path.chmod(0o400)
    assert read_secret_file(str(path)) == secret
    for mode in (0o640, 0o604, 0o660, 0o644):
        path.chmod(mode)
        with pytest.raises(ConfigError, match=rf"^--secret-file {path}: mode 0{mode:o} lets other users read or "
                                              rf"write it; run chmod 600 {path}$"):
            read_secret_file(str(path))
    path.chmod(0o600)
    path.write_text("short\n")
    with pytest.raises(ConfigError, match=rf"--secret-file {path} holds 5 bytes"):
        read_secret_file(str(path))
    path.write_bytes(os.urandom(31) + b"\xff")
    with pytest.raises(ConfigError, match=rf"--secret-file {path}: not text; write the secret as hex"):
        read_secret_file(str(path))
    with pytest.raises(ConfigError, match=rf"--secret-file {tmp_path}: not a regular file"):
        read_secret_file(str(tmp_path))
    with pytest.raises(ConfigError, match=r"--secret-file .*missing: cannot be read \(No such file"):
        read_secret_file(str(tmp_path / "missing"))


# -- helpers for the socket tests ----------------------------------------------------------------

ZMQ = get_transport("zmq")


def _listen(keys, max_message_bytes: int = 8 * MiB):
    return ZMQ.listen("127.0.0.1", max_message_bytes=max_message_bytes, keys=keys)


def _dealer(context: zmq.Context, address: str, identity: KeyPair | None = None, server_key: bytes | None = None,
            routing_id: bytes | None = None) -> zmq.Socket:
    """A bare DEALER, as an attacker (or a hand-made client) would open it."""
    sock = context.socket(zmq.DEALER)
    sock.linger = 0
    if routing_id is not None:
        sock.setsockopt(zmq.ROUTING_ID, routing_id)
    if identity is not None:
        security.configure_curve_client(sock, identity, server_key)
    sock.connect(address)
    return sock


def _until(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def context():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


# -- authentication ------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_unauthenticated_peers_get_nothing_queued(context, caplog):
    caplog.set_level(logging.WARNING, logger="paratrain.comm.security")
    job, other = JobKeys(new_secret()), JobKeys(new_secret())
    channel = _listen(job.ps_server(0, 2))
    server_key = job.public_key("server/0")
    try:
        attackers = [
            _dealer(context, channel.address),                                                 # plain ZeroMQ
            _dealer(context, channel.address, other.keypair("worker/0"), other.public_key("server/0")),  # other job
            _dealer(context, channel.address, job.keypair("worker/2"), server_key),             # rank 2 of 2 workers
            # worker/0's public key, without worker/0's secret key
            _dealer(context, channel.address, KeyPair("worker/0", job.public_key("worker/0"),
                                                      job.keypair("worker/1").secret_key), server_key),
        ]
        for sock in attackers:
            for _ in range(20):
                sock.send(b"attack", zmq.NOBLOCK)
        assert channel.recv(1.5) is None
        assert _until(lambda: channel.zap.denied >= 1 and channel.zap.failed_handshakes >= 3, 10.0), (
            channel.zap.denied, channel.zap.failed_handshakes)
        assert channel.zap.accepted == 0 and channel.unattributed == 0
        assert "refused a CURVE client from 127.0.0.1" in caplog.text
        assert "failed the CURVE handshake" in caplog.text
        # A worker of the job is heard at once, and its message is the first the server sees.
        client = ZMQ.connect([channel.address], keys=job.ps_client(1, 1))
        client.send(0, [b"hello"])
        peer, frames = channel.recv(5.0)
        assert [bytes(f) for f in frames] == [b"hello"] and channel.peer_role(peer) == "worker/1"
        assert channel.recv(0.3) is None
        client.close()
    finally:
        channel.close()


def _silent_listener() -> socket.socket:
    """Accepts TCP connections and never says a word."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    return listener


@pytest.mark.timeout(60)
def test_client_refuses_a_server_at_a_rewritten_address(context):
    job, other = JobKeys(new_secret()), JobKeys(new_secret())
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, use_libuv=True)
    real = _listen(job.ps_server(0, 1))
    fake_curve, fake_plain, silent = _listen(other.ps_server(0, 1)), _listen(None), _silent_listener()
    refused = "parameter server 0 at {} could not prove it holds this job's key"
    silent_address = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
    fakes = {fake_curve.address: refused, fake_plain.address: refused,
             silent_address: "no CURVE handshake with parameter server 0 at {} within 2.0s"}
    try:
        for fake, error in fakes.items():
            store.set("ps/server/0", fake)   # the attack: any process that reaches the store can do it
            address = store.get("ps/server/0").decode()
            started = time.monotonic()
            with pytest.raises(PeerError, match=error.format(address)):
                ZMQ.connect([address], keys=job.ps_client(0, 1), handshake_timeout_s=2.0)
            assert time.monotonic() - started < 4.0
        # A client that sends at once: its message waits for a handshake that never comes.
        for fake in (fake_curve, fake_plain):
            eager = _dealer(context, fake.address, job.keypair("worker/0"), job.public_key("server/0"))
            eager.send(b"gradient")
            assert fake.recv(1.0) is None
            eager.close()
        store.set("ps/server/0", real.address)
        client = ZMQ.connect([store.get("ps/server/0").decode()], keys=job.ps_client(0, 1), handshake_timeout_s=5.0)
        client.send(0, [b"ok"])
        assert real.recv(5.0) is not None
        client.close()
    finally:
        for channel in (real, fake_curve, fake_plain):
            channel.close()
        silent.close()


@pytest.mark.timeout(30)
def test_sender_role_comes_from_its_key(context):
    job = JobKeys(new_secret())
    channel = _listen(job.ps_server(0, 2))
    server_key = job.public_key("server/0")
    # worker/1 holds only its share of the keys, as a launcher may hand it out.
    share = job.share("worker/1", num_workers=2, num_servers=1)
    workers = [ZMQ.connect([channel.address], keys=keyring.ps_client(rank, 1))
               for rank, keyring in ((0, job), (1, share))]
    try:
        workers[1].send(0, [b"I am worker/0"])   # what a message says proves nothing
        workers[0].send(0, [b"hello"])
        seen = {}
        for _ in range(2):
            peer, frames = channel.recv(5.0)
            seen[bytes(frames[0])] = channel.peer_role(peer)
            channel.send(peer, [f"to {channel.peer_role(peer)}".encode()])
        assert seen == {b"I am worker/0": "worker/1", b"hello": "worker/0"}
        assert [bytes(workers[r].recv(5.0)[1][0]) for r in (0, 1)] == [b"to worker/0", b"to worker/1"]
        # A routing id does not carry a role over to the next connection that uses it.
        peers = []
        for rank in (1, 0):
            sock = _dealer(context, channel.address, job.keypair(f"worker/{rank}"), server_key, routing_id=b"R")
            sock.send(f"from {rank}".encode())
            peer, frames = channel.recv(5.0)
            assert bytes(frames[0]) == f"from {rank}".encode() and channel.peer_role(peer) == f"worker/{rank}"
            peers.append(peer)
            sock.close()
            time.sleep(0.3)   # the server notices the disconnect before the id is used again
        assert peers[0] != peers[1]
        # worker/1's secret key cannot stand behind worker/0's public key.
        liar = _dealer(context, channel.address, KeyPair("worker/0", job.public_key("worker/0"),
                                                         job.keypair("worker/1").secret_key), server_key)
        liar.send(b"as worker/0")
        assert channel.recv(1.0) is None
    finally:
        for worker in workers:
            worker.close()
        channel.close()


# -- memory before authentication -----------------------------------------------------------------

def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


class _SinkServer:
    """tests/scripts/zmq_sink_server.py as a process of its own, stopped by PID."""

    def __init__(self, *flags: str, secret: str):
        env = dict(os.environ, PARATRAIN_SECRET=secret, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **ALLOCATOR_ENV)
        self.proc = subprocess.Popen([sys.executable, str(SCRIPTS / "zmq_sink_server.py"), *flags],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        info = json.loads(self.proc.stdout.readline())
        self.pid, self.address = info["pid"], info["address"]

    def report(self) -> dict:
        self.proc.stdin.close()
        report = json.loads(self.proc.stdout.readline())
        self.proc.wait(timeout=10)
        return report

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def _greeting(mechanism: bytes) -> bytes:
    """A ZMTP 3.0 greeting (64 bytes)."""
    return b"\xff" + bytes(8) + b"\x7f" + bytes([3, 0]) + mechanism.ljust(20, b"\0") + b"\0" + bytes(31)


def _raw_flood(address: str, mechanism: bytes, sizes: list[int], deadline: float) -> None:
    """Send one long frame of each size over raw TCP after a greeting, reconnecting
    whenever the server hangs up, until done or ``deadline``."""
    host, port = address[len("tcp://"):].rsplit(":", 1)
    chunk = bytes(MiB)
    conn = None
    for size in sizes:
        if time.monotonic() > deadline:
            break
        try:
            if conn is None:
                conn = socket.create_connection((host, int(port)), timeout=2.0)
                conn.sendall(_greeting(mechanism))
            conn.sendall(b"\x02" + struct.pack(">Q", size))
            for _ in range(size // MiB):
                conn.sendall(chunk)
        except OSError:
            if conn is not None:
                conn.close()
            conn = None
    if conn is not None:
        conn.close()


def _flood(address: str, job: JobKeys, other: JobKeys, context: zmq.Context, seconds: float) -> None:
    """8 unauthenticated sockets, each sending 300 x 1 MiB and 4 x 256 MiB."""
    sizes = [MiB] * 300 + [256 * MiB] * 4
    small, big = bytes(MiB), bytes(256 * MiB)
    server_key = job.public_key("server/0")
    zmq_attackers = [_dealer(context, address) for _ in range(2)] + [
        _dealer(context, address, other.keypair(f"worker/{r}"), other.public_key("server/0")) for r in range(2)] + [
        _dealer(context, address, job.keypair(f"worker/{r}"), server_key) for r in (7, 8)]   # 2-worker job
    for sock in zmq_attackers:
        for size in sizes:
            try:
                sock.send(small if size == MiB else big, zmq.NOBLOCK, copy=False)
            except zmq.Again:   # no pipe while libzmq reconnects after a refused handshake
                pass
    deadline = time.monotonic() + seconds
    raw = [threading.Thread(target=_raw_flood, args=(address, mechanism, sizes, deadline), daemon=True)
           for mechanism in (b"NULL", b"CURVE")]
    for thread in raw:
        thread.start()
    for thread in raw:
        thread.join(seconds + 5)
    time.sleep(max(0.0, deadline - time.monotonic()))
    for sock in zmq_attackers:
        sock.close(linger=0)


def _peak_rss_during(pid: int, attack) -> float:
    peak, done = [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mib(pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        attack()
    finally:
        done.set()
        sampler.join(5)
    return max(peak[0], _rss_mib(pid))


@pytest.mark.timeout(120)
def test_unkeyed_server_queues_a_flood_control(context):
    """The measurement can fail: a server without keys that does not read holds
    what one plain socket sends it."""
    server = _SinkServer("--no-read", "--max-message-mb", "8", secret=new_secret())
    try:
        before = _rss_mib(server.pid)
        sock = _dealer(context, server.address)
        payload = bytes(MiB)
        for _ in range(200):
            sock.send(payload, copy=False)
        assert _until(lambda: _rss_mib(server.pid) - before > 150, 20.0), _rss_mib(server.pid) - before
        sock.close(linger=0)
        server.report()
    finally:
        server.kill()


@contextlib.contextmanager
def _keyed_sink(*flags: str):
    """A keyed sink server of a 2-worker job whose largest message is 8 MiB, its
    job's keys and another job's."""
    secret = new_secret()
    server = _SinkServer("--keyed", "--max-message-mb", "8", *flags, secret=secret)
    try:
        yield server, JobKeys(secret), JobKeys(new_secret())
    finally:
        server.kill()


@pytest.mark.timeout(120)
def test_memory_is_bounded_before_authentication(context):
    with _keyed_sink("--no-read") as (server, job, other):   # --no-read: whatever libzmq queued would stay
        time.sleep(0.5)
        before = _rss_mib(server.pid)
        peak = _peak_rss_during(server.pid, lambda: _flood(server.address, job, other, context, seconds=6.0))
        # Raw peers get one incomplete handshake frame (<= 1 MiB here) buffered at a time.
        assert peak - before < 32, f"server RSS grew from {before:.0f} to {peak:.0f} MiB"
        report = server.report()
        assert report["denied"] >= 2 and report["failed_handshakes"] >= 4, report


@pytest.mark.timeout(60)
def test_a_reading_server_sees_nothing_from_a_flood(context):
    with _keyed_sink() as (server, job, other):
        _flood(server.address, job, other, context, seconds=3.0)
        client = ZMQ.connect([server.address], keys=job.ps_client(1, 1))
        client.send(0, [b"hello"])
        time.sleep(0.5)
        client.close()
        report = server.report()
        assert report["received"] == 1 and report["roles"] == ["worker/1"] and report["unattributed"] == 0


# -- encryption ----------------------------------------------------------------------------

class _TapProxy:
    """A TCP proxy on loopback that keeps a copy of every byte it forwards."""

    def __init__(self, upstream: str):
        host, port = upstream[len("tcp://"):].rsplit(":", 1)
        self._upstream = (host, int(port))
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(4)
        self._listener.settimeout(10.0)
        self.address = f"tcp://127.0.0.1:{self._listener.getsockname()[1]}"
        self.captured = bytearray()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except OSError:
            return
        server = socket.create_connection(self._upstream, timeout=10.0)
        for source, sink in ((client, server), (server, client)):
            threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(1 << 16):
                with self._lock:
                    self.captured += data
                sink.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self._listener.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("keyed", [True, False], ids=["curve", "plain-control"])
def test_traffic_on_the_wire_is_encrypted(keyed):
    job = JobKeys(new_secret())
    channel = _listen(job.ps_server(0, 1) if keyed else None)
    proxy = _TapProxy(channel.address)
    marker = b"PLAINTEXT-GRADIENT-"
    payload = marker * 8192   # 152 KiB: sent without a copy, as a tensor would be
    client = ZMQ.connect([proxy.address], keys=job.ps_client(0, 1) if keyed else None)
    try:
        client.send(0, [b"small " + marker, payload])
        peer, frames = channel.recv(10.0)
        assert bytes(frames[1]) == payload
        channel.send(peer, [b"reply " + marker, payload])
        assert bytes(client.recv(10.0)[1][1]) == payload
        time.sleep(0.2)
        with proxy._lock:
            wire = bytes(proxy.captured)
        assert len(wire) > 2 * len(payload)
        assert (marker in wire) is (not keyed)
    finally:
        client.close()
        channel.close()
        proxy.close()


# -- pipeline links ------------------------------------------------------------------------

def _open_pair(keys_by_rank: dict, timeout_s: float = 10.0, rewrite: str | None = None):
    master = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, use_libuv=True)
    stores = {0: master, 1: dist.TCPStore("127.0.0.1", master.port, is_master=False, use_libuv=True)}
    ends, errors = {}, {}

    def open_end(rank, peer):
        try:
            ends[rank] = p2p.open_channel("zmq", stores[rank], "link", rank=rank, peer=peer, timeout_s=timeout_s,
                                          keys=keys_by_rank[rank])
        except Exception as exc:   # reported to the test below
            errors[rank] = exc

    if rewrite is not None:
        master.set("link", rewrite)
    else:
        binder = threading.Thread(target=open_end, args=(0, 1))
        binder.start()
    open_end(1, 0)
    if rewrite is None:
        binder.join(timeout_s + 5)
    return ends, errors


@pytest.mark.timeout(30)
def test_keyed_pipeline_link_carries_tensors():
    job = JobKeys(new_secret())
    ends, errors = _open_pair({0: job, 1: job})
    assert not errors, errors
    try:
        ends[0].send(torch.arange(6.0).reshape(2, 3), tag=1)
        assert torch.equal(ends[1].recv(expected_tag=1), torch.arange(6.0).reshape(2, 3))
    finally:
        for end in ends.values():
            end.close()


@pytest.mark.timeout(30)
def test_pipeline_link_refuses_an_impostor_and_another_job():
    job, other = JobKeys(new_secret()), JobKeys(new_secret())
    impostor = zmq.Context.instance().socket(zmq.PAIR)
    impostor.linger = 0
    port = impostor.bind_to_random_port("tcp://127.0.0.1")
    try:
        ends, errors = _open_pair({1: job}, rewrite=f"tcp://127.0.0.1:{port}")
        assert isinstance(errors.get(1), PeerError) and "worker/0's link" in str(errors[1]), errors
        assert not impostor.poll(300)   # the hello never reached it
    finally:
        impostor.close()
    ends, errors = _open_pair({0: job, 1: other}, timeout_s=3.0)
    assert isinstance(errors.get(1), PeerError) and isinstance(errors.get(0), CommTimeout), errors
