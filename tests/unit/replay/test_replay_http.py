"""The replay's HTTP/1.1 client against raw servers on loopback: framing, keep-alive, failures."""

from __future__ import annotations

import asyncio

import pytest

from traces.replay.http import HttpPool, StreamCut


async def _serve(answer: bytes, *, split: int | None = None, close: bool = False):
    """A server that answers every request with ``answer`` (``split``-byte writes, if given)."""
    connections = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.decode().split("\r\n"):
                    if line.lower().startswith("content-length:"):
                        length = int(line.split(":")[1])
                await reader.readexactly(length)
                if split:
                    for k in range(0, len(answer), split):
                        writer.write(answer[k : k + split])
                        await writer.drain()
                        await asyncio.sleep(0)
                else:
                    writer.write(answer)
                if close:
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}", connections


CHUNKED = (
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    b"7\r\ndata: 1\r\n4;ext=1\r\n\n\nab\r\n0\r\nx-trailer: y\r\n\r\n"
)


@pytest.mark.parametrize("split", [None, 1, 3])
def test_a_chunked_body_comes_back_whole_however_the_bytes_are_split(split):
    async def main():
        server, url, conns = await _serve(CHUNKED, split=split)
        pool = HttpPool(url)
        bodies = []
        for _ in range(3):
            resp = await pool.post("/x", b"{}", {})
            bodies.append((resp.status, await resp.read()))
            resp.close()
        pool.close()
        server.close()
        return bodies, len(conns)

    bodies, n_connections = asyncio.run(asyncio.wait_for(main(), 10))
    assert bodies == [(200, b"data: 1\n\nab")] * 3
    assert n_connections == 1  # kept alive and reused


def test_a_content_length_body_and_an_error_status():
    answer = b'HTTP/1.1 503 Service Unavailable\r\ncontent-length: 9\r\n\r\n{"a": 1}\n'

    async def main():
        server, url, _ = await _serve(answer, split=2)
        pool = HttpPool(url)
        resp = await pool.post("/x", b"{}", {"x-request-id": "7"})
        out = (resp.status, resp.headers["content-length"], await resp.read())
        resp.close()
        server.close()
        return out

    assert asyncio.run(asyncio.wait_for(main(), 10)) == (503, "9", b'{"a": 1}\n')


def test_a_body_framed_by_the_close_ends_at_the_close():
    answer = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\ndata: [DONE]\n\n"

    async def main():
        server, url, _ = await _serve(answer, close=True)
        pool = HttpPool(url)
        resp = await pool.post("/x", b"{}", {})
        body = await resp.read()
        resp.close()
        # The closed connection is not reused: the next request opens a new one.
        resp = await pool.post("/x", b"{}", {})
        again = await resp.read()
        resp.close()
        server.close()
        return body, again

    assert asyncio.run(asyncio.wait_for(main(), 10)) == (b"data: [DONE]\n\n",) * 2


def test_a_response_cut_off_midway_raises_stream_cut():
    answer = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nab"

    async def main():
        server, url, _ = await _serve(answer, close=True)
        pool = HttpPool(url)
        resp = await pool.post("/x", b"{}", {})
        try:
            with pytest.raises(StreamCut):
                await resp.read()
        finally:
            resp.close()
            server.close()

    asyncio.run(asyncio.wait_for(main(), 10))


def test_an_idle_connection_the_server_closed_is_replaced_without_losing_the_request():
    answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"

    async def main():
        server, url, conns = await _serve(answer)
        pool = HttpPool(url)
        resp = await pool.post("/x", b"{}", {})
        await resp.read()
        resp.close()
        conns[0].close()  # the server drops the idle keep-alive connection
        await asyncio.sleep(0.05)
        resp = await pool.post("/x", b"{}", {})
        out = (resp.status, await resp.read())
        resp.close()
        server.close()
        return out, len(conns)

    assert asyncio.run(asyncio.wait_for(main(), 10)) == ((200, b"ok"), 2)


def test_a_refused_connect_raises_the_os_error():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def main():
        with pytest.raises(ConnectionRefusedError):
            await HttpPool(f"http://127.0.0.1:{port}").post("/x", b"{}", {})

    asyncio.run(asyncio.wait_for(main(), 10))


def test_a_url_that_is_not_http_is_refused_by_name():
    with pytest.raises(ValueError, match="http:// or https://"):
        HttpPool("ftp://example.org")
