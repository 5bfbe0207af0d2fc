"""`AsyncSharedStore`: a shmstore server's client on asyncio, over the same wire.

Requests and answers are the frames and msgpack messages `backends.wire` defines, read
and written on non-blocking sockets with the event loop's readiness callbacks
(``add_reader``/``add_writer``) and ``recvmsg``/``sendmsg``, so that on a unix socket the
data plane's descriptors (SCM_RIGHTS) pass as they do for `SharedStore`: asyncio's
streams cannot carry them.  A connection is opened by `wire.handshake` (the stdlib's HMAC
challenge, the greeting checks, the data-plane negotiation, the client's registration)
on a worker thread, then handed to the loop: the handshake is written once, and costs a
thread hop only when the pool opens a connection.

Calls are pipelined: a connection carries many at once, each request written as it is
made and each answer delivered, in order, by the connection's reader callback to its
call's future (`AsyncChannel`).  So a cancelled call leaves its connection in step (its
answer is dropped when it comes), a request is never half written whatever its task
does, and many tasks need a few connections: another opens only when each open one has
`PIPELINE_DEPTH` calls in flight.  A blocking wait takes a connection of its own, which
a cancelled or timed-out wait closes (the server may still be waiting on it).
"""

from __future__ import annotations

import array
import asyncio
import functools
import os
import socket
import threading
import weakref
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

from ..backends.shared import ANSWERS, BLOCKING_OPS, answer, client_settings
from ..backends.wire import (
    _HEADER,
    CHANNEL_BUFFER,
    CLIENT_KEEP,
    FDS_PER_SEND,
    LARGE_START,
    SMALL_MESSAGE,
    _default,
    _header,
    _Incoming,
    _new_packer,
    _Outgoing,
    frame_header,
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

__all__ = ["DEFAULT_MAX_CONNECTIONS", "PIPELINE_DEPTH", "AsyncChannel", "AsyncSharedStore"]

#: How many pipelined connections an `AsyncSharedStore` opens at most (and how many
#: blocking waits it runs at once).
DEFAULT_MAX_CONNECTIONS = 16
#: How many calls a pipelined connection carries before another is opened for more.
PIPELINE_DEPTH = 32

class _Call:
    """One request in flight on an `AsyncChannel`: who waits for its answer, by when."""

    __slots__ = ("deadline", "future", "records")

    def __init__(self, future: asyncio.Future[Any], deadline: float | None,
                 records: bool) -> None:
        self.future = future
        self.deadline = deadline
        self.records = records


class AsyncChannel:
    """One connection to the server on the event loop, pipelined: requests go out as
    they are made, their answers come back in the same order (the server answers a
    connection's requests one after the other), and each lands in its call's future.

    It speaks what `backends.wire.Channel` speaks (the same frames, packer hooks and
    descriptor rules).  Its socket stays registered with the loop for reading while it
    is open, and the reader callback decodes every whole answer a read brings: a call
    costs a write, and a share of a read and of a loop turn, with no registration of
    its own.  Writes the socket cannot take at once are queued, in order, and sent when
    it is writable; so a call never leaves half a request behind, whatever happens to
    its task.

    A cancelled call's answer is dropped when it comes (the channel stays in step).  A
    call whose deadline passes fails with `TimeoutError` and retires the channel: it
    takes no new calls, and closes once no call on it waits.  End of stream or a socket
    error fails every call on it and closes it.

    Parameters:
        sock: an authenticated socket in the server's request loop (taken over).
        passes_fds: both ends agreed to pass descriptors (the data plane).
        on_close: called with the channel once it has closed.
    """

    def __init__(self, sock: socket.socket, *, passes_fds: bool,
                 on_close: Callable[[AsyncChannel], None] | None = None) -> None:
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
        self._large: bytearray | None = None  # an answer too big for the buffer
        self._large_size = self._large_have = 0
        #: The calls whose answers are due, in the order they were sent.
        self.calls: deque[_Call] = deque()
        self._records = 0  # of them, how many may carry descriptors
        self._writes: deque[tuple[memoryview, list[int] | None]] = deque()
        self._cork: bytearray | None = None  # requests made in this turn of the loop
        self._timer: asyncio.TimerHandle | None = None
        self._on_close = on_close
        #: Takes no new calls (one timed out); closes once none waits.
        self.retired = False
        self.closed = False
        self._loop.add_reader(self.fd, self._readable)

    def _new_packer(self) -> Any:
        return _new_packer(_default if self._out is None else self._out)

    @property
    def in_flight(self) -> int:
        """How many calls wait for their answers on this channel."""
        return len(self.calls)

    def call(self, message: object, records: bool, timeout: float | None) -> asyncio.Future[Any]:
        """Send ``message`` now (or queue what the socket cannot take yet); the future of
        its decoded answer, failing with `TimeoutError` after ``timeout`` seconds.

        ``records``: whether the answer may carry descriptors (`ANSWERS_RECORDS`).

        Raises:
            OSError: the channel is closed, or the socket failed (then it is closed).
        """
        if self.closed:
            raise OSError("the connection was closed")
        self._send_message(message)
        loop = self._loop
        future = loop.create_future()
        deadline = None if timeout is None else loop.time() + timeout
        self.calls.append(_Call(future, deadline, records))
        if records:
            self._records += 1
        if deadline is not None and self._timer is None:
            self._timer = loop.call_at(deadline, self._expire_due)
        return future

    # -- deadlines ------------------------------------------------------------------------

    def _expire_due(self) -> None:
        """The timer: fail the calls whose deadline passed, and set it for the next one.

        One timer per channel, not one per call: it is set for the oldest call's
        deadline, and on firing moves on to the oldest call still waiting (answers come
        long before a deadline, so it fires about once a timeout, not once a call).
        """
        self._timer = None
        if self.closed:
            return
        now = self._loop.time()
        upcoming: float | None = None
        expired = False
        for call in self.calls:
            if call.future.done() or call.deadline is None:
                continue
            if call.deadline <= now:
                call.future.set_exception(TimeoutError())
                expired = True
            elif upcoming is None or call.deadline < upcoming:
                upcoming = call.deadline
        if expired:
            self.retired = True
            self._close_if_unwaited()
        if upcoming is not None and not self.closed:
            self._timer = self._loop.call_at(upcoming, self._expire_due)

    def _close_if_unwaited(self) -> None:
        if self.retired and all(call.future.done() for call in self.calls):
            self.close()

    # -- sending ------------------------------------------------------------------------

    def _send_message(self, message: object) -> None:
        """Encode one message and send it, or queue it behind what waits to be sent."""
        packer, out = self._packer, self._out
        try:
            packer.pack(message)
        except BaseException:
            self._packer = self._new_packer()  # whatever it holds half-packed goes with it
            if out is not None:
                out.fds.clear()
            raise
        if (out is None or not out.fds) and not self._writes:
            with packer.getbuffer() as view:
                size = len(view)
                if size <= SMALL_MESSAGE:
                    frame = None
                    if self._cork is not None or self.calls:
                        # Calls are in flight, so the server is busy with them: the
                        # request waits for the end of this turn of the loop, and goes in
                        # one write with the others the tasks of this turn make.
                        if self._cork is None:
                            self._cork = bytearray()
                            self._loop.call_soon(self._uncork)
                        self._cork += _HEADER.pack(size)
                        self._cork += view
                    else:  # an idle connection: one write, now
                        frame = _HEADER.pack(size) + view
            if size <= SMALL_MESSAGE:
                packer.reset()
                if frame is not None:
                    self._queue([(memoryview(frame), None)])
                return
        size = 0
        try:
            with packer.getbuffer() as view:
                size = len(view)
                fds = list(out.fds) if out is not None else None
                # Copied out of the packer's buffer: a queued write must not hold a view
                # of it.
                data = memoryview(_header(size) + bytes(view))
        finally:
            if out is not None:
                out.fds.clear()
        packer.reset()
        if size > CLIENT_KEEP:  # the packer's buffer must not stay as big as a rare one
            self._packer = self._new_packer()
        writes: list[tuple[memoryview, list[int] | None]] = []
        if self._cork is not None:  # what this turn's calls sent so far goes first
            writes.append((memoryview(self._cork), None))
            self._cork = None
        if fds:
            # `FDS_PER_SEND` descriptors on each of the message's first bytes, in order,
            # as `Channel` sends them; then the rest.
            groups = [fds[i:i + FDS_PER_SEND] for i in range(0, len(fds), FDS_PER_SEND)]
            for index, group in enumerate(groups):
                last = index == len(groups) - 1
                writes.append((data[index:] if last else data[index:index + 1], group))
        else:
            writes.append((data, None))
        self._queue(writes)

    def _uncork(self) -> None:
        """The end of a loop turn: send the requests its calls made, in one write."""
        cork, self._cork = self._cork, None
        if cork is None or self.closed:
            return
        try:
            self._queue([(memoryview(cork), None)])
        except OSError:
            pass  # failed and closed: the calls waiting have the error

    def _queue(self, writes: list[tuple[memoryview, list[int] | None]]) -> None:
        """Send ``writes`` behind what waits to be sent: now, as far as the socket takes
        them, the rest when it is writable.

        Raises:
            OSError: the socket failed (the channel is then closed).
        """
        idle = not self._writes
        self._writes.extend(writes)
        if idle and not self._flush():
            self._loop.add_writer(self.fd, self._writable)

    def _flush(self) -> bool:
        """Send what is queued until the socket takes no more; True if all is sent.

        Raises:
            OSError: the socket failed (the channel is then closed).
        """
        writes, sock = self._writes, self._sock
        try:
            while writes:
                data, fds = writes[0]
                if fds:
                    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                    sent = sock.sendmsg([data], rights)
                else:
                    sent = os.write(self.fd, data)
                if sent < len(data):
                    writes[0] = (data[sent:], None)  # the descriptors went with the first
                else:
                    writes.popleft()
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            self.close(exc)
            raise
        return True

    def _writable(self) -> None:
        try:
            done = self._flush()
        except OSError:
            return  # failed and closed: the calls waiting have the error
        if done:
            self._loop.remove_writer(self.fd)

    # -- receiving ------------------------------------------------------------------------

    def _recv_into(self, view: memoryview) -> int:
        incoming = self._in
        if incoming is None:
            return self._sock.recv_into(view)
        # a recvmsg only while an answer due may carry descriptors
        return incoming.read(self._sock, view, self._records > 0)

    def _readable(self) -> None:
        """The loop's reader callback: one read, then every whole answer it completes."""
        try:
            large = self._large
            if large is not None:
                self._read_large(large)
                return
            n = self._recv_into(self._view[self._end:])
        except (BlockingIOError, InterruptedError):
            return
        except Exception as exc:  # OSError, or descriptors truncated
            self.close(exc)
            return
        if not n:
            self.close(EOFError())
            return
        self._end += n
        self._parse()

    def _read_large(self, out: bytearray) -> None:
        have, size = self._large_have, self._large_size
        if have == len(out):  # grown only once more bytes are there to fill it
            out += bytes(min(size, 2 * have) - have)
        with memoryview(out) as view:
            n = self._recv_into(view[have:size])
        if not n:
            self.close(EOFError())
            return
        self._large_have = have = have + n
        if have == size:
            self._large = None
            self._deliver(memoryview(out)[:size], 0)
            if not self.closed:
                self._parse()  # what came behind it in the buffer, if anything

    def _parse(self) -> None:
        buf = self._buf
        while not self.closed:
            start, avail = self._start, self._end - self._start
            frame = frame_header(buf, start, avail)
            if frame is None:
                break
            header, size = frame
            total = header + size
            if total > len(buf):  # read on into a buffer of its own
                have = avail - header
                out = bytearray(max(have, min(size, LARGE_START)))
                out[:have] = buf[start + header:self._end]
                self._start = self._end = 0
                self._large, self._large_size, self._large_have = out, size, have
                return
            if avail < total:
                break
            self._start = start + total
            self._deliver(self._view[start + header:start + total], self._end - self._start)
        leftover = self._end - self._start
        if not leftover:
            self._start = self._end = 0
        elif self._start:  # a message begun: move it to the front, where it has room
            buf[:leftover] = buf[self._start:self._end]
            self._start, self._end = 0, leftover

    def _deliver(self, data: memoryview, behind: int) -> None:
        """One whole answer, ``behind`` bytes read past it: decode it into the oldest
        call's future."""
        if not self.calls:
            self.close(ValueError("an answer came that no call asked for"))
            return
        call = self.calls.popleft()
        if call.records:
            self._records -= 1
        incoming = self._in
        # where this answer ends in the stream: what was read, less what came past it
        end = 0 if incoming is None else incoming.received - behind
        future = call.future
        if future.done():  # cancelled, or timed out: nobody reads it
            if incoming is not None:
                incoming.discard(end)
        else:
            try:
                value = unpack(data) if incoming is None or not incoming.fds \
                    else incoming.unpack(data, end)
            except Exception as exc:  # garbled: that call's error, in step
                future.set_exception(exc)
            else:
                future.set_result(value)
        if self.retired:
            self._close_if_unwaited()

    # -- ending ------------------------------------------------------------------------

    def send_nowait(self, message: object) -> None:
        """Send a small message if the socket takes it now and nothing is queued before
        it, else not at all (a goodbye that must never wait)."""
        if self.closed or self._writes or self._cork is not None:
            return
        data = pack(message)
        try:
            self._sock.send(_header(len(data)) + data)
        except OSError:
            pass

    def close(self, error: BaseException | None = None) -> None:
        """Close the connection; calls waiting on it fail with ``error`` (`OSError`
        unless given)."""
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        calls, self.calls = self.calls, deque()
        self._records = 0
        if not self._loop.is_closed():  # (a closed loop can wake no one)
            self._loop.remove_reader(self.fd)
            if self._writes:
                self._loop.remove_writer(self.fd)
            for call in calls:
                if not call.future.done():
                    call.future.set_exception(
                        error if error is not None else OSError("the connection was closed"))
        self._writes.clear()
        self._cork = None
        if self._in is not None:
            self._in.drop()
        self._sock.close()
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close(self)

    def __del__(self) -> None:
        # A channel dropped unclosed (its store dropped with its event loop) closes its
        # socket quietly; no call can be waiting on it, or it would still be referenced.
        if not getattr(self, "closed", True):
            self.closed = True
            self._sock.close()


def _close_handshake(future: asyncio.Future[Any]) -> None:
    """A handshake whose caller was cancelled: close what it opened."""
    if not future.cancelled() and future.exception() is None:
        future.result()[0].close()


class AsyncSharedStore(AsyncStore):
    """A store whose checkpoints live in a shmstore server process, on asyncio.

    The same server, URL, key, errors and timeouts as `SharedStore` (and the data plane
    on a unix socket).  Concurrent tasks share a few pipelined connections: each call
    is written at once, and answers come back in order, so 100 tasks cost a handful of
    sockets and server threads, not 100.  A blocking wait (``wait``, a ``claim`` that
    waits) takes a connection of its own while it waits, so it holds up no other call.
    Open it in the event loop that uses it (`aio.connect`); close it with
    ``await store.aclose()`` or ``async with``.

    Parameters:
        url: the server's URL (``unix:///...`` or ``tcp://host:port``).
        authkey: the server's key, bytes or hex.
        timeout: seconds any call may take before `StoreTimeout` (a blocking wait adds
            its own length).
        name: how this client is named in the server's thread names.
        codec: encodes states and metadata.
        data_plane, data_plane_threshold, copy_on_load, role: as for `SharedStore`.
        max_connections: the most pipelined connections calls share (another opens when
            each open one has `PIPELINE_DEPTH` calls in flight), and, apart from them,
            the most blocking waits at once (tasks beyond wait for one to end).

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
        self._shared: list[AsyncChannel] = []  # pipelined: every call but a blocking wait
        self._opening: asyncio.Future[AsyncChannel] | None = None  # one being opened
        self._idle: list[AsyncChannel] = []  # a blocking wait's own, between waits
        self._conns: set[AsyncChannel] = set()  # all of them
        self._slots = asyncio.Semaphore(self.max_connections)  # for blocking waits
        self._closed = False
        # Not ``self``: a store in a cycle would keep its sockets open until the cyclic
        # collector ran, and then close them in no set order (unclosed, warning).
        self._backend = _Pooled(self)
        # The channels are the loop's (their reader callbacks): a store dropped unclosed
        # closes them, or they would stay open as long as the loop runs.
        weakref.finalize(self, _close_all, self._conns)

    def __repr__(self) -> str:
        return f"<AsyncSharedStore {self.url}>"

    @property
    def connections(self) -> int:
        """How many connections are open (pipelined ones and blocking waits' own)."""
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
        if self._closed:
            sock.close()
            raise self._closed_error()
        channel = AsyncChannel(sock, passes_fds=passes_fds,
                               on_close=functools.partial(_forget, weakref.ref(self)))
        self._conns.add(channel)
        return channel

    def _forget(self, conn: AsyncChannel) -> None:
        """A channel closed (by the store, or because it broke or retired)."""
        self._conns.discard(conn)
        if conn in self._shared:
            self._shared.remove(conn)
        if conn in self._idle:
            self._idle.remove(conn)

    async def _pipelined(self) -> AsyncChannel:
        """The pipelined channel for a call when no open one has room (`_request` looks
        first): a new one if there may be another, else the least busy (the tasks that
        come while one opens go on the open ones)."""
        live = [conn for conn in self._shared if not conn.retired]
        if live and (self._opening is not None or len(self._shared) >= self.max_connections):
            return min(live, key=lambda conn: len(conn.calls))
        opening = self._opening
        if opening is None:
            opening = self._opening = asyncio.ensure_future(self._open_pipelined())
            opening.add_done_callback(_retrieve)
        return await asyncio.shield(opening)

    async def _open_pipelined(self) -> AsyncChannel:
        try:
            conn = await self._open()
            self._shared.append(conn)
            return conn
        finally:
            self._opening = None

    async def _request(self, op: str, args: tuple[Any, ...]) -> Any:
        """Run ``op`` in the server: one round trip on a pipelined connection (a blocking
        wait: on one of its own); the answer rebuilt as `SharedStore`'s backend rebuilds
        it."""
        if self._closed:
            raise self._closed_error()
        slot = BLOCKING_OPS.get(op)
        if slot is not None and args[slot]:
            kind, result = await self._wait_on_own(op, args, self.timeout + args[slot])
        else:
            conn = None
            for conn in self._shared:  # the usual case, inline: one with room
                if not conn.retired and len(conn.calls) < PIPELINE_DEPTH:
                    break
            else:
                conn = await self._pipelined()
            try:
                kind, result = await conn.call((op, args), op in ANSWERS_RECORDS,
                                               self.timeout)
            except BaseException as exc:
                # A cancelled call's answer is dropped when it comes: the channel stays
                # in step.  One that timed out retired it; one that failed closed it.
                if self._closed and isinstance(exc, OSError):
                    raise self._closed_error(op) from None
                raise translate(exc, self.url, self.timeout) from None
        rebuild = ANSWERS.get(op)
        value = answer(kind, result, self.url)
        return value if rebuild is None else rebuild(value)

    async def _wait_on_own(self, op: str, args: tuple[Any, ...], bound: float) -> Any:
        """A blocking wait, on a connection of its own (at most ``max_connections``)."""
        async with self._slots:
            conn = self._idle.pop() if self._idle else await self._open()
            try:
                reply = await conn.call((op, args), op in ANSWERS_RECORDS, bound)
            except BaseException as exc:
                # Cancelled, timed out or failed: the server may still be waiting on it,
                # so it is not reused.
                conn.close()
                if self._closed and isinstance(exc, OSError):
                    raise self._closed_error(op) from None
                raise translate(exc, self.url, bound) from None
            if self._closed:
                conn.close()
            else:
                self._idle.append(conn)
            return reply

    def _is_closed(self) -> bool:
        return self._closed

    async def aclose(self) -> None:
        """Close every connection; calls under way raise `StoreUnavailable`, and so do
        later ones.  The server hears that this process is done, without a wait."""
        if not self._closed:
            for conn in self._shared + self._idle:
                if not conn.retired and not conn.closed:
                    conn.send_nowait(("register_client",
                                      (os.getpid(), self.name, self.role, True)))
                    break
        self.close_now()

    def close_now(self) -> None:
        """Close every connection at once, from any thread once its loop has ended (no
        goodbye to the server: `aclose` says it)."""
        self._closed = True
        self._shared, self._idle = [], []
        _close_all(self._conns)


def _close_all(conns: set[AsyncChannel]) -> None:
    for conn in list(conns):
        conn.close()
    conns.clear()


def _forget(store: weakref.ReferenceType[AsyncSharedStore], conn: AsyncChannel) -> None:
    alive = store()
    if alive is not None:
        alive._forget(conn)


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Read an opening's outcome (its callers may all have been cancelled)."""
    if not future.cancelled():
        future.exception()


class _Pooled:
    """`AsyncSharedStore`'s `AsyncBackend`: each call one `AsyncSharedStore._request`."""

    __slots__ = ("_store",)

    def __init__(self, store: AsyncSharedStore) -> None:
        self._store = weakref.proxy(store)

    def call(self, op: str, *args: Any) -> Coroutine[Any, Any, Any]:
        coro: Coroutine[Any, Any, Any] = self._store._request(op, args)
        return coro  # the request's own coroutine: a frame less per call
