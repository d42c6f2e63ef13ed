#!/usr/bin/env python3
"""Round trips through a running udpshard, for the container and systemd CI
scripts: starts echo backends on the host's loopback (each replies NAME:data),
sends one QUIC short-header datagram per flow, each from its own socket with
its own connection ID, and waits for every reply.

    roundtrip.py --proxy 127.0.0.1:4433 --backend a=127.0.0.1:9001 \
        --backend b=127.0.0.1:9002 --flows 32 [--expect b] [--cid-base N]

Prints what came back per backend. Exits 1 unless every flow got its reply
(from the --expect backend, when given). Bounded: one datagram per flow,
3 tries of 2 s each.

With --steady SECONDS: every flow sends one datagram every 50 ms for that
long (no retries), then waits 3 s for the last replies. Exits 1 unless every
datagram got its reply and each flow's replies all came from one backend:
traffic that must not notice what happens meanwhile (a binary upgrade).
With --ready FILE it creates FILE once the first round is answered.
"""
import argparse
import socket
import sys
import threading
import time


def addr(text):
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def serve(name, sock):
    while True:
        try:
            data, peer = sock.recvfrom(65536)
        except OSError:
            return
        sock.sendto(name.encode() + b":" + data, peer)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--proxy", type=addr, required=True)
    p.add_argument("--backend", action="append", default=[], help="NAME=HOST:PORT")
    p.add_argument("--flows", type=int, default=16)
    p.add_argument("--cid-base", type=lambda s: int(s, 0), default=0x5EED0000)
    p.add_argument("--expect", help="every reply must come from this backend")
    p.add_argument("--steady", type=float, help="seconds of steady traffic")
    p.add_argument("--ready", help="with --steady: a file made once replies flow")
    args = p.parse_args()

    for spec in args.backend:
        name, _, where = spec.partition("=")
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(addr(where))
        threading.Thread(target=serve, args=(name, s), daemon=True).start()

    if args.steady:
        steady(args)
        return

    seen = {}
    missing = 0
    for i in range(args.flows):
        body = b"flow%d" % i
        datagram = b"\x40" + (args.cid_base + i).to_bytes(8, "big") + body
        c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        c.settimeout(2)
        reply = None
        for _ in range(3):
            c.sendto(datagram, args.proxy)
            try:
                reply, _ = c.recvfrom(65536)
                break
            except socket.timeout:
                continue
        c.close()
        if reply is None or not reply.endswith(datagram):
            missing += 1
            continue
        name = reply.split(b":", 1)[0].decode()
        seen[name] = seen.get(name, 0) + 1
    got = args.flows - missing
    print(f"{args.flows} flows, {got} replies: " +
          (", ".join(f"{k}={v}" for k, v in sorted(seen.items())) or "none"))
    if missing:
        sys.exit(f"{missing} of {args.flows} flows got no reply")
    if args.expect and set(seen) != {args.expect}:
        sys.exit(f"expected every reply from {args.expect}, got {seen}")


def steady(args):
    socks = []
    for i in range(args.flows):
        c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        c.setblocking(False)
        socks.append(c)
    sent = 0
    backends = [set() for _ in socks]
    replies = [0] * len(socks)

    def drain():
        for i, c in enumerate(socks):
            while True:
                try:
                    reply = c.recv(65536)
                except BlockingIOError:
                    break
                replies[i] += 1
                backends[i].add(reply.split(b":", 1)[0].decode())

    start = time.monotonic()
    rounds = 0
    while time.monotonic() - start < args.steady:
        for i, c in enumerate(socks):
            body = b"r%d" % rounds
            c.sendto(b"\x40" + (args.cid_base + i).to_bytes(8, "big") + body, args.proxy)
            sent += 1
        rounds += 1
        time.sleep(0.05)
        drain()
        if args.ready and rounds == 5 and sum(replies) == sent:
            open(args.ready, "w").close()
    end = time.monotonic() + 3
    while sum(replies) < sent and time.monotonic() < end:
        time.sleep(0.05)
        drain()
    got = sum(replies)
    rate = sent / max(args.steady, 0.001)
    print(f"steady: {args.flows} flows, {rounds} rounds, {sent} sent ({rate:.0f}/s), "
          f"{got} replies")
    if got != sent:
        sys.exit(f"{sent - got} of {sent} datagrams got no reply")
    moved = [i for i, b in enumerate(backends) if len(b) != 1]
    if moved:
        sys.exit(f"flows {moved} were answered by more than one backend: "
                 f"{[sorted(backends[i]) for i in moved]}")


if __name__ == "__main__":
    main()
