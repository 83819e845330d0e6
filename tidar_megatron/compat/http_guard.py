"""A request-header timeout and a hard connection cap for uvicorn's h11 protocol.

Written for uvicorn 0.55.0 (h11 0.16.0).  uvicorn's `timeout_keep_alive` runs only between requests and is
cancelled by the first byte of the next one, so a client that opens a connection and never finishes its
headers holds a socket (and a file descriptor) for ever; enough of them and the server stops accepting.
`limit_concurrency` answers 503 only once a request's headers are complete.  A request h11 cannot parse (headers
past its 16 KiB limit, a malformed request line) gets uvicorn's plain-text 400; the guard answers it with the
server's error body instead (OpenAI's error object).  This subclass uses `H11Protocol`'s private state (`conn`,
`cycle`, `connections`, `transport`, `on_response_complete`) and overrides `send_400_response`.
"""

from __future__ import annotations

import asyncio
import json
from typing import Callable

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def guarded_h11(header_timeout_s: float, max_connections: int,
                error_body: Callable[[int, str], dict] | None = None) -> type[H11Protocol]:
    """An H11Protocol class (uvicorn.Config(http=...)) that closes a connection whose request headers are
    not complete `header_timeout_s` after it opened or after its last response, and closes new
    connections beyond `max_connections` at once.  `error_body(status, message)`: the JSON of the 400 for
    a request that cannot be parsed (default: uvicorn's plain text)."""

    class GuardedH11Protocol(H11Protocol):
        header_deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport):
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.close()
                return
            self._arm()

        def on_response_complete(self):
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc):
            if self.header_deadline is not None:
                self.header_deadline.cancel()
            super().connection_lost(exc)

        def send_400_response(self, msg: str):
            if error_body is None:
                return super().send_400_response(msg)
            body = json.dumps(error_body(400, f"{msg} (not a request HTTP/1.1 could parse: its request line, "
                                              "headers over 16 KiB, or its body's framing)")).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                          h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

        def _arm(self):
            if self.header_deadline is not None:
                self.header_deadline.cancel()
            self.header_deadline = self.loop.call_later(header_timeout_s, self._expire)

        def _expire(self):
            # Still waiting for a request's headers (h11's IDLE: no complete request line and headers yet).
            waiting = self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)
            if waiting and not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol
