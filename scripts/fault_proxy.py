#!/usr/bin/env python3
"""A loopback TCP proxy that can take the service behind it down on command (the soak's broker
outages). Standard library only (Python 3.8+).

    fault_proxy.py --listen PORT --target PORT --control PORT [--max-conns 2000]

Everything is on 127.0.0.1. Clients connect to --listen; each connection is forwarded to
127.0.0.1:--target. The broker advertises the --listen port, so clients that follow its metadata
come back through the proxy and cannot bypass it.

The control port takes one command per line and answers one line:

    up                 forward again (connections held by a blackhole are cut first)
    down refuse        cut every connection (RST) and refuse new ones: connect() gets
                       ECONNREFUSED, as from a stopped broker
    down blackhole     go silent: bytes on open connections and on new ones (which are
                       accepted) are dropped in both directions, nothing is answered and
                       nothing is closed, as on a partitioned network; `up` cuts them
    status             mode, open connections, connections accepted, bytes forwarded

While refusing, the port stays reserved (a bound, non-listening socket with SO_REUSEPORT holds
it), so no other process can take it in between.
"""

import argparse
import asyncio
import os
import signal
import socket
import sys
import time

HOST = "127.0.0.1"
HIGH_WATER = 1 << 20  # bytes buffered towards a slow peer before the other side stops reading


def log(msg):
    print(f"{time.strftime('%H:%M:%S')} fault_proxy[{os.getpid()}]: {msg}", file=sys.stderr, flush=True)


class Side(asyncio.Protocol):
    """One end of a proxied connection (client side or server side)."""

    def __init__(self, proxy, conn):
        self.proxy = proxy
        self.conn = conn
        self.transport = None
        self.peer = None  # the other Side

    def connection_made(self, transport):
        self.transport = transport
        transport.set_write_buffer_limits(high=HIGH_WATER)

    def data_received(self, data):
        if self.conn.silenced or self.proxy.mode != "up":
            return  # blackhole: dropped
        peer = self.peer
        if peer is None or peer.transport is None:
            # The server side is not connected yet: keep what the client sent (bounded).
            self.conn.pending.append(data)
            self.conn.pending_bytes += len(data)
            if self.conn.pending_bytes > HIGH_WATER:
                self.conn.abort()
            return
        peer.transport.write(data)
        self.proxy.forwarded += len(data)

    def pause_writing(self):  # our outgoing buffer is full: stop reading the other side
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self):
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def eof_received(self):
        if self.conn.silenced:
            return True  # keep the connection half-open, silent
        if self.peer is not None and self.peer.transport is not None and self.peer.transport.can_write_eof():
            self.peer.transport.write_eof()
            return True
        self.conn.abort()
        return False

    def connection_lost(self, exc):
        self.transport = None
        self.conn.abort()


class Conn:
    def __init__(self, proxy):
        self.proxy = proxy
        self.client = Side(proxy, self)
        self.server = None
        self.silenced = proxy.mode == "blackhole"
        self.pending = []
        self.pending_bytes = 0
        self.closed = False

    def abort(self):
        if self.closed:
            return
        self.closed = True
        self.proxy.conns.discard(self)
        for side in (self.client, self.server):
            if side is not None and side.transport is not None:
                side.transport.abort()

    async def connect_target(self):
        loop = asyncio.get_running_loop()
        try:
            _, server = await asyncio.wait_for(
                loop.create_connection(lambda: Side(self.proxy, self), HOST, self.proxy.target), 10
            )
        except (OSError, asyncio.TimeoutError) as e:
            log(f"target 127.0.0.1:{self.proxy.target} unreachable: {e}")
            self.abort()
            return
        if self.closed:
            server.transport.abort()
            return
        self.server = server
        server.peer, self.client.peer = self.client, server
        for data in self.pending:
            server.transport.write(data)
        self.pending.clear()


class Proxy:
    def __init__(self, listen, target, max_conns):
        self.listen = listen
        self.target = target
        self.max_conns = max_conns
        self.mode = "up"  # up | refuse | blackhole
        self.conns = set()
        self.accepted = 0
        self.forwarded = 0
        self.server = None
        self.holder = None

    def _socket(self, listening):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((HOST, self.listen))
        if listening:
            s.listen(512)
            s.setblocking(False)
        return s

    def _client_factory(self):
        if len(self.conns) >= self.max_conns:
            log(f"more than {self.max_conns} connections: refusing one")
            return _Refused()
        conn = Conn(self)
        self.conns.add(conn)
        self.accepted += 1
        if self.mode == "up":
            asyncio.get_running_loop().create_task(conn.connect_target())
        return conn.client

    async def start_listening(self):
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._client_factory, sock=self._socket(True))

    async def stop_listening(self):
        if self.server is not None:
            self.server.close()
            self.server = None

    def cut_all(self):
        for conn in list(self.conns):
            conn.abort()

    async def set_mode(self, mode):
        if mode == self.mode:
            return f"ok {mode} (unchanged)"
        old = self.mode
        if mode == "up":
            self.cut_all()  # blackholed connections lost bytes: they cannot resume
            if self.server is None:
                await self.start_listening()
        elif mode == "refuse":
            await self.stop_listening()
            self.cut_all()
        elif mode == "blackhole":
            if self.server is None:
                await self.start_listening()
            for conn in self.conns:
                conn.silenced = True
        self.mode = mode
        log(f"mode {old} -> {mode}")
        return f"ok {mode}"

    def status(self):
        return f"mode={self.mode} open={len(self.conns)} accepted={self.accepted} forwarded_bytes={self.forwarded}"

    async def control(self, reader, writer):
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
            words = line.decode(errors="replace").split()
            if words == ["up"]:
                reply = await self.set_mode("up")
            elif words in (["down"], ["down", "refuse"]):
                reply = await self.set_mode("refuse")
            elif words == ["down", "blackhole"]:
                reply = await self.set_mode("blackhole")
            elif words == ["status"]:
                reply = self.status()
            else:
                reply = "error: commands are up | down refuse | down blackhole | status"
            writer.write((reply + "\n").encode())
            await writer.drain()
        except (OSError, asyncio.TimeoutError):
            pass
        finally:
            writer.close()


class _Refused(asyncio.Protocol):
    def connection_made(self, transport):
        transport.abort()


async def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", type=int, required=True)
    ap.add_argument("--target", type=int, required=True)
    ap.add_argument("--control", type=int, required=True)
    ap.add_argument("--max-conns", type=int, default=2000)
    args = ap.parse_args()
    proxy = Proxy(args.listen, args.target, args.max_conns)
    proxy.holder = proxy._socket(False)  # reserves the port while refusing
    await proxy.start_listening()
    ctl = await asyncio.start_server(proxy.control, HOST, args.control)
    log(f"127.0.0.1:{args.listen} -> 127.0.0.1:{args.target}, control on 127.0.0.1:{args.control}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    ctl.close()
    await proxy.stop_listening()
    proxy.cut_all()
    log("stopped")


if __name__ == "__main__":
    asyncio.run(main())
