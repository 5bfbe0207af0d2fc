"""The shared-memory data plane: split encodings, sealed segments, descriptors on the wire.

The contract suite runs every test through the plane too (the ``shared-plane`` backend);
this module tests what only the plane has: the split layout, seals and hostile
descriptors, zero-copy loads, the segments' lifetime when processes are SIGKILLed, and
the fall-back to bytes near the descriptor limit.  Whether a segment is gone is checked
exactly: by its inode, in every process's descriptors and mappings (``/proc/*/fd``,
``/proc/*/maps``), not by system-wide memory figures that other processes move.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import resource
import signal
import socket
import tempfile
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

import shmstore
from shmstore import Checkpoint, DecodeError, ShmstoreError
from shmstore.backends import wire
from shmstore.core import segment
from shmstore.core.codec import DEFAULT_CODEC, PAGE, Split, is_split
from shmstore.core.config import parse_url
from shmstore.core.limits import DEFAULT_MAX_CHECKPOINT_BYTES, PLANE_MAX_CHECKPOINT_BYTES
from shmstore.core.record import Record

from .helpers import SPAWN, reaped, wait_until

numpy = pytest.importorskip("numpy", reason="the data plane's arrays are numpy arrays")

pytestmark = [
    pytest.mark.skipif(not segment.available(), reason="needs memfd_create and file seals "
                       "(Linux 3.17+); elsewhere every state is bytes on the socket"),
    pytest.mark.timeout(120),
]

MiB = 1024 * 1024


def _array(nbytes: int, start: float = 0.0) -> Any:
    return numpy.arange(nbytes // 8, dtype=numpy.float64) + start


@pytest.fixture
def plane_server() -> Iterator[shmstore.StoreServer]:
    with shmstore.serve(export=False) as server:
        yield server


# -- the split encoding --------------------------------------------------------------------


def test_split_encoding_puts_large_arrays_page_aligned_after_the_skeleton() -> None:
    big, other = _array(3 * PAGE + 8), numpy.arange(1000, dtype=numpy.int32).reshape(10, 100)
    state = {"big": big, "small": numpy.arange(4), "other": other, "n": [1, "x", b"y"]}
    split = DEFAULT_CODEC.encode_split(state, above=1000)
    assert isinstance(split, Split)
    assert [offset % PAGE for offset, _ in split.buffers] == [0, 0]
    data = split.tobytes()
    assert is_split(data) and len(data) == split.size
    back = DEFAULT_CODEC.decode(data, copy=False)
    assert back["n"] == [1, "x", b"y"]
    assert numpy.array_equal(back["big"], big) and numpy.array_equal(back["other"], other)
    assert back["other"].shape == (10, 100) and back["other"].dtype == numpy.int32
    # Views of the encoding itself (read-only, as bytes are), except the small inline one.
    assert not back["big"].flags.writeable and not back["big"].flags.owndata
    assert back["small"].flags.writeable
    copied = DEFAULT_CODEC.decode(data, copy=True)
    assert copied["big"].flags.writeable and copied["big"].flags.owndata


def test_split_encoding_of_a_state_without_large_arrays_is_the_plain_encoding() -> None:
    state = {"a": numpy.arange(10), "s": "x" * 10_000}
    assert DEFAULT_CODEC.encode_split(state, above=1024) == DEFAULT_CODEC.encode(state)


def test_split_encoding_takes_non_contiguous_and_empty_arrays() -> None:
    strided = _array(64 * 1024).reshape(64, 128)[:, ::2]
    fortran = numpy.asfortranarray(_array(64 * 1024).reshape(128, 64))
    state = {"strided": strided, "fortran": fortran, "empty": numpy.zeros((0, 5))}
    back = DEFAULT_CODEC.decode(DEFAULT_CODEC.encode_split(state, above=1).tobytes())
    assert numpy.array_equal(back["strided"], strided)
    assert numpy.array_equal(back["fortran"], fortran)
    assert back["empty"].shape == (0, 5)


@pytest.mark.parametrize("damage", ["truncated", "offset outside", "header only"])
def test_a_damaged_split_encoding_is_a_decode_error(damage: str) -> None:
    data = bytearray(DEFAULT_CODEC.encode_split({"a": _array(2 * PAGE)}, above=1).tobytes())
    if damage == "truncated":
        data = data[:-8]
    elif damage == "offset outside":
        data = data[:len(data) - PAGE]
    else:
        data = data[:24]
    with pytest.raises(DecodeError):
        DEFAULT_CODEC.decode(bytes(data))


def test_an_array_reference_outside_a_split_encoding_is_a_decode_error() -> None:
    split = DEFAULT_CODEC.encode_split({"a": _array(2 * PAGE)}, above=1)
    assert isinstance(split, Split)
    skeleton = split.head[24:]  # the msgpack part alone, with its reference
    with pytest.raises(DecodeError, match="out of line"):
        DEFAULT_CODEC.decode(skeleton)


# -- segments ----------------------------------------------------------------------------


def test_a_segment_is_sealed_and_nobody_can_change_it() -> None:
    seg = segment.write(b"abc" * 1000)
    try:
        seals = fcntl.fcntl(seg.fd, fcntl.F_GET_SEALS)
        assert seals & segment.SEALS == segment.SEALS and seals & fcntl.F_SEAL_SEAL
        with pytest.raises(PermissionError):
            os.pwrite(seg.fd, b"x", 0)
        with pytest.raises(PermissionError):
            os.ftruncate(seg.fd, 10)
        with pytest.raises(PermissionError):  # no writable shared mapping either
            mmap.mmap(seg.fd, len(seg), flags=mmap.MAP_SHARED, prot=mmap.PROT_WRITE)
        assert seg.read() == b"abc" * 1000
    finally:
        seg.close()


def _unsealed(size: int) -> int:
    fd = os.memfd_create("hostile", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    return fd


HOSTILE = ["unsealed memfd", "writable memfd (no write seal)", "regular file", "pipe",
           "socket", "sealed, larger than announced", "sealed, smaller than announced"]


def _hostile(kind: str) -> tuple[int, int]:
    """What a peer could pass instead of a sealed segment: (its fd, the announced size)."""
    if kind == "unsealed memfd":
        return _unsealed(4096), 4096
    if kind == "writable memfd (no write seal)":
        fd = _unsealed(4096)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        return fd, 4096
    if kind == "regular file":
        with tempfile.TemporaryFile() as tmp:
            tmp.write(b"x" * 4096)
            tmp.flush()
            return os.dup(tmp.fileno()), 4096
    if kind == "pipe":
        read_end, write_end = os.pipe()
        os.close(write_end)
        return read_end, 4096
    if kind == "socket":
        left, right = socket.socketpair()
        right.close()
        return left.detach(), 4096
    good = segment.write(b"y" * 4096)
    fd = os.dup(good.fd)
    good.close()
    return fd, 1024 if kind == "sealed, larger than announced" else 1 << 20


@pytest.mark.parametrize("kind", HOSTILE)
def test_adopt_and_map_refuse_every_descriptor_that_is_not_a_sealed_segment(kind: str) -> None:
    for taker in (segment.adopt, segment.map_descriptor):
        fd, size = _hostile(kind)
        with pytest.raises(ShmstoreError, match="refused a memory segment"):
            taker(fd, size)
        with pytest.raises(OSError):  # it was closed, whatever it was
            os.fstat(fd)


# -- the plane through a server -------------------------------------------------------------


def _memfd_inodes(pid: int) -> set[int]:
    """Inodes of the memory files ``pid`` holds open or maps."""
    found: set[int] = set()
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{name}").startswith("/memfd:"):
                    found.add(os.stat(f"/proc/{pid}/fd/{name}").st_ino)
            except OSError:
                continue
        with open(f"/proc/{pid}/maps") as maps:
            for line in maps:
                fields = line.split()
                if len(fields) >= 6 and fields[5].startswith("/memfd:"):
                    found.add(int(fields[4]))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return found


def _descriptors(pid: int) -> dict[str, str]:
    """What ``pid`` holds open, by descriptor number."""
    out = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[name] = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
    return out


def _server_descriptors(server: shmstore.StoreServer) -> dict[str, str]:
    """The server's descriptors once it serves (its accepter holds a spare one)."""
    with server.connect() as store:
        store.stats()
    return _descriptors(server.pid)


def _holds_no_more_than(pid: int, before: dict[str, str]) -> bool:
    now = _descriptors(pid)
    extra = {k: v for k, v in now.items() if before.get(k) != v}
    return not extra


def _holders(inode: int) -> list[int]:
    """Every process that still holds or maps the memory file ``inode``."""
    return [p.pid for p in psutil.process_iter() if inode in _memfd_inodes(p.pid)]


def test_large_states_travel_as_segments_and_load_as_shared_read_only_views(
    plane_server: shmstore.StoreServer,
) -> None:
    store = plane_server.connect()
    array = _array(8 * MiB, 1.0)
    with store:
        cp = store.save(Checkpoint(execution_id="run", state={"array": array, "n": 7},
                                   metadata={"m": 1}))
        stats = store.stats()
        assert stats.segments == 1 and stats.segment_bytes == stats.payload_bytes
        assert stats.payload_bytes >= array.nbytes
        # The server holds the descriptor and never maps it: its RSS has no copy.
        server_inodes = _memfd_inodes(plane_server.pid)
        assert len(server_inodes) == 1
        with open(f"/proc/{plane_server.pid}/maps") as maps:
            assert "memfd:" not in maps.read()
        got = store.load(cp.id)
        view = got.state["array"]
        assert numpy.array_equal(view, array) and got.state["n"] == 7
        assert got.metadata == {"m": 1}
        assert not view.flags.writeable
        with pytest.raises(ValueError):
            view[0] = 5.0
        assert _memfd_inodes(os.getpid()) == server_inodes  # mapped here: the same file
        private = store.load(cp.id, copy=True).state["array"]
        private[0] = 5.0
        assert private.flags.writeable and view[0] == 1.0
        # Deleting drops the server's descriptor; the view handed out stays valid.
        assert store.delete(cp.id)
        assert store.stats().segments == 0 and not _memfd_inodes(plane_server.pid)
        assert float(view.sum()) == float(array.sum())
        (inode,) = server_inodes
        del got, view
        assert _holders(inode) == []


def test_a_socket_only_client_and_a_tcp_server_never_use_segments(
    plane_server: shmstore.StoreServer,
) -> None:
    array = _array(1 * MiB)
    with plane_server.connect(data_plane=False) as socket_only, plane_server.connect() as plane:
        cp = socket_only.save(Checkpoint(execution_id="r", state={"a": array}))
        assert plane.stats().segments == 0
        shared = plane.save(Checkpoint(execution_id="r", state={"a": array}))
        assert plane.stats().segments == 1
        # A client without the plane gets the segment's bytes on the socket.
        for cid in (cp.id, shared.id):
            assert numpy.array_equal(socket_only.load(cid).state["a"], array)
            assert numpy.array_equal(plane.load(cid).state["a"], array)
    with shmstore.serve("tcp://127.0.0.1:0", export=False) as tcp, tcp.connect() as store:
        assert store._plane_threshold is None
        store.save(Checkpoint(execution_id="r", state={"a": array}))
        assert store.stats().segments == 0
        assert store.limits().max_checkpoint_bytes == DEFAULT_MAX_CHECKPOINT_BYTES


def test_a_server_without_the_plane_takes_plane_clients_with_bytes() -> None:
    with shmstore.serve(export=False, data_plane=False) as server, server.connect() as store:
        cp = store.save(Checkpoint(execution_id="r", state={"a": _array(MiB)}))
        assert store.stats().segments == 0
        assert numpy.array_equal(store.load(cp.id).state["a"], _array(MiB))
        assert store.limits().max_checkpoint_bytes == DEFAULT_MAX_CHECKPOINT_BYTES


def test_the_plane_default_limit_takes_gib_states_and_a_given_one_stands() -> None:
    with shmstore.serve(export=False) as server, server.connect() as store:
        assert store.limits().max_checkpoint_bytes == PLANE_MAX_CHECKPOINT_BYTES >= 2**30
    with shmstore.serve(export=False, limits={"max_checkpoint_bytes": MiB}) as server, \
            server.connect() as store:
        with pytest.raises(shmstore.StoreFull, match="max_checkpoint_bytes"):
            store.save(Checkpoint(execution_id="r", state={"a": _array(2 * MiB)}))
        assert store.stats().segments == 0 and store.stats().checkpoints == 0


def test_save_many_and_load_many_pass_more_descriptors_than_one_sendmsg_carries(
    plane_server: shmstore.StoreServer,
) -> None:
    count = wire.FDS_PER_SEND + 30
    with plane_server.connect(data_plane_threshold=1) as store:
        cps = store.save_many(Checkpoint(execution_id="many", state={"a": numpy.full(4, i)})
                              for i in range(count))
        assert store.stats().segments == count
        loaded = store.load_many([cp.id for cp in cps])
        assert [int(cp.state["a"][0]) for cp in loaded] == list(range(count))
        assert len(store.list("many")) == count
        assert store.clear("many") == count
        assert store.stats().segments == 0


def test_descriptors_close_once_a_message_is_sent_and_nothing_is_held_on_either_side(
    plane_server: shmstore.StoreServer,
) -> None:
    with plane_server.connect() as store:
        store.stats()  # a connection is open: later descriptor counts compare to this
        mine_before = len(os.listdir("/proc/self/fd"))
        for i in range(20):
            cp = store.save(Checkpoint(execution_id="r", state={"a": _array(MiB, i)}))
            assert float(store.load(cp.id).state["a"][0]) == float(i)
        assert len(os.listdir("/proc/self/fd")) == mine_before
        assert segment.held() == (0, 0)
        assert store.stats().segments == 20
        store.clear("r")
        assert store.stats().segments == 0


# -- a peer that sends descriptors it should not ---------------------------------------------


def _raw_channel(server: shmstore.StoreServer) -> wire.Channel:
    return wire.open_connection(parse_url(server.url), server.authkey,
                                timeout=10.0, data_plane=True)


def _record(state: object) -> Record:
    return Record("cid", "hostile", "", 0, 0, None, b"\x80", state)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", HOSTILE)
def test_the_server_refuses_a_hostile_descriptor_and_serves_on(
    plane_server: shmstore.StoreServer, kind: str,
) -> None:
    fd, size = _hostile(kind)
    server_fds = _server_descriptors(plane_server)
    chan = _raw_channel(plane_server)
    try:
        assert chan.passes_fds
        fake = segment.Segment(fd, size)
        chan.send_message(("save", (_record(fake), None)))
        fake.close()
        kind_, answer = chan.unpack(chan.recv())
        assert kind_ == "#ERROR" and "refused a memory segment" in str(answer)
        chan.send_message(("executions", ()))
        assert chan.unpack(chan.recv()) == ["#RETURN", []]
    finally:
        chan.close()
    with plane_server.connect() as store:
        assert store.stats().segments == 0 and store.stats().checkpoints == 0
    # The refused descriptor was closed: the server holds what it held before (plus, for
    # a moment, the connection just closed).
    assert wait_until(lambda: _holds_no_more_than(plane_server.pid, server_fds), 10.0), \
        {k: v for k, v in _descriptors(plane_server.pid).items() if server_fds.get(k) != v}


def test_a_segment_reference_without_its_descriptor_is_an_error_not_a_hang(
    plane_server: shmstore.StoreServer,
) -> None:
    import msgpack

    chan = _raw_channel(plane_server)
    try:
        forged = msgpack.ExtType(65, b"\x00\x00\x00\x00" + (4096).to_bytes(8, "big"))
        chan.send(wire.pack(("save", (_record(forged), None))))
        kind, answer = chan.unpack(chan.recv())
        assert kind == "#ERROR" and "without its descriptor" in str(answer)
        chan.send_message(("executions", ()))
        assert chan.unpack(chan.recv()) == ["#RETURN", []]
    finally:
        chan.close()


def test_descriptors_sent_before_authenticating_never_reach_the_server(
    plane_server: shmstore.StoreServer,
) -> None:
    server_fds = _server_descriptors(plane_server)
    seg = segment.write(b"z" * 4096)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10.0)
        sock.connect(plane_server.url.removeprefix("unix://"))
        fds = [seg.fd] * 8
        sock.sendmsg([b"\x00\x00\x00\x08garbage!"],
                     [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(numpy.array(fds, "i4")))])
        while sock.recv(4096):  # the server answers the handshake's failure and hangs up
            pass
    seg.close()
    assert wait_until(lambda: _holds_no_more_than(plane_server.pid, server_fds), 10.0), \
        {k: v for k, v in _descriptors(plane_server.pid).items() if server_fds.get(k) != v}
    assert not _memfd_inodes(plane_server.pid)


# -- lifetime: whoever is SIGKILLed, nothing is left ------------------------------------------


def _save_and_report(url: str, authkey: bytes, nbytes: int, phase: str, conn: Any) -> None:
    """Child: make a segment (and save it, unless ``phase`` says not yet), report its
    inode, then wait to be killed."""
    store = shmstore.connect(url, authkey=authkey)
    state = {"a": _array(nbytes, 3.0)}
    if phase == "segment written, not sent":
        seg = segment.share(DEFAULT_CODEC.encode_split(state, above=1), 1)
        assert isinstance(seg, segment.Segment)
        conn.send(os.fstat(seg.fd).st_ino)
    else:
        cp = store.save(Checkpoint(execution_id="kill", state=state))
        conn.send(cp.id)
    conn.recv()  # never comes: the parent kills us


def _load_and_report(url: str, authkey: bytes, cid: str, conn: Any) -> None:
    """Child: load a checkpoint as views, touch every page, report, wait to be killed."""
    store = shmstore.connect(url, authkey=authkey)
    array = store.load(cid).state["a"]
    conn.send((float(array.sum()), sorted(_memfd_inodes(os.getpid()))))
    conn.recv()


def _kill(proc: Any) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    assert proc.exitcode == -signal.SIGKILL


def _start(target: Any, *args: Any) -> tuple[Any, Any]:
    parent, child = SPAWN.Pipe()
    proc = SPAWN.Process(target=target, args=(*args, child), daemon=True)
    return proc, parent


def test_a_saver_killed_before_sending_leaves_no_segment(
    plane_server: shmstore.StoreServer,
) -> None:
    proc, conn = _start(_save_and_report, plane_server.url, plane_server.authkey, MiB,
                        "segment written, not sent")
    with reaped(proc, timeout=5):
        assert conn.poll(60)
        inode = conn.recv()
        assert _holders(inode) == [proc.pid]
        _kill(proc)
    assert _holders(inode) == []


def test_segments_outlive_their_saver_and_reader_and_go_with_the_last_holder() -> None:
    size = 16 * MiB
    expected = float(_array(size, 3.0).sum())
    server = shmstore.serve(export=False)
    try:
        saver, saver_conn = _start(_save_and_report, server.url, server.authkey, size,
                                   "saved")
        with reaped(saver, timeout=5):
            assert saver_conn.poll(60)
            cid = saver_conn.recv()
            _kill(saver)  # the saver is gone; the checkpoint is the server's
        (inode,) = _memfd_inodes(server.pid)
        reader, reader_conn = _start(_load_and_report, server.url, server.authkey, cid)
        other, other_conn = _start(_load_and_report, server.url, server.authkey, cid)
        with reaped(reader, other, timeout=5):
            assert reader_conn.poll(60) and other_conn.poll(60)
            for conn in (reader_conn, other_conn):
                total, inodes = conn.recv()
                assert total == expected and inodes == [inode]
            assert sorted(_holders(inode)) == sorted([server.pid, reader.pid, other.pid])
            _kill(reader)  # a reader killed while it maps the segment
            assert sorted(_holders(inode)) == sorted([server.pid, other.pid])
            os.kill(server.pid, signal.SIGKILL)  # the server killed while it holds it
            assert wait_until(lambda: not server.running, 10)
            assert _holders(inode) == [other.pid]  # the last reader's view lives on
            _kill(other)
        assert _holders(inode) == []
    finally:
        server.shutdown()


def test_a_reader_can_use_its_views_after_the_server_is_gone(tmp_path: Any) -> None:
    with shmstore.serve(export=False) as server, server.connect() as store:
        cp = store.save(Checkpoint(execution_id="r", state={"a": _array(4 * MiB, 2.0)}))
        view = store.load(cp.id).state["a"]
        (inode,) = _memfd_inodes(server.pid)
    assert not server.running
    assert float(view.sum()) == float(_array(4 * MiB, 2.0).sum())
    assert _holders(inode) == [os.getpid()]
    del view
    assert _holders(inode) == []


# -- descriptors are a resource ---------------------------------------------------------------


def test_near_its_descriptor_limit_the_server_keeps_states_as_bytes() -> None:
    with shmstore.serve(export=False) as server, server.connect() as store:
        proc = psutil.Process(server.pid)
        _soft, hard = proc.rlimit(psutil.RLIMIT_NOFILE)
        open_now = proc.num_fds()
        room = 10
        proc.rlimit(psutil.RLIMIT_NOFILE, (open_now + segment.DESCRIPTOR_RESERVE + room, hard))
        arrays = [_array(MiB, i) for i in range(room * 3)]
        cps = store.save_many(Checkpoint(execution_id="fd", state={"a": a}) for a in arrays)
        stats = store.stats()
        assert 0 < stats.segments <= room and stats.checkpoints == len(arrays)
        assert stats.payload_bytes >= sum(a.nbytes for a in arrays)
        for cp, array in zip(cps, arrays, strict=True):
            assert numpy.array_equal(store.load(cp.id).state["a"], array)
        assert store.clear("fd") == len(arrays)
        assert store.stats().segments == 0


def test_a_client_that_cannot_make_a_segment_sends_bytes(
    plane_server: shmstore.StoreServer,
) -> None:
    state = {"a": _array(MiB)}
    with plane_server.connect() as store:
        store.stats()  # its connection is open and idle: the save needs no new descriptor
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        highest = max(int(n) for n in os.listdir("/proc/self/fd"))
        fillers: list[int] = []
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 16, hard))
        try:
            with pytest.raises(OSError):  # every descriptor this process may have is open
                while True:
                    fillers.append(os.open(os.devnull, os.O_RDONLY))
            cp = store.save(Checkpoint(execution_id="r", state=state))
        finally:
            for fd in fillers:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert store.stats().segments == 0
        assert numpy.array_equal(store.load(cp.id).state["a"], state["a"])


# -- several messages in flight on one connection ------------------------------------------------


def test_pipelined_requests_keep_their_descriptors_apart(
    plane_server: shmstore.StoreServer,
) -> None:
    """Requests written back to back, some carrying segments: the server reads them
    glued together (the kernel ends a read at bytes carrying descriptors, not before),
    and each request gets its own descriptors, none dropped with the one before."""
    chan = _raw_channel(plane_server)
    states = [bytes([i]) * (PAGE + i) for i in range(3)]
    segs = [segment.write(DEFAULT_CODEC.encode(state)) for state in states]
    os.kill(plane_server.pid, signal.SIGSTOP)  # so that they queue up in its socket
    try:
        assert wait_until(lambda: psutil.Process(plane_server.pid).status()
                          == psutil.STATUS_STOPPED, 10)
        for i, seg in enumerate(segs):
            chan.send_message(("executions", ()))  # no descriptor, just before one
            chan.send_message(("save", (Record(f"piped-{i}", "piped", "", 0, 0, None,
                                               b"\x80", seg), None)))
    finally:
        os.kill(plane_server.pid, signal.SIGCONT)
    try:
        for seg in segs:
            seg.close()
        answers = [chan.unpack(chan.recv()) for _ in range(6)]
    finally:
        chan.close()
    assert [kind for kind, _ in answers] == ["#RETURN"] * 6, answers
    assert [version for _, version in answers[1::2]] == [1, 2, 3]
    with plane_server.connect() as store:
        assert [cp.state for cp in store.list("piped")] == states
        store.clear("piped")
