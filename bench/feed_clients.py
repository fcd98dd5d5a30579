"""Feed clients for the load benchmark: N readers and one that never reads.

    python -m bench.feed_clients PORT N
Prints READY once all are connected, then the events each reader got on SIGTERM.
"""

from __future__ import annotations

import signal
import socket
import sys

import trio
from trio_websocket import ConnectionClosed, open_websocket_url


async def reader(port: int, counts: list[int], i: int, ready: trio.Semaphore) -> None:
    """Count events until cancelled, or until the reactor drops this reader as too
    slow (which is what it should do to a reader that falls behind)."""
    try:
        async with open_websocket_url(f"ws://127.0.0.1:{port}/events") as ws:
            ready.release()
            while True:
                await ws.get_message()
                counts[i] += 1
    except ConnectionClosed:
        return


def stalled(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade"
                 b"\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13"
                 b"\r\n\r\n")
    sock.recv(1024)
    return sock


async def main(port: int, n: int) -> None:
    counts = [0] * n
    ready = trio.Semaphore(n, max_value=n)
    for _ in range(n):
        await ready.acquire()
    sock = stalled(port)
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(reader, port, counts, i, ready)
            for _ in range(n):
                await ready.acquire()
            print("READY", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break
    sock.close()
    print(" ".join(map(str, counts)), flush=True)


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]), int(sys.argv[2]))
