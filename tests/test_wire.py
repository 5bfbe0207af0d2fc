"""`Channel`: framing over a real socket pair, and the packer buffer it keeps."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from multiprocessing import connection

import pytest

from shmstore.backends.wire import CLIENT_KEEP, LARGE_START, Channel, unpack


@pytest.fixture
def pair() -> Iterator[tuple[Channel, Channel]]:
    a, b = socket.socketpair()
    left = Channel(connection.Connection(a.detach()))
    right = Channel(connection.Connection(b.detach()))
    yield left, right
    left._conn.close()
    right._conn.close()


def test_messages_of_every_size_arrive_whole_and_in_order(pair: tuple[Channel, Channel]) -> None:
    import threading

    left, right = pair
    messages = [("op", i, b"x" * size) for i, size in
                enumerate([0, 1, 100, 16 * 1024, 16 * 1024 + 1, 64 * 1024, 3 * LARGE_START])]
    sender = threading.Thread(target=lambda: [left.send_message(m) for m in messages])
    sender.start()
    got = [tuple(unpack(right.recv())) for _ in messages]
    sender.join(10)
    assert got == [tuple(m) for m in messages]


def test_a_huge_message_does_not_leave_a_huge_packer_behind(
    pair: tuple[Channel, Channel],
) -> None:
    import threading

    left, right = pair
    small = left._packer
    left.send_message(("small", b"x" * 1000))
    assert left._packer is small  # kept: no allocation per message
    unpack(right.recv())
    # Up to CLIENT_KEEP, the packer and the receiver's large buffer are kept for the next
    # message (no fresh pages to fault in for each); past it, they go with the message.
    for size, kept in ((2 * LARGE_START, True), (CLIENT_KEEP + 1, False)):
        before = left._packer
        sender = threading.Thread(target=left.send_message, args=(("big", b"x" * size),))
        sender.start()
        assert len(unpack(right.recv())[1]) == size
        sender.join(10)
        assert (left._packer is before) is kept
        assert (len(right._large) >= size) is kept
    left.send_message(("after", 1))
    assert unpack(right.recv()) == ["after", 1]


def test_an_unpackable_message_leaves_the_channel_usable(pair: tuple[Channel, Channel]) -> None:
    left, right = pair
    with pytest.raises(TypeError):
        left.send_message(("bad", object()))
    left.send_message(("good", 2))
    assert unpack(right.recv()) == ["good", 2]
