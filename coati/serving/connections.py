"""Connection limits of the reward server's uvicorn: a deadline on each request's headers (slow-header clients)."""

import asyncio


def bounded_h11_protocol(header_timeout: float) -> type:
    """uvicorn's h11 protocol with a deadline on each request's headers: a connection that has not sent a whole
    request head within ``header_timeout`` seconds of opening (or of its previous response) is closed. uvicorn
    bounds idle keep-alive connections but not one that trickles its headers a byte at a time, so a few hundred
    such clients would otherwise hold their connections open for as long as they like."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class BoundedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def _in_request(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(header_timeout, self._head_too_slow)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_too_slow(self) -> None:
            self._head_timer = None
            if not self._in_request() and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:  # noqa: D102
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:  # noqa: D102
            super().handle_events()
            if self._in_request():
                self._disarm()

        def on_response_complete(self) -> None:  # noqa: D102
            super().on_response_complete()
            if not self.transport.is_closing() and not self._in_request():
                self._arm()

        def connection_lost(self, exc) -> None:  # noqa: D102
            self._disarm()
            super().connection_lost(exc)

    return BoundedH11Protocol
