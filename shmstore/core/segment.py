"""Sealed memory segments: the data plane's memory files and the descriptors that hold them.

A large state does not travel through the socket: the client writes its split encoding
(`codec.Split`) once into an anonymous memory file (``memfd_create``), seals it against
writing, shrinking and growing, and passes the descriptor to the server (SCM_RIGHTS,
`backends.wire`).  The server checks the seals and the size (`adopt`), keeps the
descriptor as the record's state and never maps or copies the bytes; a reader gets a
descriptor back, maps it read-only (`mapped`) and decodes numpy arrays as views of the
mapping, so N readers share one copy of the pages.

Nothing has a name, so nothing can leak: the kernel frees a segment when its last
descriptor and its last mapping are gone, whichever process is killed.  A `Segment`
owns one descriptor and closes it when closed or dropped; the held count and bytes of
this process are `held()` (the server's ``stats()``).  Sealing is what makes a stored
checkpoint immutable: no process, the saver included, can change it afterwards.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import resource
import stat
import threading
from typing import TYPE_CHECKING

from .errors import ShmstoreError

if TYPE_CHECKING:  # the server imports this module, and never the codec
    from .codec import Split

__all__ = ["DEFAULT_THRESHOLD", "SEALS", "Segment", "adopt", "available", "held",
           "map_descriptor", "mapped", "share", "write"]

#: The seals a segment must carry: nobody may write, shrink or grow it any more.
SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
#: States whose encoding is at least this large travel as segments by default: from here
#: saves and loads take half the socket path's time; at 128 KiB only loads reliably gain,
#: below it the socket is faster (bench/threshold.py), and a segment costs a descriptor.
DEFAULT_THRESHOLD = 256 * 1024
# Linux's pwrite moves at most this much per call.
_CHUNK = 1 << 30
# A server falls back to inline bytes once this few descriptors are left below its limit
# (connections, the listener, files of the sampler and the stdlib need some).
DESCRIPTOR_RESERVE = 256

log = logging.getLogger("shmstore")

_lock = threading.Lock()
_held = [0, 0]  # segments this process holds open, and their bytes


def available() -> bool:
    """Whether this system can make sealed memory files (Linux 3.17+)."""
    return hasattr(os, "memfd_create") and hasattr(fcntl, "F_ADD_SEALS")


def held() -> tuple[int, int]:
    """``(segments, bytes)`` this process holds open right now."""
    with _lock:
        return _held[0], _held[1]


class Segment:
    """One sealed memory file: its descriptor (owned) and its size in bytes.

    ``len()`` is the size, so a record whose state is a segment counts in every byte
    limit exactly as bytes of that size would.
    """

    __slots__ = ("fd", "size")

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        with _lock:
            _held[0] += 1
            _held[1] += size

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"<Segment fd={self.fd} size={self.size}>"

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            with _lock:
                _held[0] -= 1
                _held[1] -= self.size
            os.close(fd)

    def __del__(self) -> None:
        self.close()

    def read(self) -> bytes:
        """The whole encoding as bytes (for a peer that takes no descriptors)."""
        out = bytearray(self.size)
        with memoryview(out) as view:
            done = 0
            while done < self.size:
                n = os.preadv(self.fd, [view[done:done + _CHUNK]], done)
                if not n:
                    raise ShmstoreError(f"a sealed segment ended at {done} of {self.size} bytes")
                done += n
        return bytes(out)


def write(encoded: Split | bytes) -> Segment:
    """A new sealed segment holding ``encoded`` (a split encoding, or plain bytes).

    Raises:
        OSError: the system cannot make one now (out of descriptors or memory); the
            caller sends the bytes instead.
    """
    fd = os.memfd_create("shmstore", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, len(encoded))
        if isinstance(encoded, bytes):
            _write_at(fd, memoryview(encoded), 0)
        else:
            _write_at(fd, memoryview(encoded.head), 0)
            for offset, raw in encoded.buffers:
                _write_at(fd, raw, offset)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return Segment(fd, len(encoded))


def share(encoded: Split | bytes, threshold: int) -> Segment | bytes:
    """What a state's encoding travels as: a segment from ``threshold`` bytes on (a split
    one always has an array that large), else -- or if no segment can be made now (out
    of descriptors or memory) -- its bytes."""
    if isinstance(encoded, bytes) and len(encoded) < threshold:
        return encoded
    try:
        return write(encoded)
    except OSError as exc:
        log.debug("sending a state of %d bytes inline: no memory segment (%s)",
                  len(encoded), exc)
        return encoded if isinstance(encoded, bytes) else encoded.tobytes()


def _write_at(fd: int, data: memoryview, offset: int) -> None:
    done, size = 0, len(data)
    while done < size:
        done += os.pwrite(fd, data[done:done + _CHUNK], offset + done)


def _check(fd: int, size: int) -> str | None:
    """Why descriptor ``fd`` is not a sealed memory file of ``size`` bytes, or None."""
    try:
        info = os.fstat(fd)
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as exc:  # EINVAL: a file that cannot be sealed (not a memfd)
        return f"not a sealable memory file ({errno.errorcode.get(exc.errno or 0, exc)})"
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if seals & SEALS != SEALS:
        return "not sealed against writing, shrinking and growing"
    if info.st_size != size:
        return f"{info.st_size} bytes, not the {size} announced"
    return None


def adopt(fd: int, size: int) -> Segment:
    """Take a descriptor received from an authenticated peer as a segment of ``size`` bytes.

    Raises:
        ShmstoreError: it is not a memory file sealed against writing, shrinking and
            growing, or its size is not ``size``; the descriptor is closed.
    """
    problem = _check(fd, size)
    if problem is not None:
        os.close(fd)
        raise ShmstoreError(f"refused a memory segment: {problem}")
    return Segment(fd, size)


def room_for_another() -> bool:
    """Whether this process may hold one more segment and keep `DESCRIPTOR_RESERVE`
    descriptors free below its soft limit."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return True
    try:
        open_now = len(os.listdir("/proc/self/fd"))
    except OSError:
        open_now = held()[0]
    return open_now + DESCRIPTOR_RESERVE < soft


def map_descriptor(fd: int, size: int) -> memoryview:
    """Map the sealed memory file ``fd`` read-only and close ``fd``: the mapping keeps
    the pages (and the file) alive until it is released.

    Raises:
        ShmstoreError: ``fd`` is not a memory file sealed against writing, shrinking and
            growing, of ``size`` bytes (a mapping past a file's end, or of a file that
            can shrink, would crash the process on access).
    """
    try:
        problem = _check(fd, size) if size > 0 else "empty"
        if problem is not None:
            raise ShmstoreError(f"refused a memory segment: {problem}")
        memory = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    return memoryview(memory)


def mapped(segment: Segment) -> memoryview:
    """A read-only mapping of a segment this process made (`write`); it is closed."""
    try:
        return memoryview(mmap.mmap(segment.fd, segment.size, flags=mmap.MAP_SHARED,
                                    prot=mmap.PROT_READ))
    finally:
        segment.close()
