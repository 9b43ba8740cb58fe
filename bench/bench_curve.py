"""What CURVE costs on the parameter server's transport: handshake per connection
and request/reply throughput, plain ZeroMQ vs CURVE, over loopback.

    python bench/bench_curve.py                         # 50 connections; 4 and 64 MB, 5 repeats
    python bench/bench_curve.py --quick                 # a smoke run

Parts:

* ``handshake``: a fresh client connection to a listening server, up to its first
  tiny reply (connect, handshake, ZAP, one round trip), one after another. ``plain``
  has no handshake to wait for; ``curve`` is paratrain's (its own ZAP thread);
  ``curve-pyzmq`` uses pyzmq's ``ThreadAuthenticator`` with a key callback instead,
  for comparison. Median and 90th percentile.
* ``throughput``: the client sends one payload and the server answers with a
  payload of the same size (a push and a pull), through paratrain's own channels;
  median round trip over ``--repeats``, and MB/s counting both directions.

Server and client run in one process: CURVE's encryption runs in libzmq's I/O
threads, outside the GIL. Run it with the launcher's allocator settings
(``paratrain.env.ALLOCATOR_ENV``) for figures comparable to a job's processes. On a
shared machine the figures are indicative only.
"""
from __future__ import annotations

import argparse
import contextlib
import pathlib
import statistics
import sys
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import zmq  # noqa: E402
from zmq.auth.thread import ThreadAuthenticator  # noqa: E402

from paratrain.comm.security import JobKeys, new_secret  # noqa: E402
from paratrain.comm.transport import get_transport  # noqa: E402

ZMQ = get_transport("zmq")


def _echo(channel, stop: threading.Event) -> None:
    """Answer every request with a payload of the request's size."""
    replies: dict[int, bytes] = {}
    while not stop.is_set():
        item = channel.recv(0.05)
        if item is not None:
            peer, frames = item
            size = memoryview(frames[-1]).nbytes
            channel.send(peer, [b"ok", replies.setdefault(size, bytes(size))])


@contextlib.contextmanager
def _echo_server(keys, max_message_bytes: int):
    """A listening channel answered by :func:`_echo` in a thread."""
    channel = ZMQ.listen("127.0.0.1", max_message_bytes=max_message_bytes, keys=keys)
    stop = threading.Event()
    server = threading.Thread(target=_echo, args=(channel, stop), daemon=True)
    server.start()
    try:
        yield channel
    finally:
        stop.set()
        server.join(5)
        channel.close()


def _quantiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p90 = ordered[int(0.9 * (len(ordered) - 1))]
    return f"median {statistics.median(ordered) * 1e3:.2f} ms, p90 {p90 * 1e3:.2f} ms"


def handshake_plain_and_curve(connections: int) -> None:
    job = JobKeys(new_secret())
    for name, server_keys, client_keys in (("plain", None, None),
                                           ("curve", job.ps_server(0, 1), job.ps_client(0, 1))):
        samples = []
        with _echo_server(server_keys, 1 << 20) as channel:
            for _ in range(connections):
                started = time.perf_counter()
                client = ZMQ.connect([channel.address], keys=client_keys)
                client.send(0, [b"hi"])
                assert client.recv(10.0) is not None, "no reply"
                samples.append(time.perf_counter() - started)
                client.close()
        print(f"handshake {name:12s}: {_quantiles(samples)} ({connections} connections)")


class _Keys:
    """pyzmq's credentials-provider protocol: admit the one worker key."""

    def __init__(self, allowed: bytes):
        self.allowed = allowed

    def callback(self, domain: str, key: bytes) -> bool:
        return key == self.allowed


def handshake_pyzmq_authenticator(connections: int) -> None:
    job = JobKeys(new_secret())
    server_pair, worker = job.keypair("server/0"), job.keypair("worker/0")
    context = zmq.Context()
    auth = ThreadAuthenticator(context)
    auth.start()
    auth.configure_curve_callback(domain="paratrain/ps", credentials_provider=_Keys(worker.public_key))
    sock = context.socket(zmq.ROUTER)
    sock.linger = 0
    sock.curve_server = True
    sock.curve_secretkey, sock.curve_publickey = server_pair.secret_key, server_pair.public_key
    sock.zap_domain = b"paratrain/ps"
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()

    def echo():
        while not stop.is_set():
            if sock.poll(50):
                peer, _ = sock.recv_multipart()
                sock.send_multipart([peer, b"ok"])

    server = threading.Thread(target=echo, daemon=True)
    server.start()
    samples = []
    client_context = zmq.Context()
    for _ in range(connections):
        started = time.perf_counter()
        client = client_context.socket(zmq.DEALER)
        client.linger = 0
        client.curve_serverkey = server_pair.public_key
        client.curve_publickey, client.curve_secretkey = worker.public_key, worker.secret_key
        client.connect(f"tcp://127.0.0.1:{port}")
        client.send(b"hi")
        assert client.poll(10_000), "no reply"
        client.recv()
        samples.append(time.perf_counter() - started)
        client.close()
    stop.set()
    server.join(5)
    sock.close()
    auth.stop()
    context.term()
    client_context.term()
    print(f"handshake {'curve-pyzmq':12s}: {_quantiles(samples)} ({connections} connections)")


def throughput(sizes_mb: list[int], repeats: int) -> None:
    job = JobKeys(new_secret())
    for size_mb in sizes_mb:
        payload = bytes(size_mb << 20)
        for name, server_keys, client_keys in (("plain", None, None),
                                               ("curve", job.ps_server(0, 1), job.ps_client(0, 1))):
            samples = []
            with _echo_server(server_keys, (size_mb + 1) << 20) as channel:
                client = ZMQ.connect([channel.address], keys=client_keys)
                for _ in range(repeats + 1):   # the first warms the allocator up, and is not counted
                    started = time.perf_counter()
                    client.send(0, [b"push", payload])
                    assert client.recv(60.0) is not None, "no reply"
                    samples.append(time.perf_counter() - started)
                client.close()
            median = statistics.median(samples[1:])
            print(f"{size_mb:3d} MB request/reply {name:5s}: {median * 1e3:8.1f} ms median round trip, "
                  f"{2 * size_mb / median:7.0f} MB/s both directions ({repeats} repeats)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--sizes-mb", default="4,64", help="comma-separated payload sizes")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 10 connections, 1 and 4 MB, 2 repeats")
    args = parser.parse_args()
    if args.quick:
        args.connections, args.sizes_mb, args.repeats = 10, "1,4", 2
    handshake_plain_and_curve(args.connections)
    handshake_pyzmq_authenticator(args.connections)
    throughput([int(s) for s in args.sizes_mb.split(",")], args.repeats)


if __name__ == "__main__":
    main()
