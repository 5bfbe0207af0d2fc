"""The transport between clients and the server: messages, listener, connections.

The server is a ``multiprocessing.managers`` server, but its messages are msgpack, not
pickle: its listener (`WireListener`) hands out connections that encode each message with
msgpack, and a request is ``(operation, arguments)``.  So no process ever unpickles what
a peer sent — not even after authentication — and user states travel as the bytes the
client encoded.  Exceptions cross as (type name, message, attributes) and are rebuilt
only from shmstore's own exception tree.  (URLs and addresses are `core.config`'s;
`Address` and `parse_url` are re-exported here.)

Connections authenticate with the stdlib's HMAC challenge (``deliver_challenge`` /
``answer_challenge``) before anything else is read; an unauthenticated peer can make the
server read at most 256 bytes and must finish the handshake within `HANDSHAKE_TIMEOUT`.
A server that cannot serve a new connection (out of file descriptors, or unable to start
a thread for it) sends one `REFUSED` frame instead of the challenge and closes it.  A
client checks the first frame it hears before the stdlib sees it: anything but a
challenge or a refusal means the peer is not a shmstore server, and silence for
`CLIENT_HANDSHAKE_TIMEOUT` means that, or a stopped or overloaded server.

After authentication the server bounds what a stalled or dead peer can hold: once a
message has begun, each further read and each write must make progress within
`FRAME_TIMEOUT` (an idle connection between messages is fine), and a large message's
buffer grows with the bytes that really arrive, not with the length its header claims.
"""

from __future__ import annotations

import array
import errno
import os
import select
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from multiprocessing import AuthenticationError, connection
from typing import Any

import msgpack

from ..core import errors, segment
from ..core.backend import ROLE_WORKER
from ..core.config import Address, parse_url
from ..core.errors import AccessDenied, ShmstoreError, StoreTimeout, StoreUnavailable

__all__ = ["Address", "Channel", "REFUSED", "WireListener", "handshake", "open_connection",
           "pack", "parse_url", "refuse", "unpack"]

HANDSHAKE_TIMEOUT = 10.0
# Client side: longest wait for each step of the handshake (never longer than the call
# timeout).  A shmstore server greets at once; a peer silent this long is not one, or is
# stopped (SIGSTOP) or overloaded, and the caller should not wait the whole call timeout.
CLIENT_HANDSHAKE_TIMEOUT = 5.0
# The frame a server sends instead of the challenge when it cannot serve a connection,
# followed by the reason (a key of REFUSAL_REASONS).  It cannot be a challenge, which
# starts with b"#CHALLENGE#".
REFUSED = b"#SHMSTORE-REFUSED#"
REFUSAL_REASONS = {
    b"descriptors": "is out of file descriptors; close clients it no longer needs, or "
                    "raise its limit (ulimit -n) before starting it",
    b"threads": "cannot start a thread for a new connection (its pids.max, ulimit -u or "
                "address-space limit); close clients it no longer needs, or raise the limit",
}
# The longest frame the stdlib's handshake reads (it refuses longer ones).
_HANDSHAKE_FRAME = 256
_CHALLENGE = b"#CHALLENGE#"
# Server side, after authentication: longest wait for the rest of a begun message, or for
# a client to take an answer; a peer frozen or gone mid-message loses its connection.
FRAME_TIMEOUT = 10.0
# A large message's buffer starts at this size and doubles as its bytes arrive.
LARGE_START = 1024 * 1024
LISTEN_BACKLOG = 512
_EXC_EXT = 64  # ext code of an exception on the wire (transport only, not the state codec)
# ext code of a memory segment: its descriptor's index among the message's, and its size
_SEGMENT_EXT = 65
_SEGMENT = struct.Struct("!IQ")
# The most descriptors one sendmsg carries (the kernel's SCM_MAX_FD is 253); a message
# with more sends them over several calls, in order.
FDS_PER_SEND = 250
_ANCILLARY = socket.CMSG_SPACE(FDS_PER_SEND * 4)
# Plain ints: the socket module's are enum members, and an enum's ``&`` costs ~2 us, on
# every read of a connection that passes descriptors.
_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)
_CTRUNC = int(socket.MSG_CTRUNC)
_RIGHTS = (int(socket.SOL_SOCKET), int(socket.SCM_RIGHTS))
# A large message's buffers (the packer's, the receiver's) are kept for the next one up
# to this size, so that a steady stream of large states does not fault in fresh pages
# for every message; a rarer, larger one gets buffers of its own, dropped after it.
CLIENT_KEEP = 32 * 1024 * 1024
SERVER_KEEP = 4 * 1024 * 1024
CHANNEL_BUFFER = 64 * 1024
# Up to this size a message is copied behind its header (one iovec is cheaper); above it,
# header and message go to writev as they are.
SMALL_MESSAGE = 16 * 1024
_HEADER = struct.Struct("!i")
_BIG = struct.Struct("!Q")


# -- messages ----------------------------------------------------------------------------

Adopt = Callable[[int, int], Any]

def _default(obj: object) -> Any:
    """What msgpack cannot pack itself: exceptions, tuples, and (on a connection that
    passes no descriptors) memory segments, as their bytes."""
    if isinstance(obj, BaseException):
        attrs = obj.attrs if isinstance(obj, ShmstoreError) else {}
        message = obj.message if isinstance(obj, ShmstoreError) else str(obj)
        return msgpack.ExtType(_EXC_EXT, msgpack.packb([type(obj).__name__, message, attrs]))
    if isinstance(obj, tuple):
        return list(obj)
    if isinstance(obj, segment.Segment):  # this peer takes no descriptors: the bytes
        return obj.read()
    raise TypeError(f"cannot send {type(obj).__name__} over the wire")


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _SEGMENT_EXT:
        raise ValueError("a memory segment came without its descriptor")
    if code != _EXC_EXT:
        raise ValueError(f"unknown extension type {code} in a message")
    name, message, attrs = msgpack.unpackb(data)
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, ShmstoreError):
        return cls(message, **attrs)
    return ShmstoreError(f"the server raised {name}: {message}", type_name=name)


class _Outgoing:
    """A descriptor-passing channel's packer hook: a segment becomes an ext value that
    names its descriptor's place among the message's, and the descriptor is listed."""

    __slots__ = ("fds",)

    def __init__(self) -> None:
        self.fds: list[int] = []

    def __call__(self, obj: object) -> Any:
        if type(obj) is segment.Segment:
            self.fds.append(obj.fd)
            return msgpack.ExtType(_SEGMENT_EXT, _SEGMENT.pack(len(self.fds) - 1, obj.size))
        return _default(obj)


class _Incoming:
    """A descriptor-passing channel's received descriptors, and its unpacker hook that
    gives each segment ext value the next of the message's descriptors (as ``adopt``
    makes it).

    Each descriptor is queued with the stream position of the last byte of the read it
    came with (``received`` counts every byte read on the channel).  A sender's
    descriptors ride on the first bytes of their message, each ``sendmsg`` holding one
    message's bytes only, and the kernel ends a read at the bytes that carry descriptors
    (it may glue earlier bytes before them, never later ones after): so that byte is in
    the message the descriptors belong to.  A message ending at position ``end`` owns
    the descriptors queued before ``end`` -- on a connection carrying several messages
    in flight (a pipelined client, the server reading its requests), the descriptors of
    a next message already read stay queued for it.
    """

    __slots__ = ("adopt", "fds", "mine", "received", "taken")

    def __init__(self, adopt: Adopt) -> None:
        self.adopt = adopt
        # received, not yet taken by a message: (position they came at, descriptor)
        self.fds: deque[tuple[int, int]] = deque()
        self.mine: deque[int] = deque()  # those of the message being decoded
        self.received = 0
        self.taken = 0

    def __call__(self, code: int, data: bytes) -> Any:
        if code != _SEGMENT_EXT:
            return _ext_hook(code, data)
        index, size = _SEGMENT.unpack(data)
        if index != self.taken or not self.mine:
            raise ValueError(f"memory segment {index} of a message came without its "
                             "descriptor")
        self.taken += 1
        return self.adopt(self.mine.popleft(), size)

    def drop(self) -> None:
        """Close every descriptor received and not taken (the channel is closing)."""
        while self.mine:
            os.close(self.mine.popleft())
        while self.fds:
            os.close(self.fds.popleft()[1])

    def read(self, sock: socket.socket, view: memoryview, with_fds: bool) -> int:
        """One read into ``view``, counted; with ``with_fds``, a ``recvmsg`` whose
        descriptors are queued (without, the kernel closes any that come).

        Raises:
            ShmstoreError: the kernel truncated them (more than a message may carry).
        """
        if not with_fds:
            n = sock.recv_into(view)
            self.received += n
            return n
        n, ancillary, flags, _ = sock.recvmsg_into([view], _ANCILLARY, _CLOEXEC)
        self.received += n
        if ancillary or flags:
            self.take(ancillary, flags)
        return n

    def take(self, ancillary: list[tuple[int, int, bytes]], flags: int) -> None:
        """Queue the descriptors of one ``recvmsg``'s ancillary data (``received``
        already counts the bytes that read brought).

        Raises:
            ShmstoreError: the kernel truncated them (more than a message may carry).
        """
        at = self.received - 1
        for level, kind, data in ancillary:
            if (level, kind) == _RIGHTS:
                fds = array.array("i")
                fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
                self.fds.extend((at, fd) for fd in fds)
        if flags & _CTRUNC:
            self.drop()
            raise ShmstoreError("more descriptors came with a message than it may carry")

    def _claim(self, end: int) -> deque[int]:
        """The descriptors of the message that ends at stream position ``end``."""
        fds, mine = self.fds, self.mine
        while fds and fds[0][0] < end:
            mine.append(fds.popleft()[1])
        return mine

    def unpack(self, data: bytes | bytearray | memoryview, end: int) -> Any:
        """Decode the message that ends at stream position ``end`` with the descriptors
        that came for it; those of them left over belong to no message and are closed."""
        if not self._claim(end):
            return unpack(data)
        self.taken = 0
        try:
            return unpack(data, self)
        finally:
            self.discard(end)

    def discard(self, end: int) -> None:
        """Close the descriptors of the message ending at ``end`` (one nobody decodes)."""
        mine = self._claim(end)
        while mine:
            os.close(mine.popleft())


def pack(message: object) -> bytes:
    """Encode one transport message (tuples travel as lists)."""
    data: bytes = msgpack.packb(message, default=_default, use_bin_type=True)
    return data


def unpack(data: bytes | bytearray | memoryview,
           ext_hook: Callable[[int, bytes], Any] = _ext_hook) -> Any:
    """Decode one transport message; exceptions come back as shmstore exceptions (and
    memory segments as ``ext_hook`` makes them: a channel's own takes descriptors)."""
    return msgpack.unpackb(data, ext_hook=ext_hook, raw=False, strict_map_key=False)


class WireConnection(connection.Connection):
    """A ``multiprocessing.connection.Connection`` whose ``send``/``recv`` speak msgpack.

    What the server's listener hands out: the stdlib's handshake runs on it as on any
    connection, and the few messages before a connection's request loop are msgpack.
    """

    def send(self, obj: object) -> None:
        self.send_bytes(pack(obj))

    def recv(self) -> Any:
        try:
            return unpack(self.recv_bytes())
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            # Not EOFError (a hang-up): the server answers a malformed first request.
            raise ShmstoreError(f"malformed message: {exc}") from None


def _timeval(seconds: float) -> bytes:
    sec = int(seconds)
    return struct.pack("ll", sec, int((seconds - sec) * 1_000_000))


def set_io_timeout(fd: int, seconds: float, *, send: float | None = None) -> None:
    """Bound every blocking read and write on socket ``fd`` (0 = no bound).

    ``send``, if given, bounds writes instead of ``seconds``.
    """
    # Borrows ``fd`` (no dup): at the descriptor limit a dup would fail.
    sock = socket.socket(fileno=fd)
    try:
        _set_timeouts(sock, seconds, seconds if send is None else send)
    finally:
        sock.detach()


def _set_timeouts(sock: socket.socket, receive: float, send: float) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(receive))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(send))
    if sock.family == socket.AF_INET:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _new_packer(default: Callable[[object], Any] = _default) -> msgpack.Packer:
    return msgpack.Packer(default=default, use_bin_type=True, autoreset=False)


class Channel:
    """A framed connection with one read per message where the stdlib makes two.

    It speaks the stdlib's frame format (a 4-byte big-endian length, or -1 and an 8-byte
    length) on the socket of an authenticated ``Connection``, and reads into a buffer it
    keeps: a small message and its header arrive in a single ``readv``.  ``recv`` returns
    a view that is valid until the next ``recv``; decode it (`unpack`) before calling
    again.

    On a connection that passes descriptors (the data plane, unix sockets only), every
    read is a ``recvmsg`` that collects the SCM_RIGHTS descriptors riding on the bytes,
    and a message holding `Segment` values sends their descriptors with its first bytes;
    its decoded form holds what ``adopt`` made of each (the server checks the seals).
    Descriptors are never read anywhere else: before authentication, a peer's descriptors
    reach only plain reads, and the kernel closes them.

    Parameters:
        conn: an authenticated connection; the channel takes over its socket.
        frame_timeout: if set, the rest of a begun message must keep arriving: each read
            after a message's first bytes waits at most this many seconds, then raises
            `TimeoutError` (the server's guard against a peer frozen mid-message).  The
            wait for a message's first bytes is not bounded by it.
        passes_fds: send and take descriptors (both ends agreed on it).
        adopt: what a received descriptor becomes, given ``(fd, size)``.
        keep: the largest message whose buffers are kept for the next.
    """

    __slots__ = ("_buf", "_conn", "_end", "_held", "_in", "_keep", "_large", "_out",
                 "_packer", "_poll", "_sock", "_start", "_view", "_with_fds", "fd",
                 "frame_timeout_ms", "passes_fds")

    def __init__(self, conn: connection.Connection, *,
                 frame_timeout: float | None = None, passes_fds: bool = False,
                 adopt: Adopt = segment.map_descriptor, keep: int = CLIENT_KEEP) -> None:
        self._conn = conn  # owns the file descriptor
        self.fd = conn.fileno()
        self._buf = bytearray(CHANNEL_BUFFER)
        self._view = memoryview(self._buf)
        self._start = self._end = 0
        self._large = bytearray()  # the last large message's buffer, if kept
        self._held = bytearray()  # small messages held back to go with the next (`more`)
        self._keep = keep
        # Descriptor passing: what the packer lists and the unpacker takes (no per-message
        # state anywhere else: a message's descriptors are its channel's alone).
        self.passes_fds = passes_fds
        self._out = _Outgoing() if passes_fds else None
        self._in = _Incoming(adopt) if passes_fds else None
        self._with_fds = passes_fds  # whether the message being read may carry any
        # Packs into a buffer it keeps and sends from it: no bytes object per message.
        self._packer = self._new_packer()
        self.frame_timeout_ms: int | None = None
        self._poll = select.poll()
        if frame_timeout is not None:
            self.frame_timeout_ms = max(1, int(frame_timeout * 1000))
            self._poll.register(self.fd, select.POLLIN)
        # Borrows the descriptor (detached at close): recvmsg and sendmsg need a socket.
        self._sock = socket.socket(fileno=self.fd) if passes_fds else None

    def _await_more(self) -> None:
        """Within a begun message: wait for more bytes, at most ``frame_timeout``."""
        if self.frame_timeout_ms is not None and not self._poll.poll(self.frame_timeout_ms):
            raise TimeoutError(f"the rest of a message did not come within "
                               f"{self.frame_timeout_ms / 1000} s")

    def _new_packer(self) -> msgpack.Packer:
        return _new_packer(_default if self._out is None else self._out)

    def send_message(self, message: object, more: bool = False) -> None:
        """Encode ``message`` as `pack` does and send it, without copying the encoding;
        the descriptors of its segments go with it (or, if this connection passes none,
        their bytes in their place).

        ``more``: another message follows at once (the server, answering requests a
        pipelining client sent together): a small one without descriptors is held back
        and goes with the next, in one write.
        """
        packer, out = self._packer, self._out
        size = 0
        try:
            packer.pack(message)
            with packer.getbuffer() as view:
                size = len(view)
                held = self._held
                if out is not None and out.fds:
                    if held:
                        self._flush_held()
                    self._send_with_fds(view, out.fds)
                elif more and size <= SMALL_MESSAGE and len(held) < CHANNEL_BUFFER:
                    held += _HEADER.pack(size)
                    held += view
                elif held:
                    self._flush_held(_header(size), view)
                else:
                    self.send(view)
        except BaseException:
            self._packer = self._new_packer()  # whatever it holds half-packed goes with it
            raise
        finally:
            if out is not None:
                out.fds.clear()  # sent (the kernel holds them now), or not to be sent
        packer.reset()  # keeps its buffer...
        if size > self._keep:  # ...which must not stay as big as a rare huge message
            self._packer = self._new_packer()

    def _flush_held(self, *after: bytes | memoryview) -> None:
        """Send the messages held back, and ``after`` them (a message's header and
        bytes, not copied behind them), in one write."""
        held, self._held = self._held, bytearray()
        self._write([memoryview(held), *after])

    def has_message(self) -> bool:
        """True if a whole next message (of at most the buffer's size) is buffered."""
        avail = self._end - self._start
        frame = frame_header(self._buf, self._start, avail)
        return frame is not None and 0 <= frame[1] <= avail - frame[0]

    def send(self, data: bytes | memoryview) -> None:
        """Send one message (blocking, bounded by the socket's send timeout)."""
        n = len(data)
        if n <= SMALL_MESSAGE:  # one iovec: the message copied behind its header
            chunk = _HEADER.pack(n) + data
            sent = os.writev(self.fd, [chunk])
            if sent < len(chunk):
                self._write([memoryview(chunk)[sent:]])
            return
        # one writev all the same, without copying the message behind its header
        self._write([_header(n), data])

    def _write(self, chunks: list[bytes | memoryview]) -> None:
        fd = self.fd
        while chunks:
            sent = os.writev(fd, chunks)
            while chunks and sent >= len(chunks[0]):
                sent -= len(chunks[0])
                chunks.pop(0)
            if sent:
                chunks[0] = memoryview(chunks[0])[sent:]

    def _send_with_fds(self, data: memoryview, fds: list[int]) -> None:
        """Send one message whose descriptors ride on its first bytes: `FDS_PER_SEND`
        on each of its first bytes, in order (a message is longer than its count of
        descriptors: each takes an ext value in it)."""
        message = memoryview(_header(len(data)) + data)
        sock = self._sock
        if sock is None:
            raise ShmstoreError("this connection passes no descriptors")
        groups = [fds[i:i + FDS_PER_SEND] for i in range(0, len(fds), FDS_PER_SEND)]
        at = 0
        for index, group in enumerate(groups):
            part = message[at:] if index == len(groups) - 1 else message[at:at + 1]
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", group))]
            sent = sock.sendmsg([part], rights)
            at += sent
        if at < len(message):
            self._write([message[at:]])

    def _read(self, view: memoryview) -> int:
        """One read into ``view``; descriptors that come with it are queued."""
        incoming, sock = self._in, self._sock
        if incoming is None or sock is None:
            return os.readv(self.fd, [view])
        return incoming.read(sock, view, self._with_fds)

    def _fill(self, need: int) -> None:
        """Read until ``need`` bytes past ``_start`` are buffered (need <= buffer size)."""
        if self._start and self._start + need > len(self._buf):
            leftover = self._end - self._start
            self._buf[:leftover] = self._buf[self._start:self._end]
            self._start, self._end = 0, leftover
        view = self._view
        while self._end - self._start < need:
            if self._end > self._start:
                self._await_more()
            n = self._read(view[self._end:])
            if not n:
                raise EOFError
            self._end += n

    def recv(self, fds: bool = True) -> memoryview | bytearray:
        """Receive one message.

        ``fds``: on a connection that passes descriptors, whether this message may carry
        some (a client knows which answers can: `ANSWERS_RECORDS`).  One that cannot is
        read with plain reads, a few microseconds cheaper than ``recvmsg``; descriptors
        that came with it all the same would be closed by the kernel.

        Raises:
            EOFError: the peer closed the connection.
            OSError: the socket failed or its receive timeout ran out (BlockingIOError).
        """
        self._with_fds = fds
        if self._start == self._end:
            self._start = self._end = 0
        self._fill(4)
        start = self._start
        size = _HEADER.unpack_from(self._buf, start)[0]
        header = 4
        if size == -1:
            self._fill(12)
            start = self._start
            size = _BIG.unpack_from(self._buf, start + 4)[0]
            header = 12
        total = header + size
        if total <= len(self._buf):
            self._fill(total)
            start = self._start
            self._start = start + total
            return self._view[start + header:start + total]
        return self._recv_large(start + header, size)

    def _recv_large(self, start: int, size: int) -> memoryview | bytearray:
        """The rest of a large message, read straight into a buffer of its own.

        Up to ``keep`` bytes, the buffer is the one kept from the last large message (or a
        new one, kept for the next); a larger message's grows as its bytes arrive, so a
        header that promises more than the peer sends costs what was sent, not what was
        promised.
        """
        kept = size <= self._keep
        if kept:
            if len(self._large) < size:
                self._large = bytearray(size)
            out = self._large
        else:
            out = bytearray(min(size, LARGE_START))
        have = self._end - start
        out[:have] = self._buf[start:self._end]
        self._start = self._end = 0
        while have < size:
            self._await_more()
            if have == len(out):  # grown only once more bytes are there to fill it
                out += bytes(min(size, 2 * have) - have)  # calloc'd: zero pages cost nothing
            with memoryview(out) as view:
                n = self._read(view[have:size])
            if not n:
                raise EOFError
            have += n
        return memoryview(out)[:size] if kept else out

    def unpack(self, data: bytes | bytearray | memoryview) -> Any:
        """Decode one message received on this channel (`unpack`, with its descriptors).

        Call it before the next `recv`.  Descriptors that came for the message and are
        left over once it is decoded belong to no message: they are closed (those of a
        next message already read stay queued for it).
        """
        incoming = self._in
        if incoming is None or not incoming.fds:
            return unpack(data)
        # where the message just received ends: what was read, less what is buffered
        # past it (nothing, after a large message)
        return incoming.unpack(data, incoming.received - (self._end - self._start))

    def _drop_fds(self) -> None:
        if self._in is not None:
            self._in.drop()

    def pending(self) -> bool:
        """True if bytes of a next message are already buffered."""
        return self._end > self._start

    def shutdown(self) -> None:
        """Wake a thread blocked reading this connection (it reads the end of the stream);
        closing the descriptor alone does not wake it on Linux."""
        sock = self._sock
        try:
            if sock is not None:
                sock.shutdown(socket.SHUT_RDWR)
                return
            # A socket object that borrows the descriptor for the call, then lets go.
            sock = socket.socket(fileno=self.fd)
            try:
                sock.shutdown(socket.SHUT_RDWR)
            finally:
                sock.detach()
        except OSError:  # closed or not connected any more: nothing waits on it
            pass

    def close(self) -> None:
        self._drop_fds()
        self._release_socket()
        self._conn.close()

    def _release_socket(self) -> None:
        """Let go of the borrowed socket object without closing the descriptor, which
        the connection owns (closed twice, it could close a descriptor reused since)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.detach()

    def __del__(self) -> None:
        # Runs before the attributes are released: the socket object must not close the
        # descriptor when it goes, the connection does; descriptors received for no
        # message are closed.
        if hasattr(self, "_in"):
            self._drop_fds()
            self._release_socket()


def frame_header(buf: bytearray, start: int, avail: int) -> tuple[int, int] | None:
    """(header length, message length) of the frame at ``buf[start:]``, of which
    ``avail`` bytes are there; None until its header is."""
    if avail < 4:
        return None
    size: int = _HEADER.unpack_from(buf, start)[0]
    if size != -1:
        return 4, size
    if avail < 12:
        return None
    return 12, _BIG.unpack_from(buf, start + 4)[0]


def _header(n: int) -> bytes:
    return _HEADER.pack(n) if n < 0x7FFFFFFF else _HEADER.pack(-1) + _BIG.pack(n)


class WireListener:
    """The server's listening socket: accepts peers, bounds their handshake, wraps them.

    It binds its own socket rather than wrapping ``multiprocessing.connection.Listener``,
    whose unix listener unlinks its path at close whoever's socket is there by then (the
    server removes only its own, see ``server.manager``) and whose socket cannot be shut
    down to wake a blocked ``accept`` without reaching into it.
    """

    def __init__(self, address: Address) -> None:
        sock = socket.socket(getattr(socket, address.family), socket.SOCK_STREAM)
        try:
            if address.family == "AF_INET":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address.target)
            sock.listen(LISTEN_BACKLOG)
        except BaseException:
            sock.close()
            raise
        self._socket = sock
        self.address: Any = sock.getsockname()  # a path, or the bound (host, port)

    def accept(self) -> WireConnection:
        sock, _peer = self._socket.accept()
        # Cleared once the peer has authenticated (see server.TableServer).
        set_io_timeout(sock.fileno(), HANDSHAKE_TIMEOUT)
        return WireConnection(sock.detach())

    def close(self) -> None:
        self._socket.close()

    def wake(self) -> None:
        """Make an ``accept`` blocked in another thread return (it raises `OSError`).

        Closing a listener does not wake a thread blocked in ``accept`` on Linux;
        shutting its socket down does.
        """
        try:
            self._socket.shutdown(socket.SHUT_RDWR)
        except OSError:  # not supported for listening sockets everywhere: join times out
            pass


def refuse(conn: connection.Connection, reason: bytes) -> None:
    """Server side: tell a new, unauthenticated peer why it is not served, and close it.

    Sends the `REFUSED` frame with ``reason`` (a key of `REFUSAL_REASONS`) where the
    challenge would be; a peer already gone is not an error.
    """
    try:
        conn.send_bytes(REFUSED + reason)
    except OSError:
        pass
    finally:
        conn.close()


# -- client connections --------------------------------------------------------------------


def _out_of_descriptors(exc: OSError, url: str) -> StoreUnavailable:
    where = "this system" if exc.errno == errno.ENFILE else "this process"
    return StoreUnavailable(
        f"cannot open a connection to {url}: {where} is out of file descriptors "
        f"({exc.strerror or exc}); close files and connections it no longer needs, or "
        "raise the limit (ulimit -n, resource.RLIMIT_NOFILE)",
        address=url,
    )


def _not_shmstore(url: str, heard: bytes) -> StoreUnavailable:
    return StoreUnavailable(
        f"the peer at {url} is not a shmstore server: it answered {heard[:40]!r} instead "
        "of the handshake; check the URL (a Redis URL starts with redis://)",
        address=url,
    )


def _silent(url: str, wait: float) -> StoreTimeout:
    return StoreTimeout(
        f"the peer at {url} sent no shmstore handshake within {wait} s: either it is not "
        "a shmstore server (check the URL), or the server is stopped or overloaded",
        timeout=wait, address=url,
    )


def _read_greeting(sock: socket.socket, url: str, wait: float) -> bytes:
    """Read the server's first frame (the challenge) within ``wait`` seconds and check it.

    Raises:
        StoreUnavailable: the peer is not a shmstore server, closed the connection, or
            is a shmstore server that refused it (the message says why).
        StoreTimeout: the peer said nothing in time.
    """
    deadline = time.monotonic() + wait
    data = b""
    need = 4
    while len(data) < need:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _silent(url, wait)
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(_HANDSHAKE_FRAME + 4)
        except TimeoutError:
            raise _silent(url, wait) from None
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            if data:  # half a frame, then a hang-up
                raise _not_shmstore(url, data)
            raise StoreUnavailable(
                f"the peer at {url} closed the connection before the handshake: it is not "
                "a shmstore server, or the server is stopping",
                address=url,
            )
        data += chunk
        if need == 4 and len(data) >= 4:
            size = _HEADER.unpack_from(data)[0]
            if not 0 < size <= _HANDSHAKE_FRAME:
                raise _not_shmstore(url, data)  # an HTTP reply, a banner, garbage
            need = 4 + size
    # A shmstore server sends its greeting and waits for the answer: nothing follows it.
    if len(data) > need:
        raise _not_shmstore(url, data)
    frame = data[4:]
    if frame.startswith(REFUSED):
        reason = REFUSAL_REASONS.get(frame[len(REFUSED):], "refused the connection")
        raise StoreUnavailable(f"the shmstore server at {url} {reason}", address=url)
    if not frame.startswith(_CHALLENGE):
        raise _not_shmstore(url, data)
    return frame


class _Greeted(connection.Connection):
    """A client connection whose first ``recv_bytes`` returns the greeting already read."""

    def __init__(self, handle: int, greeting: bytes) -> None:
        super().__init__(handle)
        self._greeting: bytes | None = greeting

    def recv_bytes(self, maxlength: int | None = None) -> bytes:
        greeting, self._greeting = self._greeting, None
        if greeting is not None:
            return greeting
        return super().recv_bytes(maxlength)


def open_connection(address: Address, authkey: bytes, *, timeout: float,
                    name: str = "client", data_plane: bool = False,
                    role: str = ROLE_WORKER) -> Channel:
    """Connect, authenticate and enter the server's request loop (`handshake`); the
    connection as a `Channel`.

    Raises what `handshake` raises.
    """
    conn, passes_fds = handshake(address, authkey, timeout=timeout, name=name,
                                 data_plane=data_plane, role=role)
    return Channel(conn, passes_fds=passes_fds)


def handshake(address: Address, authkey: bytes, *, timeout: float,
              name: str = "client", data_plane: bool = False,
              role: str = ROLE_WORKER) -> tuple[connection.Connection, bool]:
    """Connect, authenticate and enter the server's request loop; the connection and
    whether it passes descriptors.

    With ``data_plane`` on a unix socket, the connection passes memory segments'
    descriptors if the server takes them too (its answer to ``accept_connection``).

    Every blocking read and write on the returned connection is bounded by ``timeout``;
    each step of the handshake by `CLIENT_HANDSHAKE_TIMEOUT` (or ``timeout`` if shorter).

    Raises:
        StoreUnavailable: nothing listens there, the peer is not a shmstore server, the
            server refused the connection (out of descriptors or threads), this process
            is out of file descriptors, or the server went away.
        AccessDenied: the server refused the authkey.
        StoreTimeout: the server did not answer within ``timeout``, or no handshake came
            (not a shmstore server, or a stopped or overloaded one).
    """
    url = address.url
    try:
        sock = socket.socket(getattr(socket, address.family), socket.SOCK_STREAM)
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            raise _out_of_descriptors(exc, url) from None
        raise StoreUnavailable(f"cannot open a socket to {url}: {exc.strerror or exc}",
                               address=url) from None
    wait = min(CLIENT_HANDSHAKE_TIMEOUT, timeout)
    try:
        sock.settimeout(timeout)
        sock.connect(address.target)
        first = _read_greeting(sock, url, wait)
        sock.settimeout(None)
        _set_timeouts(sock, wait, wait)  # the rest of the handshake
    except ShmstoreError:  # from the greeting: already says what the peer is
        sock.close()
        raise
    except TimeoutError:
        sock.close()
        raise StoreTimeout(f"connecting to {url} took longer than {timeout} s",
                           timeout=timeout, address=url) from None
    except OSError as exc:
        sock.close()
        raise StoreUnavailable(
            f"no shmstore server at {url}: {exc.strerror or exc}", address=url
        ) from None
    conn = _Greeted(sock.detach(), first)
    step = "handshake"
    try:
        connection.answer_challenge(conn, authkey)
        connection.deliver_challenge(conn, authkey)
        step = "call"
        set_io_timeout(conn.fileno(), timeout)
        wants = data_plane and address.family == "AF_UNIX"
        conn.send_bytes(pack(("accept_connection", (name, wants))))
        kind, result = unpack(conn.recv_bytes())
        if kind != "#RETURN":
            raise ShmstoreError(f"the server at {url} refused the connection: {result}")
        passes_fds = wants and result is True
        # Let the server's memory monitor watch this process.
        conn.send_bytes(pack(("register_client", (os.getpid(), name.split("/")[0], role))))
        unpack(conn.recv_bytes())
    except AuthenticationError:
        conn.close()
        raise AccessDenied(
            f"the server at {url} refused the authkey; use the key it was started "
            "with (SHMSTORE_AUTHKEY or its connection file)",
            address=url,
        ) from None
    except BaseException as exc:
        conn.close()
        if step == "handshake" and isinstance(exc, (BlockingIOError, TimeoutError)):
            raise StoreTimeout(
                f"the shmstore server at {url} stopped answering during the handshake "
                f"for {wait} s: it is stopped or overloaded",
                timeout=wait, address=url) from None
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
            raise _out_of_descriptors(exc, url) from None
        raise translate(exc, url, timeout) from None
    return conn, passes_fds


def translate(exc: BaseException, url: str, timeout: float) -> BaseException:
    """Map a transport failure to the shmstore exception users see."""
    if isinstance(exc, ShmstoreError) or not isinstance(exc, Exception):
        return exc
    if isinstance(exc, (BlockingIOError, TimeoutError)):
        return StoreTimeout(f"the server at {url} did not answer within {timeout} s",
                            timeout=timeout, address=url)
    if isinstance(exc, (EOFError, OSError)):
        detail = "connection closed" if isinstance(exc, EOFError) else (exc.strerror or str(exc))
        return StoreUnavailable(f"lost the shmstore server at {url}: {detail}", address=url)
    if isinstance(exc, (ValueError, msgpack.UnpackException)):
        return StoreUnavailable(f"garbled answer from {url}: {exc}", address=url)
    return exc
