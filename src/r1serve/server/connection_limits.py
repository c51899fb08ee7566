"""What one HTTP connection may cost the server before a request is even routed.

uvicorn's C parser (httptools) takes headers of any size and count, and waits forever for
a connection that never sends a request or sends its headers a byte at a time: a few
hundred idle or slow clients then hold sockets (file descriptors) and memory for good. The
protocol below bounds each connection as nginx does:

    connection opens / a request starts ──(header_timeout_s)──> headers complete
        too slow: 408 if a request had begun (else closed quietly)
    request line + headers: at most max_header_bytes in all and max_headers fields: else 431
    response sent ──(keep_alive_s idle)──> closed (uvicorn's keep-alive timer)

The app itself bounds bodies (errors.BodyLimit, 413).
"""
from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from r1serve.errors import InvalidRequestError
from r1serve.server.errors import error_body

log = logging.getLogger("r1serve.server")
LINGER_S = 2.0  # how long a refused connection is still read (and dropped) before it is closed


@dataclass(frozen=True)
class ConnectionLimits:
    max_header_bytes: int = 64 * 2**10  # request line + every header name and value
    max_headers: int = 100
    header_timeout_s: float = 30.0  # from a connection's first moment (or a request's first byte) to its headers' end
    keep_alive_s: float = 5.0  # an idle connection between requests

    def __post_init__(self) -> None:
        for name in ("max_header_bytes", "max_headers", "header_timeout_s", "keep_alive_s"):
            if not getattr(self, name) > 0:
                raise InvalidRequestError(f"{name}={getattr(self, name)} must be > 0")

    def protocol(self) -> functools.partial:
        """The protocol class for uvicorn.Config(http=...), bound to these limits."""
        return functools.partial(LimitedHttpProtocol, limits=self)


class _HeadersTooLarge(Exception):
    pass


class LimitedHttpProtocol(HttpToolsProtocol):
    def __init__(self, *args, limits: ConnectionLimits, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._header_bytes = self._header_count = 0
        self._header_timer: asyncio.TimerHandle | None = None
        self._request_begun = False
        self._refusal: tuple[int, str] | None = None  # why the parser was stopped

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()  # a connection that never sends a request is closed too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = self._header_count = 0
        self._request_begun = True
        self._arm_header_timer()

    def on_url(self, url: bytes) -> None:
        self._count(len(url), 0)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value), 1)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm_header_timer()
        self._request_begun = False
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        if self._refusal is None:
            super().data_received(data)
        # else: refused, lingering: what the client still sends is read and dropped

    def send_400_response(self, msg: str) -> None:
        # uvicorn answers any parser stop with a 400; a stop of ours has its own status.
        if self._refusal is None:
            return super().send_400_response(msg)
        self._refuse(*self._refusal)

    def _count(self, size: int, fields: int) -> None:
        self._header_bytes += size
        self._header_count += fields
        lim = self.limits
        if self._header_bytes > lim.max_header_bytes or self._header_count > lim.max_headers:
            self._refusal = (431, f"the request's headers are too large: at most {lim.max_header_bytes} bytes "
                                  f"and {lim.max_headers} fields (request line included)")
            raise _HeadersTooLarge  # httptools stops parsing; uvicorn calls send_400_response

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._headers_timed_out)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined request waits, unread, behind a response still being written: not its fault.
            self._arm_header_timer()
            return
        if not self._request_begun:  # idle since it opened: nothing to answer
            self.transport.close()
            return
        self._refusal = (408, f"the request's headers did not arrive within {self.limits.header_timeout_s:g} s")
        self._refuse(*self._refusal)

    def _refuse(self, status: int, message: str) -> None:
        body = orjson.dumps(error_body(status, message))
        head = (f"HTTP/1.1 {status} {'Request Header Fields Too Large' if status == 431 else 'Request Timeout'}\r\n"
                f"content-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n")
        self.transport.write(head.encode("ascii") + body)
        # A lingering close, as nginx does: closing with the rest of the client's request
        # unread would reset the connection and could lose the answer on its way.
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)
