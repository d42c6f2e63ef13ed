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
"""
import argparse
import socket
import sys
import threading


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
    args = p.parse_args()

    for spec in args.backend:
        name, _, where = spec.partition("=")
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(addr(where))
        threading.Thread(target=serve, args=(name, s), daemon=True).start()

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


if __name__ == "__main__":
    main()
