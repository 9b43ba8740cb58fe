#!/usr/bin/env python3
"""Pretend this machine is K hosts: one Linux network namespace per host.

Each host is a namespace ``<prefix>-h<i>`` with one interface ``eth0`` at
``10.77.0.<i+1>/24``; all of them hang off a bridge that lives in its own namespace
``<prefix>-br``, like machines on one switch. Traffic between hosts is real TCP between
separate network stacks. ``--rate`` puts a ``tc tbf`` token bucket on both ends of every
link (host egress and switch-port egress), so each host gets a full-duplex link of that
rate. Nothing is created outside these namespaces: the veth pairs are made inside the
bridge namespace, addresses exist only inside the hosts, and deleting the namespaces
removes everything.

Needs root and ``ip`` (``apt-get install -y iproute2``). Command line::

    python scripts/netns_hosts.py up --hosts 4 --rate 100mbit --prefix pt1
    python scripts/netns_hosts.py exec pt1-h0 -- python -c "print('hello from h0')"
    python scripts/netns_hosts.py down --prefix pt1
    python scripts/netns_hosts.py list
    # set up, run a command on every host ({host} {hosts} {addr} {addr0} {is_first} are
    # filled in), wait, and always tear down:
    python scripts/netns_hosts.py run --hosts 2 -- python -c "print('{host} at {addr}')"
    # the same, as one torchrun job across the hosts (c10d rendezvous on host 0):
    python scripts/netns_hosts.py torchrun --hosts 2 --nproc-per-node 2 --rate 1gbit -- \
        -m paratrain.cli train --strategy allreduce

From Python::

    with NetnsHosts(4, rate="100mbit") as hosts:
        proc = hosts.popen(0, ["python", "train.py"], env={"FOO": "1"})
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

SUBNET = "10.77.0"
HOST_INTERFACE = "eth0"
COMMAND_TIMEOUT_S = 20.0
RELAY_JOIN_TIMEOUT_S = 5.0  # how long output may trail a command that has exited
_RATE_PATTERN = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit|tbit)$")
_PREFIX_PATTERN = re.compile(r"^[a-z][a-z0-9]{0,15}$")
_RATE_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}
MAX_HOSTS = 200


class NetnsError(RuntimeError):
    """Setting up, using or removing the namespaces failed."""


def rate_bits_per_s(rate: str) -> float:
    """``"100mbit"`` -> 1e8. Accepts tc's bit units (bit, kbit, mbit, gbit, tbit)."""
    match = _RATE_PATTERN.match(rate) if isinstance(rate, str) else None
    if not match:
        raise ValueError(f"rate={rate!r} is not allowed; use a number and one of "
                         f"{', '.join(_RATE_UNITS)}, e.g. '100mbit' or '1gbit'")
    return float(match.group(1)) * _RATE_UNITS[match.group(2)]


def tbf_args(rate: str) -> list[str]:
    """``tc qdisc ... tbf`` arguments for ``rate``. The bucket holds ~2 ms of traffic
    (at least 16 KiB), enough for TCP segmentation offload bursts without letting
    the link run much faster than ``rate`` over a few milliseconds."""
    bytes_per_s = rate_bits_per_s(rate) / 8
    burst = max(int(bytes_per_s * 0.002), 16 * 1024)
    return ["tbf", "rate", rate, "burst", str(burst), "latency", "50ms"]


def host_address(index: int) -> str:
    """Address of host ``index`` (0-based)."""
    return f"{SUBNET}.{index + 1}"


@dataclass(frozen=True)
class NetnsConfig:
    """What to build: ``num_hosts`` hosts, an optional per-link ``rate``, and a name
    ``prefix`` unique to this run (random when not given)."""

    num_hosts: int
    rate: str | None = None
    prefix: str = field(default_factory=lambda: "pt" + secrets.token_hex(3))

    def __post_init__(self) -> None:
        if not isinstance(self.num_hosts, int) or not 1 <= self.num_hosts <= MAX_HOSTS:
            raise ValueError(f"num_hosts={self.num_hosts!r} must be an integer in [1, {MAX_HOSTS}]")
        if self.rate is not None:
            rate_bits_per_s(self.rate)
        if not isinstance(self.prefix, str) or not _PREFIX_PATTERN.match(self.prefix):
            raise ValueError(f"prefix={self.prefix!r} must be a lowercase letter followed by "
                             "at most 15 lowercase letters or digits")

    @property
    def bridge(self) -> str:
        return f"{self.prefix}-br"

    def host(self, index: int) -> str:
        return f"{self.prefix}-h{index}"


def _ip(*args: str, timeout: float = COMMAND_TIMEOUT_S, check: bool = True) -> str:
    try:
        result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise NetnsError(f"`ip {' '.join(args)}` did not finish within {timeout} s") from None
    if check and result.returncode != 0:
        raise NetnsError(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")
    return result.stdout


def unavailable_reason() -> str | None:
    """Why namespaces cannot be used here, or None when they can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "`ip` is missing: apt-get update && apt-get install -y iproute2"
    if shutil.which("tc") is None:
        return "`tc` is missing: apt-get update && apt-get install -y iproute2"
    probe = "ptprobe" + secrets.token_hex(3)
    try:
        _ip("netns", "add", probe)
    except NetnsError as error:
        return f"cannot create a network namespace: {error}"
    _ip("netns", "del", probe, check=False)
    return None


def list_namespaces() -> list[str]:
    """Names of all network namespaces (``ip netns list``)."""
    return [line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()]


def namespaces_of(prefix: str) -> list[str]:
    """The namespaces this script made under ``prefix`` (bridge and hosts)."""
    shape = re.compile(rf"^{re.escape(prefix)}-(br|h\d+)$")
    return [name for name in list_namespaces() if shape.match(name)]


def _kill_processes_in(namespace: str) -> None:
    """SIGKILL what still runs inside ``namespace`` (only ever one of ours), so that
    deleting it really frees its interfaces."""
    for _ in range(3):
        pids = [int(p) for p in _ip("netns", "pids", namespace, check=False).split()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


def teardown(prefix: str) -> list[str]:
    """Kill what runs in ``prefix``'s namespaces and delete them; returns their names."""
    if not _PREFIX_PATTERN.match(prefix):
        raise ValueError(f"prefix={prefix!r} is not one this script makes")
    names = namespaces_of(prefix)
    for name in names:
        _kill_processes_in(name)
    for name in names:
        _ip("netns", "del", name, check=False)
    return names


class NetnsHosts:
    """K hosts in network namespaces; a context manager that always tears down.

    Teardown runs on ``__exit__``, at interpreter exit (atexit) and on SIGTERM (when
    this is the main thread and SIGTERM had its default action).
    """

    def __init__(self, num_hosts: int, *, rate: str | None = None, prefix: str | None = None) -> None:
        kwargs = {} if prefix is None else {"prefix": prefix}
        self.config = NetnsConfig(num_hosts, rate, **kwargs)
        self._processes: list[subprocess.Popen] = []
        self._up = False
        self._lock = threading.Lock()

    # -- life cycle ------------------------------------------------------------

    def __enter__(self) -> "NetnsHosts":
        self.up()
        return self

    def __exit__(self, *exc_info) -> None:
        self.down()

    def up(self) -> None:
        """Create the bridge namespace, the hosts and their links."""
        reason = unavailable_reason()
        if reason:
            raise NetnsError(reason)
        config = self.config
        if namespaces_of(config.prefix):
            raise NetnsError(f"namespaces with prefix {config.prefix!r} already exist; "
                             f"remove them with `netns_hosts.py down --prefix {config.prefix}`")
        self._up = True
        atexit.register(self.down)
        _install_sigterm_teardown(self)
        try:
            self._build()
        except BaseException:
            self.down()
            raise

    def _build(self) -> None:
        config = self.config
        bridge = config.bridge
        _ip("netns", "add", bridge)
        _ip("-n", bridge, "link", "add", "br0", "type", "bridge")
        _ip("-n", bridge, "link", "set", "br0", "up")
        for index in range(config.num_hosts):
            host, port = config.host(index), f"h{index}"
            _ip("netns", "add", host)
            # Both veth ends are born inside namespaces: nothing appears in the root one.
            _ip("-n", bridge, "link", "add", port, "type", "veth",
                "peer", "name", HOST_INTERFACE, "netns", host)
            _ip("-n", bridge, "link", "set", port, "master", "br0", "up")
            _ip("-n", host, "addr", "add", f"{host_address(index)}/24", "dev", HOST_INTERFACE)
            _ip("-n", host, "link", "set", HOST_INTERFACE, "up")
            _ip("-n", host, "link", "set", "lo", "up")
            if config.rate:
                self._limit(host, HOST_INTERFACE)
                self._limit(bridge, port)

    def _limit(self, namespace: str, interface: str) -> None:
        argv = ["ip", "netns", "exec", namespace, "tc", "qdisc", "add", "dev", interface,
                "root", *tbf_args(self.config.rate)]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
        if result.returncode != 0:
            raise NetnsError(f"`{' '.join(argv)}` failed: {result.stderr.strip()}")

    def down(self) -> None:
        """Stop every process started here, then delete the namespaces. Idempotent."""
        with self._lock:
            if not self._up:
                return
            self._up = False
        for process in self._processes:
            _stop(process)
        teardown(self.config.prefix)
        _LIVE_HOSTS.discard(self)
        with contextlib.suppress(Exception):
            atexit.unregister(self.down)

    # -- using the hosts -------------------------------------------------------

    @property
    def num_hosts(self) -> int:
        return self.config.num_hosts

    @property
    def names(self) -> list[str]:
        """Namespace names of the hosts, in index order."""
        return [self.config.host(i) for i in range(self.num_hosts)]

    def address(self, index: int) -> str:
        """IPv4 address of host ``index``."""
        self._check_index(index)
        return host_address(index)

    def host_env(self, index: int) -> dict[str, str]:
        """Variables that make the tools use the host's own interface: gloo would
        otherwise resolve the machine's hostname to an address that does not exist
        inside the namespace, and paratrain's listeners (parameter servers, pipeline
        channels) would bind loopback, which other hosts cannot reach."""
        self._check_index(index)
        return _host_env(index)

    def popen(self, index: int, argv: list[str], env: dict[str, str] | None = None,
              **popen_kwargs) -> subprocess.Popen:
        """Start ``argv`` on host ``index``. The child sees ``os.environ`` plus
        :meth:`host_env` plus ``env``. It gets its own session, and is stopped on
        teardown if still running."""
        self._check_index(index)
        if not self._up:
            raise NetnsError("the hosts are not up; use `with NetnsHosts(...)` or call up()")
        if not argv or not all(isinstance(a, str) for a in argv):
            raise TypeError(f"argv={argv!r} must be a non-empty list of strings")
        child_env = {**os.environ, **self.host_env(index), **(env or {})}
        process = subprocess.Popen(["ip", "netns", "exec", self.config.host(index), *argv],
                                   env=child_env, start_new_session=True, **popen_kwargs)
        self._processes.append(process)
        return process

    def run(self, index: int, argv: list[str], *, timeout: float, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess:
        """Run ``argv`` on host ``index`` to completion (output captured as text)."""
        process = self.popen(index, argv, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop(process)
            raise NetnsError(f"{argv!r} on host {index} ran past {timeout} s") from None
        return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)

    def free_port(self, index: int) -> int:
        """A TCP port that is free on host ``index`` (bound to port 0 there, then freed)."""
        code = "import socket; s = socket.socket(); s.bind(('', 0)); print(s.getsockname()[1])"
        result = self.run(index, [sys.executable, "-c", code], timeout=COMMAND_TIMEOUT_S)
        if result.returncode != 0:
            raise NetnsError(f"could not find a free port on host {index}: {result.stderr}")
        return int(result.stdout.strip())

    def torchrun_argv(self, index: int, *, nproc_per_node: int, port: int, run_id: str,
                      join_timeout_s: int = 60) -> list[str]:
        """``torchrun`` for host ``index`` of a job spread over every host, with the
        c10d rendezvous on host 0; append ``-m module ...`` or ``script.py ...``.

        ``--local-addr`` makes each agent advertise its namespace address (the
        hostname resolves to an address that does not exist inside a namespace), and
        ``is_host`` tells host 0's agent to serve the rendezvous store, which it cannot
        guess because the endpoint address is not the machine's hostname.
        """
        self._check_index(index)
        is_host = "true" if index == 0 else "false"
        return [sys.executable, "-m", "torch.distributed.run",
                "--nnodes", str(self.num_hosts), "--nproc-per-node", str(nproc_per_node),
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{host_address(0)}:{port}",
                "--rdzv-id", run_id, "--local-addr", host_address(index),
                "--rdzv-conf", f"is_host={is_host},join_timeout={join_timeout_s}",
                "--max-restarts", "0"]

    def _check_index(self, index: int) -> None:
        if not isinstance(index, int) or not 0 <= index < self.num_hosts:
            raise ValueError(f"host index={index!r} must be in [0, {self.num_hosts})")


def _host_env(index: int) -> dict[str, str]:
    return {"GLOO_SOCKET_IFNAME": HOST_INTERFACE, "TP_SOCKET_IFNAME": HOST_INTERFACE,
            "PARATRAIN_BIND": host_address(index),
            "NETNS_HOST_INDEX": str(index), "NETNS_HOST_ADDR": host_address(index)}


def _stop(process: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM the process's session, then SIGKILL it if it lingers."""
    if process.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


# Hosts that are up in this process, for the SIGTERM handler (one handler serves all).
_LIVE_HOSTS: "set[NetnsHosts]" = set()


def _on_sigterm(signum, frame) -> None:
    for hosts in list(_LIVE_HOSTS):
        hosts.down()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)  # die of SIGTERM, as without the handler


def _install_sigterm_teardown(hosts: NetnsHosts) -> None:
    """On SIGTERM tear down every live set of hosts, then die of SIGTERM as before.
    Only where SIGTERM has its default action (or already ours), so a handler someone
    else set is never replaced."""
    _LIVE_HOSTS.add(hosts)
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)


# -- command line --------------------------------------------------------------

def fill_placeholders(argv: list[str], hosts: NetnsHosts, index: int) -> list[str]:
    """Replace ``{host}`` (index), ``{hosts}`` (count), ``{addr}``, ``{addr0}`` (host 0's
    address) and ``{is_first}`` (``true`` on host 0, else ``false``) in each argument."""
    values = {"host": str(index), "hosts": str(hosts.num_hosts), "addr": hosts.address(index),
              "addr0": hosts.address(0), "is_first": "true" if index == 0 else "false"}
    return [re.sub(r"\{(host|hosts|addr|addr0|is_first)\}", lambda m: values[m.group(1)], arg)
            for arg in argv]


def _command_after_dashes(parser: argparse.ArgumentParser, command: list[str]) -> list[str]:
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        parser.error("give the command after --")
    return command


def _relay_lines(stream, sink, lock: threading.Lock) -> None:
    """Copy ``stream`` to ``sink`` one whole line at a time. Hosts share the
    terminal, and an unbuffered child (``PYTHONUNBUFFERED``) writes a ``print``'s
    words in separate writes, so a shared pipe would splice lines together."""
    with stream:
        for line in iter(stream.readline, b""):
            with lock:
                sink.write(line)
                sink.flush()


def _run_everywhere(hosts: NetnsHosts, argv_for_host, timeout_s: float) -> int:
    """Start one command per host, wait for all (up to ``timeout_s``); the worst exit code.
    Each host's output reaches ours line by line, never two hosts within a line."""
    lock = threading.Lock()
    processes, relays = [], []
    for i in range(hosts.num_hosts):
        process = hosts.popen(i, argv_for_host(i), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        processes.append(process)
        for stream, sink in ((process.stdout, sys.stdout.buffer), (process.stderr, sys.stderr.buffer)):
            relay = threading.Thread(target=_relay_lines, args=(stream, sink, lock), daemon=True)
            relay.start()
            relays.append(relay)
    deadline = time.monotonic() + timeout_s
    codes = []
    for process in processes:
        try:
            codes.append(process.wait(timeout=max(0.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            with lock:   # not inside a host's line
                print(f"netns_hosts: command ran past {timeout_s} s; stopping it", file=sys.stderr, flush=True)
            _stop(process)
            codes.append(124)
    for relay in relays:  # a leftover grandchild may hold a pipe open: do not wait on it for ever
        relay.join(timeout=RELAY_JOIN_TIMEOUT_S)
    return max(codes, key=abs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    up = sub.add_parser("up", help="create hosts and leave them up")
    run = sub.add_parser("run", help="create hosts, run a command on each, tear down")
    torchrun = sub.add_parser("torchrun", help="create hosts, run one torchrun job across them, tear down")
    for p in (up, run, torchrun):
        p.add_argument("--hosts", type=int, required=True, help="number of hosts")
        p.add_argument("--rate", default=None, help="per-link rate, e.g. 100mbit or 1gbit")
        p.add_argument("--prefix", default=None, help="namespace name prefix (default: random)")
    torchrun.add_argument("--nproc-per-node", type=int, default=1)
    for p in (run, torchrun):
        p.add_argument("--timeout", type=float, default=600.0, help="seconds before the commands are killed")
        p.add_argument("command", nargs=argparse.REMAINDER)
    execute = sub.add_parser("exec", help="run a command on one host")
    execute.add_argument("host", help="host namespace, e.g. pt1-h0")
    execute.add_argument("command", nargs=argparse.REMAINDER)
    down = sub.add_parser("down", help="tear down the hosts of a prefix")
    down.add_argument("--prefix", required=True)
    sub.add_parser("list", help="list namespaces that look like this script's")
    args = parser.parse_args(argv)

    try:
        if args.action == "up":
            hosts = NetnsHosts(args.hosts, rate=args.rate, prefix=args.prefix)
            hosts.up()
            atexit.unregister(hosts.down)  # `up` means: leave them up for later commands
            for index, name in enumerate(hosts.names):
                print(f"{name} {hosts.address(index)}")
            print(f"remove with: {sys.argv[0]} down --prefix {hosts.config.prefix}")
            return 0
        if args.action == "run":
            command = _command_after_dashes(run, args.command)
            with NetnsHosts(args.hosts, rate=args.rate, prefix=args.prefix) as hosts:
                return _run_everywhere(hosts, lambda i: fill_placeholders(command, hosts, i), args.timeout)
        if args.action == "torchrun":
            command = _command_after_dashes(torchrun, args.command)
            with NetnsHosts(args.hosts, rate=args.rate, prefix=args.prefix) as hosts:
                port = hosts.free_port(0)
                return _run_everywhere(hosts, lambda i: [
                    *hosts.torchrun_argv(i, nproc_per_node=args.nproc_per_node, port=port,
                                         run_id=hosts.config.prefix),
                    *fill_placeholders(command, hosts, i)], args.timeout)
        if args.action == "exec":
            command = _command_after_dashes(execute, args.command)
            if not re.match(r"^[a-z][a-z0-9]{0,15}-h\d+$", args.host) or args.host not in list_namespaces():
                parser.error(f"host={args.host!r} is not a host namespace made by this script; "
                             f"see `{sys.argv[0]} list`")
            env = {**os.environ, **_host_env(int(args.host.rsplit("-h", 1)[1]))}
            os.execvpe("ip", ["ip", "netns", "exec", args.host, *command], env)
        if args.action == "down":
            removed = teardown(args.prefix)
            print(f"removed {len(removed)} namespace(s): {' '.join(removed)}")
            return 0
        if args.action == "list":
            for name in list_namespaces():
                if re.match(r"^[a-z][a-z0-9]{0,15}-(br|h\d+)$", name):
                    print(name)
            return 0
    except (NetnsError, ValueError) as error:
        print(f"netns_hosts: error: {error}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
