"""Idle upstream connections of the API relay, kept for the next request (keep-alive).

A direct CLI reuses its HTTPS connection to the API from turn to turn; a relay that
dialled per request would add a TCP + TLS handshake to every turn. The pool keeps a
bounded number of idle connections per upstream (scheme, host, port, and whether the
dial went through the box's resolver); the TLS context is the relay's own, one per pool.

What keeps one run's bytes out of another's:

- The relay gives a connection back only after the response was read exactly to its
  end (Content-Length or the last chunk), the whole request body was sent, and neither
  side asked to close (api_relay.py decides; everything else is closed).
- While idle, a connection is watched: a byte or an EOF from the upstream (it closed
  the connection, or sent something nobody asked for) and the connection is dropped.
  The watch is cancelled before a read consumes anything, so a connection taken from
  the pool has an empty buffer.
- Idle longer than `idle_timeout`: closed. More than `max_idle` per upstream: the
  oldest is closed.

The credential is a header of each request, so connections are shared by runs.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from .egress import _close

POOL_MAX_IDLE = 8
POOL_IDLE_TIMEOUT = 30.0


@dataclass(eq=False)
class PooledConnection:
    """An upstream connection: `reused` is True when it came from the pool."""

    key: Hashable
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    reused: bool = False
    _watch: asyncio.Task[bytes] | None = field(default=None, repr=False)
    _expiry: asyncio.TimerHandle | None = field(default=None, repr=False)
    _taken: bool = field(default=False, repr=False)


class UpstreamPool:
    def __init__(
        self, max_idle: int = POOL_MAX_IDLE, idle_timeout: float = POOL_IDLE_TIMEOUT
    ) -> None:
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self._idle: dict[Hashable, list[PooledConnection]] = {}
        self._closing: set[asyncio.Task[Any]] = set()
        # Counters, for tests and `info`: connections dialled, and requests that reused one.
        self.dialled = 0
        self.reuses = 0

    def idle_count(self, key: Hashable | None = None) -> int:
        if key is not None:
            return len(self._idle.get(key, ()))
        return sum(len(v) for v in self._idle.values())

    async def take(self, key: Hashable) -> PooledConnection | None:
        """The most recently used idle connection to `key` that is still good, or None."""
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not idle:
                self._idle.pop(key, None)
            conn._taken = True
            if conn._expiry is not None:
                conn._expiry.cancel()
                conn._expiry = None
            watch, conn._watch = conn._watch, None
            if watch is not None and not watch.done():
                watch.cancel()
                # Wait for the cancellation to land: the reader is free only then (and a
                # cancelled read has consumed nothing).
                await asyncio.wait([watch])
                if watch.cancelled() and not conn.writer.is_closing():
                    conn.reused = True
                    self.reuses += 1
                    return conn
            self._drop(conn)
        return None

    def put(self, conn: PooledConnection) -> None:
        """Keep `conn` for the next request to its upstream (the caller read its response
        to the end). Closed at once when it cannot be kept."""
        if self.max_idle <= 0 or conn.writer.is_closing() or conn.reader.at_eof():
            self._drop(conn)
            return
        conn._taken = False
        conn.reused = False
        idle = self._idle.setdefault(conn.key, [])
        while len(idle) >= self.max_idle:
            oldest = idle.pop(0)
            oldest._taken = True
            self._cancel_watch(oldest)
            self._drop(oldest)
        loop = asyncio.get_running_loop()
        conn._watch = asyncio.ensure_future(conn.reader.read(1))
        conn._watch.add_done_callback(functools.partial(self._watch_ended, conn))
        conn._expiry = loop.call_later(self.idle_timeout, self._expire, conn)
        idle.append(conn)

    def release(self, conn: PooledConnection) -> None:
        """Close a connection that is not going back to the pool."""
        self._drop(conn)

    async def aclose(self) -> None:
        """Close every idle connection (agent shutdown)."""
        for idle in list(self._idle.values()):
            for conn in idle:
                conn._taken = True
                self._cancel_watch(conn)
                self._drop(conn)
        self._idle.clear()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    # -- internals -------------------------------------------------------------------
    def _watch_ended(self, conn: PooledConnection, _task: asyncio.Task[bytes]) -> None:
        """The idle watch saw data or EOF (or failed): the connection is done."""
        if not _task.cancelled():
            _task.exception()  # retrieved: a reset while idle is an expected end
        if conn._taken:
            return  # cancelled by take() / aclose(), which decide themselves
        self._remove(conn)
        self._drop(conn)

    def _expire(self, conn: PooledConnection) -> None:
        conn._expiry = None
        if conn._taken:
            return
        self._remove(conn)
        conn._taken = True
        self._cancel_watch(conn)
        self._drop(conn)

    def _remove(self, conn: PooledConnection) -> None:
        idle = self._idle.get(conn.key)
        if idle is not None and conn in idle:
            idle.remove(conn)
            if not idle:
                self._idle.pop(conn.key, None)

    @staticmethod
    def _cancel_watch(conn: PooledConnection) -> None:
        if conn._expiry is not None:
            conn._expiry.cancel()
            conn._expiry = None
        if conn._watch is not None:
            conn._watch.cancel()
            conn._watch = None

    def _drop(self, conn: PooledConnection) -> None:
        task = asyncio.ensure_future(_close(conn.writer))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
