#!/usr/bin/env python3
"""N parallel downloads through a forward's local port: when does each stream get its first byte?

A fair tunnel starts every stream within milliseconds; one that starves some streams shows a
latest first byte near the transfer's length. Session 8 used it on a loopback QUIC forward in
front of `socat TCP6-LISTEN:PORT,bind=[::1],fork,reuseaddr,backlog=256 OPEN:/dev/zero,rdonly`
(mind socat's default backlog of 5: it drops SYNs and adds 1 s waits of its own).

usage: first-byte.py LOCAL_PORT STREAMS SECONDS
"""
import socket
import sys
import threading
import time

port, n, dur = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
res = [None] * n
t0 = time.monotonic()


def run(i):
    s = socket.create_connection(("127.0.0.1", port))
    buf = bytearray(1 << 18)
    first, total, end = None, 0, None
    while True:
        k = s.recv_into(buf)
        if k == 0:
            break
        now = time.monotonic()
        if first is None:
            first, end = now, now + dur
        total += k
        if now >= end:
            break
    res[i] = (first - t0, total)
    s.close()


threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
for t in threads:
    t.start()
for t in threads:
    t.join()
firsts = sorted(r[0] for r in res)
print(
    "first byte s: min %.3f median %.3f max %.3f; %.2f GB in %.2f s"
    % (firsts[0], firsts[n // 2], firsts[-1], sum(r[1] for r in res) / 1e9, time.monotonic() - t0)
)
