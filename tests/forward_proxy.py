"""A tiny HTTP forward proxy for tests: what a corporate egress proxy does, on 127.0.0.1.

It forwards absolute-form requests (`POST http://host:port/path HTTP/1.1`) to the origin, one
request per connection, and records every request line it sees. CONNECT (what a client sends
for an https:// URL) is recorded and refused with 502: enough to prove the client went through
the proxy without a TLS origin.
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.parse
from dataclasses import dataclass, field


@dataclass
class ForwardProxy:
    seen: list[tuple[str, str]] = field(default_factory=list)  # (method, request target)
    _server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    async def start(self) -> ForwardProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            method, target, _version = request_line.split(" ", 2)
            self.seen.append((method, target))
            if method == "CONNECT":
                writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                return
            headers = [
                h for h in header_lines if h and not h.lower().startswith(("proxy-", "connection:"))
            ]
            length = next(
                (
                    int(h.split(":", 1)[1])
                    for h in headers
                    if h.lower().startswith("content-length:")
                ),
                0,
            )
            body = await reader.readexactly(length)
            url = urllib.parse.urlsplit(target)
            origin_reader, origin_writer = await asyncio.open_connection(
                url.hostname, url.port or 80
            )
            path = url.path + (f"?{url.query}" if url.query else "")
            origin_writer.write(
                f"{method} {path} HTTP/1.1\r\n".encode()
                + "".join(f"{h}\r\n" for h in [*headers, "Connection: close"]).encode("latin-1")
                + b"\r\n"
                + body
            )
            await origin_writer.drain()
            writer.write(await origin_reader.read())  # the origin closes after its answer
            origin_writer.close()
        except (OSError, ValueError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(OSError):
                await writer.drain()
            writer.close()
