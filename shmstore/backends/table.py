"""`CheckpointTable`: the in-memory map of checkpoint records that a store owns.

The table is codec-free: a record's state and metadata are bytes that it never decodes.
Only the small header (ids, node name, version, timestamp, parent) is kept as values,
so that the table can index, order and filter.  One lock guards everything; waiters on
an execution sleep on a condition of that lock and are woken by the save that gives
them what they wait for.

Claims serve ``load_or_compute``: a claim on (execution, node) either finds the node's
latest record, or grants a lease (a token that expires unless renewed) to exactly one
caller, or sleeps on the execution's condition until a record appears, the lease is
released, or the lease expires (a timed wait on the same condition: nothing polls).
Leases live beside the records and never count as checkpoints.

A record is a `Record` (a NamedTuple: a tuple's per-entry memory, with named fields);
callers send records with version 0, the table assigns the version.

Limits (`Limits`; what they mean is in core/limits.py, how they are applied in
core/rules.py, whose functions the table calls) are checked under the same lock before
anything is written, so a refused save touches nothing.  The
store-wide order for eviction is save order, which is the order of ``_records`` (a dict
keeps insertion order, and a re-saved id is removed and inserted again).
"""

from __future__ import annotations

import builtins
import heapq
import itertools
import os
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any, Final

from ..core import rules
from ..core.backend import (
    BUSY,
    DONE,
    GRANTED,
    HELD,
    SAVED,
    TABLE_OPS,
    ClaimAnswer,
    CompleteAnswer,
    EncodedWhere,
    Found,
    StatsDict,
    TableOps,
)
from ..core.errors import StoreFull
from ..core.limits import Limits, LimitsDict
from ..core.record import Record
from ..core.rules import decode_where, not_found, purge_plan, with_children
from ..monitor.sampler import OwnMemory

__all__ = ["BUSY", "DONE", "GRANTED", "HELD", "SAVED", "TABLE_OPS", "CheckpointTable",
           "Record"]

SHRINK_MIN = 1024  # below this many records a dict's slack is not worth a rebuild
RSS_MAX_AGE = 0.05  # seconds a measured RSS stays good enough for ``max_rss``
LARGEST = 5  # executions listed by size in stats

class _Execution:
    """Index of one execution: version -> id in version order, its high-water mark and
    its generation (store-wide unique; a new one each time the execution empties)."""

    __slots__ = ("dropped", "generation", "high", "name", "nbytes", "versions", "waiters",
                 "waiting")

    def __init__(self, name: str, generation: int) -> None:
        self.name = name
        self.nbytes = 0  # payload bytes of its records
        self.dropped = 0  # oldest-first removals since ``versions`` was last compacted
        # Versions only ever grow and are inserted in order, so a dict's insertion order
        # is version order: append, delete and "latest" are all O(1).
        self.versions: dict[int, str] = {}
        self.high = 0
        self.generation = generation
        self.waiters: threading.Condition | None = None
        self.waiting = 0

    def latest_version(self) -> int:
        return next(reversed(self.versions)) if self.versions else 0


class _Largest:
    """The `LARGEST` executions by payload, kept as they change, so that ``stats`` costs
    the same with 100 or 100,000 executions (a scan of every one took ~4 ms at 10,000).

    A max-heap of ``(-nbytes, seq, execution)`` entries.  A save only notes that its
    execution grew (`grew`: a set, no heap work on the hot path); a read (`top`) pushes
    the noted ones that reach the floor (the smallest of the last read's top), then
    pops in order, re-pushing entries that went stale (the execution shrank) at their
    size now and dropping those of executions gone or empty.  An execution under the
    floor may have no entry: a read whose top falls under the floor rebuilds the heap
    from every execution (one scan, after the largest were cleared, not after saves),
    and so does one that finds the heap four times as long as there are executions.
    """

    __slots__ = ("floor", "grown", "heap", "seq", "stale")

    #: Noted executions between two reads at most; past it, the next read rebuilds (a
    #: store that nobody asks for stats must not keep every execution it ever had).
    GROWN_MAX = 4096

    def __init__(self) -> None:
        self.heap: list[tuple[int, int, _Execution]] = []
        self.grown: set[_Execution] = set()
        self.floor = 0
        self.seq = itertools.count()
        self.stale = False

    def grew(self, execution: _Execution) -> None:
        grown = self.grown
        grown.add(execution)
        if len(grown) > self.GROWN_MAX:
            grown.clear()
            self.stale = True

    def _rebuild(self, executions: dict[str, _Execution]) -> None:
        seq = self.seq
        self.heap = [(-ex.nbytes, next(seq), ex) for ex in executions.values() if ex.versions]
        heapq.heapify(self.heap)
        self.grown.clear()
        self.floor = 0
        self.stale = False

    def top(self, executions: dict[str, _Execution]) -> list[_Execution]:
        """The largest non-empty executions, largest first (at most `LARGEST`)."""
        if self.stale or len(self.heap) > 4 * len(executions) + 64:
            self._rebuild(executions)
        heap, seq = self.heap, self.seq
        for ex in self.grown:
            if ex.nbytes >= self.floor:
                heapq.heappush(heap, (-ex.nbytes, next(seq), ex))
        self.grown.clear()
        found = self._pop_top(executions)
        if len(found) < LARGEST or found[-1].nbytes < self.floor:
            self._rebuild(executions)
            found = self._pop_top(executions)
        self.floor = found[-1].nbytes if len(found) == LARGEST else 0
        return found

    def _pop_top(self, executions: dict[str, _Execution]) -> list[_Execution]:
        heap, seq = self.heap, self.seq
        found: list[_Execution] = []
        kept: list[tuple[int, int, _Execution]] = []
        while heap and len(found) < LARGEST:
            entry = heapq.heappop(heap)
            negative, _, ex = entry
            if executions.get(ex.name) is not ex or not ex.versions or ex in found:
                continue  # gone, empty, or an older entry of one already found
            if ex.nbytes != -negative:  # stale: meet it again at its size now
                heapq.heappush(heap, (-ex.nbytes, next(seq), ex))
                continue
            found.append(ex)
            kept.append(entry)
        for entry in kept:
            heapq.heappush(heap, entry)
        return found


class _Lease:
    """Who computes a node right now, and until when (the table's monotonic clock)."""

    __slots__ = ("expires", "owner", "token")

    def __init__(self, token: str, owner: str, expires: float) -> None:
        self.token = token
        self.owner = owner
        self.expires = expires


class CheckpointTable:
    """The checkpoints of one store, indexed per execution; safe from many threads.

    Example:
        >>> t = CheckpointTable()
        >>> t.save(Record("a", "run", "n", 0, 0, None, b"\\x80", b"\\xc0"))
        1
        >>> t.latest("run").version
        1
    """

    def __init__(self, limits: Limits | dict[str, Any] | None = None) -> None:
        self._limits = Limits.coerce(limits)
        # A save needs `_admit` only under a store-wide or RSS limit; one checkpoint's size
        # is checked inline, retention happens in `_insert`.
        self._largest = self._limits.max_checkpoint_bytes
        self._keep = self._limits.max_per_execution
        self._fast = not self._limits.store_wide and self._limits.max_rss is None
        self._lock = threading.Lock()
        self._records: dict[str, Record] = {}
        self._records_peak = 0
        self._executions: dict[str, _Execution] = {}
        self._live = 0  # executions holding at least one record
        self._by_size = _Largest()
        self._payload_bytes = 0
        self._ops: dict[str, int] = dict.fromkeys(TABLE_OPS, 0)
        self._started = time.monotonic()
        self._memory = OwnMemory(RSS_MAX_AGE)
        self._leases: dict[tuple[str, str], _Lease] = {}
        self._tokens = itertools.count(1)
        # Generations are unique store-wide, so one recorded by a waiter never matches an
        # execution that was emptied, forgotten and made again meanwhile.
        self._generations = itertools.count(1)
        self.evictions = 0  # dropped store-wide to make room (on_full="evict")
        self.rejections = 0  # saves refused by a limit
        self.pruned = 0  # dropped by retention (max_per_execution)
        self._evicted = 0  # oldest-first removals since ``_records`` was last compacted
        self._closing = False  # set by `end_waits`: every wait returns at once

    # -- writes -------------------------------------------------------------------------

    def _insert(self, record: Record) -> int:
        """Store one record under the lock; return its version."""
        cid = record.id
        name = record.execution_id
        old = self._records.get(cid)
        if old is not None:
            # A re-save within its execution is no restart, even of its only record: its
            # new version is above every version the execution has had.
            self._remove(old, resave=old.execution_id == name)
        execution = self._executions.get(name)
        if execution is None:
            execution = self._executions[name] = _Execution(name, next(self._generations))
        execution.high += 1
        version = execution.high
        if not execution.versions:
            self._live += 1
        execution.versions[version] = cid
        state = record.state
        # Reuse the index's copy of the execution id: one string per execution, not per record.
        # tuple.__new__: a fifth of the cost of Record(...), on every save.
        self._records[cid] = tuple.__new__(Record, (
            cid, execution.name, sys.intern(record.node_name), version, record.timestamp_us,
            record.parent_id,
            record.metadata, state,
        ))
        self._payload_bytes += len(state)
        execution.nbytes += len(state)
        self._by_size.grew(execution)
        self._records_peak = max(self._records_peak, len(self._records))
        keep = self._keep
        if keep is not None:
            versions = execution.versions
            for _ in range(rules.retention_excess(len(versions), keep)):
                self._remove(self._records[next(iter(versions.values()))])
                self.pruned += 1
                execution.dropped += 1
            if execution.dropped > 32 + len(versions) // 8:
                # Removals from the front leave holes that ``next(iter())`` walks over.
                execution.versions = dict(versions)
                execution.dropped = 0
        if execution.waiters is not None:
            execution.waiters.notify_all()
        return version

    def _remove(self, record: Record, resave: bool = False) -> None:
        """Drop one stored record under the lock.

        An execution left empty restarts (versions from 1, a new generation) and is
        forgotten unless someone waits on it; not so when ``resave``: the caller stores
        the same id in the same execution right after.
        """
        del self._records[record.id]
        self._payload_bytes -= len(record.state)
        execution = self._executions[record.execution_id]
        execution.nbytes -= len(record.state)
        del execution.versions[record.version]
        if not execution.versions:
            self._live -= 1
        if not execution.versions and not resave:
            execution.high = 0
            execution.generation = next(self._generations)
            if not execution.waiting:
                del self._executions[execution.name]
        # A dict never shrinks as keys leave; its table, high in the heap, would keep the
        # freed records' memory from going back to the system.  Rebuild it once it is a
        # quarter full (amortized O(1) per removal).
        if self._records_peak > SHRINK_MIN and len(self._records) < self._records_peak // 4:
            self._records = dict(self._records)
            self._records_peak = len(self._records)

    # -- limits -------------------------------------------------------------------------

    def _refused(self, error: StoreFull) -> StoreFull:
        self.rejections += 1
        return error

    def _admit(self, records: Sequence[Record]) -> bool:
        """Check ``records`` against the limits (under the lock); True if eviction must follow.

        Raises:
            StoreFull: a limit refuses them; nothing has been touched.
        """
        limits = self._limits
        refusal = None if self._largest is None else rules.oversized(limits, records)
        if refusal is None and limits.max_rss is not None:
            refusal = rules.rss_refusal(limits, self._memory.rss())
        if refusal is not None:
            raise self._refused(refusal)
        if not limits.store_wide:
            return False
        count, nbytes = len(self._records), self._payload_bytes
        projection = rules.project(records, count, nbytes, self._stored, self._members,
                                   self._keep)
        evict, refusal = rules.store_wide(limits, count, nbytes, projection)
        if refusal is not None:
            raise self._refused(refusal)
        return evict

    def _stored(self, checkpoint_id: str) -> tuple[str, int] | None:
        """A stored id's (execution, state size), for `rules.project` (under the lock)."""
        record = self._records.get(checkpoint_id)
        return None if record is None else (record.execution_id, len(record.state))

    def _members(self, execution_id: str) -> Iterable[str]:
        """An execution's stored ids, oldest first, for `rules.project` (under the lock)."""
        execution = self._executions.get(execution_id)
        return () if execution is None else execution.versions.values()

    def _evict(self) -> None:
        """Drop the oldest records store-wide until the store is within its limits."""
        records = self._records
        victims = rules.evictions(self._limits, len(records), self._payload_bytes,
                                  records.values())
        for record in victims:
            self._remove(record)
        self.evictions += len(victims)
        self._evicted += len(victims)
        if self._evicted > 1024 + len(self._records) // 64:
            # Evictions empty the front of the dict; compact it so the next scan is short.
            self._records = dict(self._records)
            self._evicted = 0

    def limits(self) -> LimitsDict:
        """The limits in force, as a plain dict (`Limits.to_dict`)."""
        return self._limits.to_dict()

    def _store(self, records: Sequence[Record]) -> builtins.list[int]:
        """Admit, insert and evict, under the lock: the one write path of every save."""
        evict = self._admit(records)
        versions = [self._insert(record) for record in records]
        if evict:
            self._evict()
        return versions

    # -- writes, continued ----------------------------------------------------------------

    def save(self, record: Record, expected_version: int | None = None) -> int:
        """Store ``record`` and return the version assigned to it.

        Raises:
            VersionConflict: ``expected_version`` is not the execution's latest version
                (0 when it is empty); nothing was written.
        """
        with self._lock:
            self._ops["save"] += 1
            if expected_version is not None:
                execution = self._executions.get(record.execution_id)
                actual = execution.latest_version() if execution is not None else 0
                if actual != expected_version:
                    raise rules.version_conflict(record.execution_id, expected_version, actual)
            if not self._fast:
                return self._store((record,))[0]
            largest = self._largest
            if largest is not None and len(record.state) + len(record.metadata) > largest:
                self._admit((record,))  # raises, with the figures
            return self._insert(record)

    def save_many(self, records: Sequence[Record]) -> list[int]:
        """Store every record at once; return their versions in order."""
        with self._lock:
            self._ops["save_many"] += 1
            return self._store(builtins.list(records))

    def delete(self, checkpoint_id: str) -> bool:
        """Drop one checkpoint; False when there was none with that id."""
        with self._lock:
            self._ops["delete"] += 1
            record = self._records.get(checkpoint_id)
            if record is None:
                return False
            self._remove(record)
            return True

    def clear(self, execution_id: str) -> int:
        """Drop every checkpoint of one execution; return how many there were."""
        with self._lock:
            self._ops["clear"] += 1
            execution = self._executions.get(execution_id)
            if execution is None:
                return 0
            ids = list(execution.versions.values())
            for cid in ids:
                self._remove(self._records[cid])
            return len(ids)

    # -- reads --------------------------------------------------------------------------

    def load(self, checkpoint_id: str) -> Record:
        """The record with this id.

        Raises:
            CheckpointNotFound: there is none.
        """
        with self._lock:
            self._ops["load"] += 1
            record = self._records.get(checkpoint_id)
        if record is None:
            raise not_found(checkpoint_id)
        return record

    def load_many(self, checkpoint_ids: Iterable[str]) -> list[Record]:
        """The records with these ids, in order.

        Raises:
            CheckpointNotFound: naming the first id that has no record.
        """
        with self._lock:
            self._ops["load_many"] += 1
            records = self._records
            out = []
            for cid in checkpoint_ids:
                record = records.get(cid)
                if record is None:
                    raise not_found(cid)
                out.append(record)
            return out

    def list(
        self,
        execution_id: str,
        limit: int | None = None,
        before_version: int | None = None,
        newest_first: bool = False,
        after_version: int | None = None,
    ) -> builtins.list[Record]:
        """Records of one execution in version order, only versions strictly between
        ``after_version`` and ``before_version`` (each None: no bound), at most ``limit``
        (the oldest, or the newest with ``newest_first``); cost grows with that execution
        only, and above an ``after_version`` inside it with what is returned."""
        with self._lock:
            self._ops["list"] += 1
            execution = self._executions.get(execution_id)
            if execution is None or limit == 0:
                return []
            records = self._records
            versions = execution.versions
            if before_version is None and limit is None and after_version is None:
                ids: Iterable[str] = versions.values()
                if newest_first:
                    ids = reversed(versions.values())
                return [records[cid] for cid in ids]
            low = 0 if after_version is None else after_version
            high = None if before_version is None else before_version
            out: builtins.list[Record] = []
            if newest_first:
                for version in reversed(versions):
                    if version <= low:
                        break
                    if high is not None and version >= high:
                        continue
                    out.append(records[versions[version]])
                    if limit is not None and len(out) >= limit:
                        break
            else:
                if versions and low >= next(iter(versions)):
                    # A follower reads above its position, inside the execution: look
                    # the versions up from there (a version is a dict key), not walk up
                    # from the oldest; the cost is what it returns plus the versions in
                    # between that were re-saved or deleted.
                    top = execution.high if high is None else min(execution.high, high - 1)
                    for version in range(low + 1, top + 1):
                        cid = versions.get(version)
                        if cid is not None:
                            out.append(records[cid])
                            if limit is not None and len(out) >= limit:
                                break
                    return out
                for version, cid in versions.items():
                    if high is not None and version >= high:
                        break
                    out.append(records[cid])
                    if limit is not None and len(out) >= limit:
                        break
            return out

    def latest(self, execution_id: str) -> Record | None:
        """The record with the execution's highest version, or None."""
        with self._lock:
            self._ops["latest"] += 1
            return self._latest(execution_id)

    def _latest(self, execution_id: str) -> Record | None:
        execution = self._executions.get(execution_id)
        if execution is None or not execution.versions:
            return None
        return self._records[execution.versions[next(reversed(execution.versions))]]

    def executions(self) -> builtins.list[str]:
        """Ids of the executions that have checkpoints, sorted."""
        with self._lock:
            self._ops["executions"] += 1
            return sorted(name for name, ex in self._executions.items() if ex.versions)

    def wait(
        self, execution_id: str, after_version: int = 0, timeout: float | None = None,
        generation: int = 0,
    ) -> tuple[Record | None, int]:
        """Block until the execution has a version above ``after_version`` in the waiter's
        generation, or any record in a later one (it was emptied, e.g. cleared, and saved
        again since the waiter started).

        Parameters:
            generation: what an earlier slice of the same wait returned (0: the wait
                starts now, in the execution's present generation).

        Returns ``(latest record, the execution's generation now)``: different from the
        waiter's when the execution restarted since; or ``(None, generation)`` if
        ``timeout`` seconds ran out first: pass that generation to the next slice.  The
        thread sleeps on a condition that the matching save notifies: no polling.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            self._ops["wait"] += 1
            execution = self._enter_wait(execution_id)
            start = generation or execution.generation
            try:
                while not execution.versions or (execution.generation == start
                                                 and execution.latest_version() <= after_version):
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if (remaining is not None and remaining <= 0) or self._closing:
                        # An empty execution without a restart is forgotten when its last
                        # waiter leaves; its next generation would look like a restart.
                        seen = execution.generation != start or execution.versions
                        return (None, start if seen else 0)
                    assert execution.waiters is not None
                    execution.waiters.wait(remaining)
                # The generation now, not the waiter's: it tells whether the execution
                # restarted meanwhile (a follower reports that, `BaseStore.follow`).
                return (self._latest(execution_id), execution.generation)
            finally:
                self._leave_wait(execution)

    def end_waits(self) -> None:
        """Make every ``wait`` return now, as if its time ran out, and later ones at once:
        the owner of an in-process table is closing (a blocked follower ends then)."""
        with self._lock:
            self._closing = True
            for execution in self._executions.values():
                if execution.waiters is not None:
                    execution.waiters.notify_all()

    def _enter_wait(self, execution_id: str) -> _Execution:
        """Register a waiter on an execution (under the lock); create its condition."""
        execution = self._executions.get(execution_id)
        if execution is None:
            execution = self._executions[execution_id] = _Execution(
                execution_id, next(self._generations))
        if execution.waiters is None:
            execution.waiters = threading.Condition(self._lock)
        execution.waiting += 1
        return execution

    def _leave_wait(self, execution: _Execution) -> None:
        # The last waiter to leave takes the condition with it; an execution
        # that only existed to be waited on is forgotten again.
        execution.waiting -= 1
        if not execution.waiting:
            execution.waiters = None
            name = execution.name
            if not execution.versions and self._executions.get(name) is execution:
                del self._executions[name]

    # -- claims (load_or_compute) -------------------------------------------------------

    def _latest_of_node(self, execution_id: str, node_name: str) -> Record | None:
        """The node's record with the highest version; scans back from the latest."""
        execution = self._executions.get(execution_id)
        if execution is None:
            return None
        records = self._records
        for version in reversed(execution.versions):
            record = records[execution.versions[version]]
            if record.node_name == node_name:
                return record
        return None

    def _drop_lease(self, key: tuple[str, str], token: str) -> bool:
        """Forget the lease on ``key`` if ``token`` holds it, and wake its waiters."""
        lease = self._leases.get(key)
        if lease is None or lease.token != token:
            return False
        del self._leases[key]
        execution = self._executions.get(key[0])
        if execution is not None and execution.waiters is not None:
            execution.waiters.notify_all()
        return True

    def claim(
        self, execution_id: str, node_name: str, owner: str, lease_s: float,
        timeout: float = 0.0,
    ) -> ClaimAnswer:
        """Find the node's latest record, or take the lease to compute it, or wait.

        Parameters:
            execution_id, node_name: what is to be loaded or computed.
            owner: who asks (shown to others; the same owner asking again is re-entrant).
            lease_s: seconds the lease lasts unless renewed.
            timeout: seconds to wait while someone else holds an unexpired lease.

        Returns ``[kind, value]``: (`DONE`, record) when the node has a record;
        (`GRANTED`, token) when the caller now holds the lease; (`BUSY`, holder) when the
        wait ran out; (`HELD`, owner) at once when ``owner`` itself holds the lease.  A
        waiter wakes when a record arrives, the lease is released, or it expires.
        """
        key = (execution_id, node_name)
        deadline = time.monotonic() + timeout
        with self._lock:
            self._ops["claim"] += 1
            execution: _Execution | None = None
            try:
                while True:
                    record = self._latest_of_node(execution_id, node_name)
                    if record is not None:
                        return (DONE, record)
                    now = time.monotonic()
                    lease = self._leases.get(key)
                    if lease is None or lease.expires <= now:
                        token = f"{os.getpid()}-{next(self._tokens)}"
                        self._leases[key] = _Lease(token, owner, now + lease_s)
                        return (GRANTED, token)
                    if lease.owner == owner:
                        return (HELD, owner)
                    remaining = deadline - now
                    if remaining <= 0:
                        return (BUSY, lease.owner)
                    if execution is None:
                        execution = self._enter_wait(execution_id)
                    assert execution.waiters is not None
                    # Timed to the lease's expiry: a dead owner's lease passes on then.
                    execution.waiters.wait(min(remaining, lease.expires - now))
            finally:
                if execution is not None:
                    self._leave_wait(execution)

    def renew(self, execution_id: str, node_name: str, token: str, lease_s: float) -> bool:
        """Extend the lease to ``lease_s`` seconds from now; False if ``token`` lost it."""
        with self._lock:
            self._ops["renew"] += 1
            lease = self._leases.get((execution_id, node_name))
            if lease is None or lease.token != token:
                return False
            lease.expires = time.monotonic() + lease_s
            return True

    def release(self, execution_id: str, node_name: str, token: str) -> bool:
        """Give the lease up and wake the waiters; False if ``token`` did not hold it."""
        with self._lock:
            self._ops["release"] += 1
            return self._drop_lease((execution_id, node_name), token)

    def complete(self, record: Record, token: str) -> CompleteAnswer:
        """Store the computed ``record`` and release the lease, unless the node has one.

        Returns (`SAVED`, version), or (`DONE`, the existing record) when another
        computation completed first (its lease expired under it, say): a node gets one
        computed record however many computations ran.
        """
        key = (record.execution_id, record.node_name)
        with self._lock:
            self._ops["complete"] += 1
            existing = self._latest_of_node(*key)
            if existing is not None:
                self._drop_lease(key, token)
                return (DONE, existing)
            version = self._store((record,))[0]
            self._drop_lease(key, token)
            return (SAVED, version)

    def figures(self) -> tuple[int, int]:
        """``(checkpoints, payload_bytes)`` right now, without taking the lock (a sample)."""
        return len(self._records), self._payload_bytes

    def largest(self) -> builtins.list[tuple[str, int, int]]:
        """The `LARGEST` executions by payload, largest first: ``(execution, checkpoints,
        bytes)`` (kept incrementally: a sample can ask every time)."""
        with self._lock:
            return self._largest_now()

    def _largest_now(self) -> builtins.list[tuple[str, int, int]]:
        return [(ex.name, len(ex.versions), ex.nbytes)
                for ex in self._by_size.top(self._executions)]

    def stats(self) -> StatsDict:
        """Counts, bytes, process figures and operation counters, as a plain dict."""
        with self._lock:
            self._ops["stats"] += 1
            figures: StatsDict = {
                "checkpoints": len(self._records),
                "executions": self._live,
                "payload_bytes": self._payload_bytes,
                "ops": dict(self._ops),
                "largest_executions": self._largest_now(),
                "evictions": self.evictions,
                "rejections": self.rejections,
                "pruned": self.pruned,
                "limits": self._limits.to_dict(),
                # The process figures are read below, outside the lock.
                "server_pid": 0, "server_rss": 0, "server_peak_rss": 0, "uptime_s": 0.0,
            }
        figures["server_pid"] = self._memory.pid
        figures["server_rss"], figures["server_peak_rss"] = self._memory.now()
        figures["uptime_s"] = time.monotonic() - self._started
        return figures

    # -- LangGraph support ----------------------------------------------------------------
    # Queries over several executions at once, so that a LangGraph saver (shmstore/langgraph.py)
    # spends one round trip per LangGraph call; nothing in them knows about LangGraph.  A
    # scope is a list of execution ids, or with ``prefix`` of id prefixes; what ``where``
    # and *children* mean is said with their rules in core/rules.py.

    def _scope(self, executions: Sequence[str], prefix: bool) -> builtins.list[_Execution]:
        """The non-empty executions in scope, sorted by id (under the lock)."""
        found = self._executions
        if prefix:
            starts = tuple(executions)
            scope = [ex for name, ex in found.items() if name.startswith(starts)]
        else:
            scope = [found[name] for name in dict.fromkeys(executions) if name in found]
        scope = [ex for ex in scope if ex.versions]
        scope.sort(key=lambda ex: ex.name)
        return scope

    def _children(self, execution: _Execution, parents: builtins.list[Record],
                  children: str | None) -> builtins.list[Found]:
        """``[record, its children oldest first]`` for each of ``parents`` (under the lock)."""
        if children is None or not parents:
            return [(record, []) for record in parents]
        records = self._records
        # The whole execution: a child may be saved before its parent (LangGraph saves a
        # checkpoint in the background while the next step's writes arrive).
        kids = [records[cid] for cid in execution.versions.values()
                if records[cid].node_name == children]
        return with_children(parents, kids)

    def find(
        self,
        executions: Sequence[str],
        prefix: bool = False,
        node_name: str | None = None,
        where: EncodedWhere | None = None,
        before_id: str | None = None,
        limit: int | None = None,
        checkpoint_id: str | None = None,
        children: str | None = None,
        by_id: bool = False,
    ) -> builtins.list[Found]:
        """Records in scope that match, each as ``[record, children]``, newest first.

        Executions are taken in id order, the records of each newest version first (with
        ``by_id``: greatest id first); at most ``limit`` in all.  Filters: ``node_name``,
        ``where`` (metadata), ``before_id`` (ids that sort below it), ``checkpoint_id``
        (that record only).
        """
        with self._lock:
            self._ops["find"] += 1
            if limit == 0:
                return []
            filters = decode_where(where)
            records = self._records
            scope = self._scope(executions, prefix)
            if checkpoint_id is not None:
                record = records.get(checkpoint_id)
                scope = [ex for ex in scope
                         if record is not None and ex.name == record.execution_id]
            out: builtins.list[Found] = []
            for execution in scope:
                versions = execution.versions
                if checkpoint_id is not None:
                    candidates: Iterable[Record] = [records[checkpoint_id]]
                elif by_id:
                    candidates = (records[cid] for cid in sorted(versions.values(),
                                                                 reverse=True))
                else:
                    candidates = (records[cid] for cid in reversed(versions.values()))
                matched = rules.first_matches(candidates, node_name, filters, before_id,
                                              None if limit is None else limit - len(out))
                out.extend(self._children(execution, matched, children))
                if limit is not None and len(out) >= limit:
                    break
            return out

    def save_new(self, records: Sequence[Record]) -> builtins.list[int]:
        """Store the records whose ids are not stored yet; versions, 0 for those skipped.

        Within one call the first record with an id wins.  All or nothing under the limits.
        """
        with self._lock:
            self._ops["save_new"] += 1
            stored = self._records
            batch = builtins.list(records)
            fresh: dict[str, int] = {}  # id -> position in batch
            for i, record in enumerate(batch):
                if record.id not in stored and record.id not in fresh:
                    fresh[record.id] = i
            versions = [0] * len(batch)
            if fresh:
                positions = builtins.list(fresh.values())
                saved = self._store([batch[i] for i in positions])
                for i, version in zip(positions, saved, strict=True):
                    versions[i] = version
            return versions

    def purge(
        self,
        executions: Sequence[str],
        prefix: bool = False,
        node_name: str | None = None,
        where: EncodedWhere | None = None,
        keep: int = 0,
        children: str | None = None,
    ) -> int:
        """Drop the matching records in scope, but the newest ``keep`` of each execution,
        with their children; return how many records were dropped."""
        with self._lock:
            self._ops["purge"] += 1
            filters = decode_where(where)
            records = self._records
            doomed: builtins.list[Record] = []
            for execution in self._scope(executions, prefix):
                oldest_first = [records[cid] for cid in execution.versions.values()]
                doomed += purge_plan(oldest_first, node_name, filters, keep, children)
            for record in doomed:
                self._remove(record)
            return len(doomed)

    def copy(self, source: str, target: str, prefix: bool = False) -> int:
        """Copy execution ``source`` to ``target`` (with ``prefix``: every execution whose id
        starts with ``source``, to ``target`` + the rest of its id); return the count copied.

        Copies get new versions in the original order.  An id or parent id that starts with
        ``source`` gets ``target`` in its place; other ids get new ones, and parent links
        between copied records follow them, so the copy is linked as the original.
        """
        if source == target:
            raise rules.copy_onto_itself(source)
        with self._lock:
            self._ops["copy"] += 1
            records = self._records
            plan = [(records[cid], rules.renamed(ex.name, source, target))
                    for ex in self._scope((source,), prefix) for cid in ex.versions.values()]
            copies = rules.copy_records(plan, source, target)
            if copies:
                self._store(copies)
            return len(copies)


# mypy checks here that the table is a complete `TableOps`; the server adds the rest of
# `Backend` (memory history, clients) around it.
_TABLE: Final[type[TableOps]] = CheckpointTable
