"""A lean HTTP/1.1 client for the replay's hot path: POST a body, stream the answer back.

Why not httpx: the replay must measure servers, not itself, and one process
must sustain well over 1,000 streamed requests/s. Measured on one core
against a zero-latency endpoint (``bench/bench_replay.py``), httpx's async
client topped out near 330 requests/s (6,600 chunks/s): its connection pool
scans every connection on each request and its anyio streams add layers per
read. This client is an :class:`asyncio.Protocol` per connection with a
keep-alive pool, and does only what a replay needs:

* ``POST`` with a ``content-length`` body and the given headers;
* responses framed by ``transfer-encoding: chunked``, ``content-length`` or
  the connection's close; bodies are handed over as they arrive (no content
  decoding: the replay asks for none);
* a connection goes back to the pool when its response was read to the end
  and the server did not say ``connection: close``; a reused connection that
  fails before a single byte of the answer came back is replaced once (the
  server had closed it while idle: the request never reached it);
* ``https://`` through :mod:`ssl` with the system's default certificates.

Errors: a failed connect raises the :class:`OSError` the OS gave
(``ConnectionRefusedError`` ...); an answer cut off raises
:class:`StreamCut`. Timeouts are the caller's (``asyncio.timeout``).
"""

from __future__ import annotations

import asyncio
import ssl
from urllib.parse import urlsplit

__all__ = ["HttpPool", "Response", "StreamCut"]


class StreamCut(ConnectionError):
    """The connection closed before the response was complete."""


class _Conn(asyncio.Protocol):
    """One connection: parses one response at a time into body pieces."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.closed = False
        self.received_any = False
        self._waiter: asyncio.Future[None] | None = None
        self.reset()

    def reset(self) -> None:
        self.state = "head"  # head -> body -> done
        self.status = 0
        self.headers: dict[str, str] = {}
        self.mode = "close"  # chunked | length | close
        self.left = 0  # length: body bytes to come; chunked: bytes left in this chunk
        self.chunk_phase = "size"  # size | data | crlf | trailer
        self.pieces: list[bytes] = []
        self.error: BaseException | None = None
        self.keep_alive = True
        self.received_any = False

    # -- asyncio callbacks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        self.buf += data
        try:
            self._parse()
        except ValueError as exc:  # a malformed response: the connection is unusable
            self.error = StreamCut(f"malformed response: {exc}")
            self.keep_alive = False
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.state == "body" and self.mode == "close":
            self.state = "done"
        elif self.state != "done" and self.error is None:
            why = f": {exc}" if exc else ""
            self.error = StreamCut(f"connection closed before the response was complete{why}")
        self._wake()

    # -- parsing -------------------------------------------------------------------------

    def _parse(self) -> None:
        buf = self.buf
        while True:
            if self.state == "head":
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
                del buf[: end + 4]
                parts = lines[0].split(" ", 2)
                if len(parts) < 2 or not parts[0].startswith("HTTP/"):
                    raise ValueError(f"status line {lines[0][:80]!r}")
                status = int(parts[1])
                if 100 <= status < 200:
                    continue  # an interim answer (100 Continue): the real one follows
                self.status = status
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    self.headers[name.strip().lower()] = value.strip()
                h = self.headers
                if "chunked" in h.get("transfer-encoding", "").lower():
                    self.mode, self.chunk_phase = "chunked", "size"
                elif "content-length" in h:
                    self.mode, self.left = "length", int(h["content-length"])
                else:
                    self.mode = "close"
                if h.get("connection", "").lower() == "close" or self.mode == "close":
                    self.keep_alive = False
                self.state = "body"
                if self.mode == "length" and self.left == 0:
                    self.state = "done"
                    return
            elif self.state == "body":
                if self.mode == "length":
                    take = min(self.left, len(buf))
                    if take:
                        self.pieces.append(bytes(buf[:take]))
                        del buf[:take]
                        self.left -= take
                    if self.left == 0:
                        self.state = "done"
                    return
                if self.mode == "close":
                    if buf:
                        self.pieces.append(bytes(buf))
                        buf.clear()
                    return
                if not self._parse_chunked():
                    return
            else:
                return

    def _parse_chunked(self) -> bool:
        """Advance through chunked framing; False when more bytes are needed."""
        buf = self.buf
        if self.chunk_phase == "size":
            end = buf.find(b"\r\n")
            if end < 0:
                return False
            size = int(bytes(buf[:end]).split(b";", 1)[0].strip() or b"0", 16)
            del buf[: end + 2]
            if size == 0:
                self.chunk_phase = "trailer"
            else:
                self.left, self.chunk_phase = size, "data"
            return True
        if self.chunk_phase == "data":
            take = min(self.left, len(buf))
            if not take:
                return False
            self.pieces.append(bytes(buf[:take]))
            del buf[:take]
            self.left -= take
            if self.left == 0:
                self.chunk_phase = "crlf"
            return True
        if self.chunk_phase == "crlf":
            if len(buf) < 2:
                return False
            del buf[:2]
            self.chunk_phase = "size"
            return True
        # Trailer lines up to an empty line.
        end = buf.find(b"\r\n")
        if end < 0:
            return False
        del buf[: end + 2]
        if end == 0:
            self.state = "done"
            return False
        return True

    # -- waiting -------------------------------------------------------------------------

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def wait(self) -> None:
        """Until there is something new: a head, body pieces, the end, or an error."""
        self._waiter = asyncio.get_running_loop().create_future()
        await self._waiter
        self._waiter = None


class Response:
    """One response being read: ``status``, ``headers``, then :meth:`pieces` or :meth:`read`."""

    def __init__(self, pool: HttpPool, conn: _Conn) -> None:
        self._pool, self._conn = pool, conn
        self.status = conn.status
        self.headers = conn.headers

    async def pieces(self):
        """The body as it arrives, piece by piece (chunked framing removed)."""
        conn = self._conn
        while True:
            if conn.pieces:
                got, conn.pieces = conn.pieces, []
                for piece in got:
                    yield piece
                continue
            if conn.error is not None:
                raise conn.error
            if conn.state == "done":
                return
            await conn.wait()

    async def read(self, limit: int = 65536) -> bytes:
        """The whole body (at most ``limit`` bytes kept)."""
        out = bytearray()
        async for piece in self.pieces():
            if len(out) < limit:
                out += piece[: limit - len(out)]
        return bytes(out)

    def close(self) -> None:
        """Give the connection back (if reusable) or close it."""
        self._pool._release(self._conn)


class HttpPool:
    """Keep-alive connections to one server (``http://host:port`` or ``https://``).

    Args:
        base_url: scheme, host and port; a path in it prefixes every request's.
        connect_timeout_s: seconds a connect may take (``TimeoutError`` after).
    """

    def __init__(self, base_url: str, connect_timeout_s: float = 30.0) -> None:
        u = urlsplit(base_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"expected an http:// or https:// URL; got {base_url!r}")
        self.host = u.hostname
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.prefix = u.path.rstrip("/")
        self.ssl = ssl.create_default_context() if u.scheme == "https" else None
        default = 443 if u.scheme == "https" else 80
        self._host_header = self.host if self.port == default else f"{self.host}:{self.port}"
        self.connect_timeout_s = connect_timeout_s
        self._idle: list[_Conn] = []

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.connect_timeout_s):
            _, conn = await loop.create_connection(_Conn, self.host, self.port, ssl=self.ssl)
        return conn

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> Response:
        """Send ``POST path`` and return once the response's head has arrived.

        Raises:
            OSError: the connect failed (``ConnectionRefusedError`` ...).
            StreamCut: the connection closed before the response's head.
            TimeoutError: the connect took longer than ``connect_timeout_s``.
        """
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        head = (
            f"POST {self.prefix}{path} HTTP/1.1\r\nhost: {self._host_header}\r\n"
            f"content-length: {len(body)}\r\n{extra}\r\n"
        ).encode("latin-1")
        for attempt in range(2):
            reused = False
            conn = None
            while self._idle:
                candidate = self._idle.pop()
                if not candidate.closed:
                    conn, reused = candidate, True
                    break
            if conn is None:
                conn = await self._connect()
            conn.reset()
            assert conn.transport is not None
            conn.transport.write(head + body)
            try:
                while conn.state == "head" and conn.error is None:
                    await conn.wait()
            except BaseException:
                self._discard(conn)
                raise
            if conn.error is not None:
                self._discard(conn)
                if reused and not conn.received_any and attempt == 0:
                    continue  # the server closed it while idle; the request never arrived
                raise conn.error
            return Response(self, conn)
        raise StreamCut("unreachable")  # pragma: no cover

    def _release(self, conn: _Conn) -> None:
        if conn.state == "done" and conn.keep_alive and not conn.closed and not conn.buf:
            self._idle.append(conn)
        else:
            self._discard(conn)

    @staticmethod
    def _discard(conn: _Conn) -> None:
        if conn.transport is not None and not conn.closed:
            conn.transport.close()
        conn.closed = True

    def close(self) -> None:
        """Close every idle connection."""
        for conn in self._idle:
            self._discard(conn)
        self._idle.clear()
