"""`AsyncSharedStore`: a shmstore server's client on asyncio, over the same wire.

Requests and answers are the frames and msgpack messages `backends.wire` defines, read
and written on non-blocking sockets with the event loop's readiness callbacks
(``add_reader``/``add_writer``) and ``recvmsg``/``sendmsg``, so that on a unix socket the
data plane's descriptors (SCM_RIGHTS) pass as they do for `SharedStore`: asyncio's
streams cannot carry them.  A connection is opened by `wire.handshake` (the stdlib's HMAC
challenge, the greeting checks, the data-plane negotiation, the client's registration)
on a worker thread, then handed to the loop: the handshake is written once, and costs a
thread hop only when the pool opens a connection.

A call takes an idle connection from the store's pool (at most ``max_connections`` are
open; tasks beyond that wait for one), and gives it back when the answer is in.  A call
that fails, times out or is cancelled while its request or answer is under way discards
its connection: it is never returned to the pool out of step.
"""

from __future__ import annotations

import array
import asyncio
import functools
import os
import socket
import threading
import weakref
from collections.abc import Coroutine
from typing import Any

from ..backends.shared import ANSWERS, BLOCKING_OPS, answer, client_settings
from ..backends.wire import (
    _ANCILLARY,
    _BIG,
    _CLOEXEC,
    _HEADER,
    CHANNEL_BUFFER,
    CLIENT_KEEP,
    FDS_PER_SEND,
    _default,
    _header,
    _Incoming,
    _new_packer,
    _Outgoing,
    handshake,
    pack,
    translate,
    unpack,
)
from ..core import segment
from ..core.backend import ANSWERS_RECORDS, ROLE_WORKER
from ..core.codec import MsgpackCodec
from ..core.config import DEFAULT_TIMEOUT
from ..core.errors import StoreUnavailable
from ..core.validate import count
from .store import AsyncStore

__all__ = ["DEFAULT_MAX_CONNECTIONS", "AsyncChannel", "AsyncSharedStore"]

#: How many connections an `AsyncSharedStore` opens at most (tasks beyond wait for one).
DEFAULT_MAX_CONNECTIONS = 16

def _expire(waiter: asyncio.Future[None]) -> None:
    """A wait's deadline passed: the call fails with `TimeoutError`, as a socket's does."""
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class AsyncChannel:
    """One connection to the server on the event loop: framed msgpack messages, and the
    descriptors of memory segments riding on their first bytes when it passes them.

    It speaks what `backends.wire.Channel` speaks (the same frames, packer hooks and
    descriptor rules), awaiting readiness where that one blocks.

    Parameters:
        sock: an authenticated socket in the server's request loop (taken over).
        passes_fds: both ends agreed to pass descriptors (the data plane).
    """

    def __init__(self, sock: socket.socket, *, passes_fds: bool) -> None:
        sock.setblocking(False)
        self._sock = sock
        self.fd = sock.fileno()
        self._loop = asyncio.get_running_loop()
        self.passes_fds = passes_fds
        self._out = _Outgoing() if passes_fds else None
        self._in = _Incoming(segment.map_descriptor) if passes_fds else None
        self._packer = self._new_packer()
        self._buf = bytearray(CHANNEL_BUFFER)
        self._view = memoryview(self._buf)
        self._start = self._end = 0
        self._with_fds = False
        self._waiter: asyncio.Future[None] | None = None
        #: The loop time by which the call under way must be done (None: no bound).
        self._deadline: float | None = None
        self.closed = False

    def _new_packer(self) -> Any:
        return _new_packer(_default if self._out is None else self._out)

    async def request(self, message: object, fds: bool, timeout: float | None = None) -> Any:
        """Send ``message``, then read and decode one answer (``fds``: whether it may
        carry descriptors, as for `Channel.recv`), within ``timeout`` seconds.

        The bound is kept where the call waits for the socket (`_ready`): a call whose
        answer is there when it reads pays for no timer (a context manager per call cost
        about a tenth of a 1 KiB round trip).

        Raises:
            TimeoutError: the socket was not ready in time (the channel is then out of
                step: its owner discards it).
        """
        self._deadline = None if timeout is None else self._loop.time() + timeout
        await self.send_message(message)
        data = await self.recv(fds)
        incoming = self._in
        if incoming is None:
            return unpack(data)
        return incoming.unpack(data)

    # -- readiness ----------------------------------------------------------------------

    async def _ready(self, writing: bool) -> None:
        """Until the socket is readable (or writable); `OSError` if closed meanwhile."""
        if self.closed:
            raise OSError("the connection was closed")
        loop = self._loop
        deadline = self._deadline
        if deadline is not None and loop.time() >= deadline:
            raise TimeoutError
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiter = waiter
        add, remove = ((loop.add_writer, loop.remove_writer) if writing
                       else (loop.add_reader, loop.remove_reader))
        add(self.fd, _wake, waiter)
        timer = None if deadline is None else loop.call_at(deadline, _expire, waiter)
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()
            if not self.closed:
                remove(self.fd)

    # -- sending ------------------------------------------------------------------------

    async def send_message(self, message: object) -> None:
        """Encode and send one message, with its segments' descriptors (`Channel.send_message`)."""
        packer, out = self._packer, self._out
        size = 0
        try:
            packer.pack(message)
            with packer.getbuffer() as view:
                size = len(view)
                fds = list(out.fds) if out is not None else []
                # Copied out of the packer's buffer: a write that waits must not hold a
                # view of it (nor may the loop run another task's pack into it).
                data = _header(size) + bytes(view)
            if fds:
                await self._send_fds(data, fds)
            else:
                await self._write([data])
        except BaseException:
            self._packer = self._new_packer()
            raise
        finally:
            if out is not None:
                out.fds.clear()
        packer.reset()
        if size > CLIENT_KEEP:
            self._packer = self._new_packer()

    async def _write(self, chunks: list[bytes | memoryview]) -> None:
        fd = self.fd
        while chunks:
            try:
                sent = os.writev(fd, chunks)
            except (BlockingIOError, InterruptedError):
                await self._ready(writing=True)
                continue
            while chunks and sent >= len(chunks[0]):
                sent -= len(chunks[0])
                chunks.pop(0)
            if sent:
                chunks[0] = memoryview(chunks[0])[sent:]

    async def _send_fds(self, message: bytes, fds: list[int]) -> None:
        """`FDS_PER_SEND` descriptors on each of the message's first bytes, in order, as
        `Channel` sends them; then the rest."""
        view = memoryview(message)
        groups = [fds[i:i + FDS_PER_SEND] for i in range(0, len(fds), FDS_PER_SEND)]
        at = 0
        for index, group in enumerate(groups):
            part = view[at:] if index == len(groups) - 1 else view[at:at + 1]
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", group))]
            while True:
                try:
                    at += self._sock.sendmsg([part], rights)
                    break
                except (BlockingIOError, InterruptedError):
                    await self._ready(writing=True)
        if at < len(view):
            await self._write([view[at:]])

    # -- receiving ------------------------------------------------------------------------

    async def _read(self, view: memoryview) -> int:
        sock, incoming = self._sock, self._in
        while True:
            try:
                if not self._with_fds or incoming is None:
                    return sock.recv_into(view)
                n, ancillary, flags, _ = sock.recvmsg_into([view], _ANCILLARY, _CLOEXEC)
                if ancillary or flags:
                    incoming.take(ancillary, flags)
                return n
            except (BlockingIOError, InterruptedError):
                await self._ready(writing=False)

    async def _fill(self, need: int) -> None:
        if self._start and self._start + need > len(self._buf):
            leftover = self._end - self._start
            self._buf[:leftover] = self._buf[self._start:self._end]
            self._start, self._end = 0, leftover
        while self._end - self._start < need:
            n = await self._read(self._view[self._end:])
            if not n:
                raise EOFError
            self._end += n

    async def recv(self, fds: bool = True) -> memoryview | bytearray:
        """Receive one message (a view valid until the next `recv`; `Channel.recv`)."""
        self._with_fds = fds
        if self._start == self._end:
            self._start = self._end = 0
        await self._fill(4)
        size = _HEADER.unpack_from(self._buf, self._start)[0]
        header = 4
        if size == -1:
            await self._fill(12)
            size = _BIG.unpack_from(self._buf, self._start + 4)[0]
            header = 12
        total = header + size
        if total <= len(self._buf):
            await self._fill(total)
            start = self._start
            self._start = start + total
            return self._view[start + header:start + total]
        start = self._start + header
        out = bytearray(size)
        have = self._end - start
        out[:have] = self._buf[start:self._end]
        self._start = self._end = 0
        with memoryview(out) as view:
            while have < size:
                n = await self._read(view[have:])
                if not n:
                    raise EOFError
                have += n
        return out

    def pending(self) -> bool:
        """True if bytes of a next message are already buffered."""
        return self._end > self._start

    def send_nowait(self, message: object) -> None:
        """Send a small message if the socket takes it now, else not at all (a goodbye
        that must never wait)."""
        data = pack(message)
        try:
            self._sock.send(_header(len(data)) + data)
        except OSError:
            pass

    def close(self) -> None:
        """Close the connection; a read or write waiting on it raises `OSError`."""
        if self.closed:
            return
        self.closed = True
        waiter, self._waiter = self._waiter, None
        if not self._loop.is_closed():
            self._loop.remove_reader(self.fd)
            self._loop.remove_writer(self.fd)
        if waiter is not None and not waiter.done():
            waiter.set_exception(OSError("the connection was closed"))
        if self._in is not None:
            self._in.drop()
        self._sock.close()


    def __del__(self) -> None:
        # A channel dropped unclosed (its store dropped with its event loop) closes its
        # socket quietly; no call can be waiting on it, or it would still be referenced.
        if not getattr(self, "closed", True):
            self.closed = True
            self._sock.close()


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _close_handshake(future: asyncio.Future[Any]) -> None:
    """A handshake whose caller was cancelled: close what it opened."""
    if not future.cancelled() and future.exception() is None:
        future.result()[0].close()


class AsyncSharedStore(AsyncStore):
    """A store whose checkpoints live in a shmstore server process, on asyncio.

    The same server, URL, key, errors and timeouts as `SharedStore` (and the data plane
    on a unix socket); a bounded pool of connections serves concurrent tasks.  Open it in
    the event loop that uses it (`aio.connect`); close it with ``await store.aclose()``
    or ``async with``.

    Parameters:
        url: the server's URL (``unix:///...`` or ``tcp://host:port``).
        authkey: the server's key, bytes or hex.
        timeout: seconds any call may take before `StoreTimeout` (a blocking wait adds
            its own length).
        name: how this client is named in the server's thread names.
        codec: encodes states and metadata.
        data_plane, data_plane_threshold, copy_on_load, role: as for `SharedStore`.
        max_connections: the most connections open at once; tasks beyond wait for one.

    Raises:
        ConfigError: a bad URL, authkey, timeout, threshold or connection count.
    """

    def __init__(
        self,
        url: str,
        *,
        authkey: bytes | str,
        timeout: float = DEFAULT_TIMEOUT,
        name: str | None = None,
        codec: MsgpackCodec | None = None,
        data_plane: bool = True,
        data_plane_threshold: int = segment.DEFAULT_THRESHOLD,
        copy_on_load: bool = False,
        role: str = ROLE_WORKER,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        super().__init__(codec=codec)
        self._address, self._authkey, self.timeout, plane, _threshold, self.role = \
            client_settings(url, authkey=authkey, timeout=timeout, data_plane=data_plane,
                            data_plane_threshold=data_plane_threshold, role=role)
        if plane is not None:
            self._plane_threshold = plane
        self.url = self._address.url
        self.copy_on_load = bool(copy_on_load)
        self.max_connections = count(max_connections, "max_connections", minimum=1)
        self.name = name or f"aio-client-{os.getpid()}"
        self._idle: list[AsyncChannel] = []
        self._conns: set[AsyncChannel] = set()
        self._slots = asyncio.Semaphore(self.max_connections)
        self._closed = False
        # Not ``self``: a store in a cycle would keep its sockets open until the cyclic
        # collector ran, and then close them in no set order (unclosed, warning).
        self._backend = _Pooled(self)

    def __repr__(self) -> str:
        return f"<AsyncSharedStore {self.url}>"

    @property
    def connections(self) -> int:
        """How many connections are open (idle or in a call)."""
        return len(self._conns)

    def _closed_error(self, running: str | None = None) -> StoreUnavailable:
        during = "" if running is None else f" while its {running!r} call ran"
        return StoreUnavailable(f"this store was closed{during} ({self.url})",
                                address=self.url)

    async def _open(self) -> AsyncChannel:
        loop = asyncio.get_running_loop()
        opening = loop.run_in_executor(None, functools.partial(
            handshake, self._address, self._authkey, timeout=self.timeout,
            name=f"{self.name}/{threading.current_thread().name}",
            data_plane=self._plane_threshold is not None, role=self.role))
        try:
            conn, passes_fds = await asyncio.shield(opening)
        except asyncio.CancelledError:
            opening.add_done_callback(_close_handshake)
            raise
        try:
            sock = socket.socket(fileno=os.dup(conn.fileno()))
        except OSError as exc:
            raise translate(exc, self.url, self.timeout) from None
        finally:
            conn.close()
        channel = AsyncChannel(sock, passes_fds=passes_fds)
        if self._closed:
            channel.close()
            raise self._closed_error()
        self._conns.add(channel)
        return channel

    def _discard(self, conn: AsyncChannel) -> None:
        self._conns.discard(conn)
        conn.close()

    async def _request(self, op: str, args: tuple[Any, ...]) -> Any:
        """Run ``op`` in the server: one round trip on a pooled connection; the answer
        rebuilt as `SharedStore`'s backend rebuilds it."""
        if self._closed:
            raise self._closed_error()
        async with self._slots:
            conn = self._idle.pop() if self._idle else await self._open()
            slot = BLOCKING_OPS.get(op)
            bound = self.timeout if slot is None else self.timeout + args[slot]
            try:
                kind, result = await conn.request((op, args), op in ANSWERS_RECORDS, bound)
            except BaseException as exc:
                # Cancelled, timed out or failed mid-call: out of step, never reused.
                self._discard(conn)
                if self._closed and isinstance(exc, OSError):
                    raise self._closed_error(op) from None
                raise translate(exc, self.url, bound) from None
            if self._closed:
                self._discard(conn)
            else:
                self._idle.append(conn)
        rebuild = ANSWERS.get(op)
        value = answer(kind, result, self.url)
        return value if rebuild is None else rebuild(value)

    def _is_closed(self) -> bool:
        return self._closed

    async def aclose(self) -> None:
        """Close every connection; calls under way raise `StoreUnavailable`, and so do
        later ones.  The server hears that this process is done, without a wait."""
        if not self._closed and self._idle:
            self._idle[-1].send_nowait(("register_client",
                                        (os.getpid(), self.name, self.role, True)))
        self.close_now()

    def close_now(self) -> None:
        """Close every connection at once, from any thread once its loop has ended (no
        goodbye to the server: `aclose` says it)."""
        self._closed = True
        conns, self._conns = self._conns, set()
        self._idle = []
        for conn in conns:
            conn.close()


class _Pooled:
    """`AsyncSharedStore`'s `AsyncBackend`: each call one `AsyncSharedStore._request`."""

    __slots__ = ("_store",)

    def __init__(self, store: AsyncSharedStore) -> None:
        self._store = weakref.proxy(store)

    def call(self, op: str, *args: Any) -> Coroutine[Any, Any, Any]:
        coro: Coroutine[Any, Any, Any] = self._store._request(op, args)
        return coro  # the request's own coroutine: a frame less per call
