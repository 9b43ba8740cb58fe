"""A parameter server's socket and nothing else, for tests that attack it: listens
with the job's keys (or without, as a control), reports its PID and address as one
JSON line, then receives (or, with --no-read, leaves everything queued) until its
stdin closes, and reports what it saw as a last JSON line."""
import argparse
import json
import os
import sys
import threading

from paratrain.comm.security import JobKeys
from paratrain.comm.transport import get_transport


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keyed", action="store_true")
    parser.add_argument("--no-read", action="store_true")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-message-mb", type=int, default=1024)
    args = parser.parse_args()
    keys = JobKeys(os.environ["PARATRAIN_SECRET"]).ps_server(0, args.workers) if args.keyed else None
    channel = get_transport("zmq").listen("127.0.0.1", max_message_bytes=args.max_message_mb << 20, keys=keys)
    print(json.dumps({"pid": os.getpid(), "address": channel.address}), flush=True)
    stdin_closed = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stdin_closed.set()), daemon=True).start()
    received, roles = 0, set()
    while not stdin_closed.wait(0.05 if args.no_read else 0):
        item = None if args.no_read else channel.recv(0.05)
        if item is not None:
            received += 1
            roles.add(channel.peer_role(item[0]))
    zap = getattr(channel, "zap", None)
    print(json.dumps({"received": received, "roles": sorted(map(str, roles)),
                      "unattributed": getattr(channel, "unattributed", 0),
                      "denied": zap.denied if zap else 0, "failed_handshakes": zap.failed_handshakes if zap else 0}),
          flush=True)
    channel.close()


if __name__ == "__main__":
    main()
