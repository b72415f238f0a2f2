"""A loopback TCP proxy that adds a fixed delay before every HTTP request reaches the server.

    python bench/_latency_proxy.py --port P --upstream 127.0.0.1:Q --delay-ms 20

Benchmarks put it in front of the loopback S3 server (moto) to stand for an object store across a network:
every request (a new connection, or the next request on a kept-alive one: the first bytes the client sends
after the server has answered) waits ``delay-ms`` before it is forwarded. Bytes are forwarded unchanged. The
server's own CPU cost is unchanged, so the proxy adds latency, not load; it runs in its own process (asyncio,
one thread) so that its work does not share a GIL with either side.
"""

from __future__ import annotations

import argparse
import asyncio

CHUNK = 1 << 16


async def pipe_up(reader, writer, state: dict, delay: float) -> None:
    """client -> server; the first chunk of each request waits ``delay``."""
    while data := await reader.read(CHUNK):
        if state["answered"]:
            state["answered"] = False
            await asyncio.sleep(delay)
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()


async def pipe_down(reader, writer, state: dict) -> None:
    """server -> client; marks the request as answered so that the next client bytes are a new request."""
    while data := await reader.read(CHUNK):
        state["answered"] = True
        writer.write(data)
        await writer.drain()
    writer.close()


def handler(host: str, port: int, delay: float):
    async def handle(c_reader, c_writer) -> None:
        state = {"answered": False}
        await asyncio.sleep(delay)  # the connection's first request
        try:
            u_reader, u_writer = await asyncio.open_connection(host, port)
        except OSError:
            c_writer.close()
            return
        try:
            await asyncio.gather(pipe_up(c_reader, u_writer, state, delay), pipe_down(u_reader, c_writer, state))
        except (ConnectionError, OSError):
            pass
        finally:
            u_writer.close()
            c_writer.close()
    return handle


async def serve(port: int, upstream: str, delay_ms: float) -> None:
    host, _, uport = upstream.rpartition(":")
    server = await asyncio.start_server(handler(host, int(uport), delay_ms / 1000), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", required=True, help="host:port of the server")
    ap.add_argument("--delay-ms", type=float, default=20.0)
    args = ap.parse_args()
    asyncio.run(serve(args.port, args.upstream, args.delay_ms))


if __name__ == "__main__":
    main()
