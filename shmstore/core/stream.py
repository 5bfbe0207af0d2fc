"""Following an execution: `Cleared`, and `FollowCursor`, the logic of ``follow``.

`BaseStore.follow` yields every checkpoint of an execution in version order as it is
saved.  What it asks the store next, where it stands and what it yields is decided here,
once, by a cursor that does no I/O: a driver asks it for a request, runs that request on
a `Backend` (blocking calls in `BaseStore.follow`; awaits in an asyncio store), hands the
answer back and yields what the cursor returns.  Two requests exist:

- `WaitFor`: the backend's ``wait(execution_id, after_version, timeout, generation)``,
  answered with `FollowCursor.on_wait`.  ``block`` False is a probe (timeout 0); with
  ``block`` True the driver waits up to the time it has left (one ``wait_slice`` at most,
  then it asks again: the cursor asks the same again after a slice that ran out).
- `ListAbove`: the backend's ``list(execution_id, limit, None, False, after_version)``
  (oldest first), answered with `FollowCursor.on_list`.

A driver, whole (``backend`` a `Backend`; ``decode`` turns a `Record` into a Checkpoint)::

    cursor = FollowCursor("run", after_version=0)
    while True:
        request = cursor.request()
        if isinstance(request, ListAbove):
            items = cursor.on_list(backend.list(cursor.execution_id, request.limit, None,
                                                False, request.after_version))
        else:
            timeout = slice_left if request.block else 0.0
            items = cursor.on_wait(*backend.wait(cursor.execution_id,
                                                 request.after_version, timeout,
                                                 request.generation))
        for item in items:
            yield item if isinstance(item, Cleared) else decode(item)

Why it is right.  Versions restart at 1 when an execution empties (clear, delete of its
last checkpoint, purge, eviction), and each emptying gives it a new *generation*
(store-wide unique).  ``wait`` is atomic: it answers the execution's latest record with
the generation it is in now, so a record from ``wait`` is placed exactly: a generation
other than the one followed so far means the execution was emptied since, and the
cursor returns a `Cleared` marker and goes on from version 0 of the new generation.
``list`` carries no generation, so a page read with it is held back until a probe
(``wait`` with timeout 0, after the list) answers in the generation the cursor follows:
the page was read in that generation, then.  Otherwise the page is dropped (its
checkpoints were cleared, and are as good as deleted before being read) and the next
``wait`` reports the clear.  A clear is therefore seen when the new generation has a
checkpoint: at its first save, or at once if it has one already; an emptied execution
that nobody saves into again reports nothing.  When the record ``wait`` answers is the
next version, it is returned at once, without a ``list``: a follower that keeps up costs
one round trip per checkpoint.

Resuming: the position is `FollowCursor.version`, the version of the last checkpoint
returned (0 after a `Cleared`).  A new cursor at that version returns exactly what comes
after it, in the generation the execution is in when it starts; a clear between the two
cursors is reported only if the execution is empty when the new one starts (the next
checkpoint it sees is then reported after a `Cleared`), since a version alone does not
say which generation it was of.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Final

from .checkpoint import validate_id
from .record import Record
from .validate import count

__all__ = ["FOLLOW_BATCH", "Cleared", "FollowCursor", "ListAbove", "WaitFor"]

#: How many checkpoints one ``list`` of a follower asks for at most: a long backlog comes
#: in pages, never in one message.
FOLLOW_BATCH: Final = 256


@dataclasses.dataclass(frozen=True)
class Cleared:
    """What ``follow`` yields when the execution it follows was emptied (cleared, or its
    checkpoints deleted, purged or evicted): after it, the execution's versions start
    again from 1, and ``follow`` goes on with them.

    Parameters:
        execution_id: the execution followed.
        last_version: the version of the last checkpoint yielded before the clear (the
            follow's position then; 0 if none was).

    Example:
        >>> for item in store.follow("run", timeout=5):
        ...     if isinstance(item, Cleared):
        ...         print("run restarted after version", item.last_version)
    """

    execution_id: str
    last_version: int


@dataclasses.dataclass(frozen=True)
class WaitFor:
    """Ask the backend's ``wait(execution_id, after_version, timeout, generation)``.

    ``block``: False, a probe (timeout 0); True, wait up to the time left (the driver
    bounds each call by its ``wait_slice``).
    """

    after_version: int
    generation: int
    block: bool


@dataclasses.dataclass(frozen=True)
class ListAbove:
    """Ask the backend's ``list(execution_id, limit, None, False, after_version)``."""

    after_version: int
    limit: int


class _Next(enum.Enum):
    PROBE = "probe"  # wait with timeout 0
    WAIT = "wait"    # wait with the time left
    LIST = "list"    # a page above the position


class FollowCursor:
    """Where a follower of one execution stands, and what it must ask next (no I/O).

    Call `request`, run it, pass the answer to `on_wait` or `on_list` (whichever the
    request was), yield the items they return, in order: records (decode them) and
    `Cleared` markers.  The cursor counts every item it returns as yielded.

    Parameters:
        execution_id: the execution to follow.
        after_version: return only what comes after this version (0: everything).
        batch: the most checkpoints one `ListAbove` asks for.

    Raises:
        ConfigError: a bad execution id, or ``after_version`` or ``batch`` is not a
            suitable int.

    Example:
        >>> cursor = FollowCursor("run", after_version=3)
        >>> cursor.request()
        WaitFor(after_version=0, generation=0, block=False)
    """

    __slots__ = ("_cleared", "_generation", "_known", "_next", "_pending", "batch",
                 "execution_id", "version")

    def __init__(self, execution_id: str, *, after_version: int = 0,
                 batch: int = FOLLOW_BATCH) -> None:
        self.execution_id = validate_id(execution_id, "execution_id")
        #: The position: the version of the last checkpoint returned (or ``after_version``;
        #: 0 after a `Cleared`).  A new cursor with ``after_version=`` this goes on after it.
        self.version: int = count(after_version, "after_version")
        self.batch: int = count(batch, "batch", minimum=1)
        self._generation = 0     # what to pass to the next wait
        self._known = False      # whether _generation is that of the records returned
        self._pending: list[Record] | None = None  # a page waiting for its probe
        self._cleared: int | None = None  # a Cleared owed at the next checkpoint
        # The first request is a probe: it learns the generation before anything is
        # read, so that a clear during the first wait is seen.
        self._next = _Next.PROBE

    def __repr__(self) -> str:
        return (f"FollowCursor({self.execution_id!r}, version={self.version}, "
                f"generation={self._generation}, next={self._next.value})")

    def request(self) -> WaitFor | ListAbove:
        """What to ask the backend next."""
        if self._next is _Next.LIST:
            return ListAbove(self.version, self.batch)
        if self._next is _Next.PROBE:
            return WaitFor(0, self._generation, block=False)
        return WaitFor(self.version, self._generation, block=True)

    def on_wait(self, record: Record | None,
                generation: int) -> list[Record | Cleared]:
        """Take the answer to a `WaitFor`: ``(record, generation)`` as ``wait`` gave them;
        return the items to yield (possibly none)."""
        probe = self._next is _Next.PROBE
        self._next = _Next.WAIT
        if record is None:
            if probe and self._pending is None and not self._known and self.version:
                # Empty when we start: whatever comes is a new run of the execution, from
                # version 1, and the checkpoints up to our position are gone.
                self._cleared, self.version = self.version, 0
            # A page held back is dropped: the execution is empty now, so it was cleared
            # after it was read, and maybe before (the next wait says so).
            self._pending = None
            self._generation = generation
            return []
        items: list[Record | Cleared] = []
        if self._known and generation != self._generation:
            items.append(Cleared(self.execution_id, self.version))
            self.version, self._pending = 0, None
        elif self._cleared is not None:
            items.append(Cleared(self.execution_id, self._cleared))
        self._cleared = None
        self._known, self._generation = True, generation
        if self._pending is not None:  # the probe places the page in our generation
            items.extend(self._pending)
            self.version = self._pending[-1].version
            self._pending = None
        version = record.version
        if version == self.version + 1:
            items.append(record)  # the next one: no list needed
            self.version = version
        elif version > self.version:
            self._next = _Next.LIST
        return items

    def on_list(self, records: list[Record]) -> list[Record | Cleared]:
        """Take the answer to a `ListAbove`; return the items to yield (none: the page is
        held until the probe that follows places it in the generation followed)."""
        page = [r for r in records if r.version > self.version]
        if not page:  # what was above the position is gone (deleted): wait for more
            self._next = _Next.WAIT
            return []
        self._pending = page
        self._next = _Next.PROBE
        return []
