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

A record is a tuple (cheapest per-entry memory in CPython)::

    (id, execution_id, node_name, version, timestamp_us, parent_id, metadata, state)

Callers send records with version 0; the table assigns the version.
"""

from __future__ import annotations

import builtins
import itertools
import os
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

import psutil

from .errors import CheckpointNotFound, VersionConflict

__all__ = ["CheckpointTable", "Record", "TABLE_OPS"]

# (id, execution_id, node_name, version, timestamp_us, parent_id, metadata, state)
Record = tuple[Any, ...]

SHRINK_MIN = 1024  # below this many records a dict's slack is not worth a rebuild

# Field positions in a record.
ID, EXECUTION, NODE, VERSION, TIMESTAMP, PARENT, METADATA, STATE = range(8)

# The methods a remote client may call; the server exposes exactly these.
TABLE_OPS = (
    "save",
    "save_many",
    "load",
    "load_many",
    "list",
    "latest",
    "delete",
    "clear",
    "executions",
    "wait",
    "stats",
    "claim",
    "renew",
    "release",
    "complete",
)

# What ``claim`` and ``complete`` answer, first item of their [kind, value] pair.
DONE = "done"          # value: the node's latest record
GRANTED = "granted"    # value: the lease token
BUSY = "busy"          # value: the owner holding the lease (the wait ran out)
HELD = "held"          # value: the owner, who is the caller itself (a re-entrant call)
SAVED = "saved"        # value: the version assigned to the completed record


class _Execution:
    """Index of one execution: version -> id in version order, and its high-water mark."""

    __slots__ = ("high", "name", "versions", "waiters", "waiting")

    def __init__(self, name: str) -> None:
        self.name = name
        # Versions only ever grow and are inserted in order, so a dict's insertion order
        # is version order: append, delete and "latest" are all O(1).
        self.versions: dict[int, str] = {}
        self.high = 0
        self.waiters: threading.Condition | None = None
        self.waiting = 0

    def latest_version(self) -> int:
        return next(reversed(self.versions)) if self.versions else 0


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
        >>> t.save(("a", "run", "n", 0, 0, None, b"\\x80", b"\\xc0"))
        1
        >>> t.latest("run")[3]
        1
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, Record] = {}
        self._records_peak = 0
        self._executions: dict[str, _Execution] = {}
        self._payload_bytes = 0
        self._ops: dict[str, int] = dict.fromkeys(TABLE_OPS, 0)
        self._started = time.monotonic()
        self._process = psutil.Process(os.getpid())
        self._leases: dict[tuple[str, str], _Lease] = {}
        self._tokens = itertools.count(1)

    # -- writes -------------------------------------------------------------------------

    def _insert(self, record: Sequence[Any]) -> int:
        """Store one record under the lock; return its version."""
        cid = record[ID]
        old = self._records.get(cid)
        if old is not None:
            self._remove(old)
        name = record[EXECUTION]
        execution = self._executions.get(name)
        if execution is None:
            execution = self._executions[name] = _Execution(name)
        execution.high += 1
        version = execution.high
        execution.versions[version] = cid
        state = record[STATE]
        # Reuse the index's copy of the execution id: one string per execution, not per record.
        self._records[cid] = (
            cid, execution.name, sys.intern(record[NODE]), version, record[TIMESTAMP],
            record[PARENT],
            record[METADATA], state,
        )
        self._payload_bytes += len(state)
        self._records_peak = max(self._records_peak, len(self._records))
        if execution.waiters is not None:
            execution.waiters.notify_all()
        return version

    def _remove(self, record: Record) -> None:
        """Drop one stored record under the lock; forget an execution left empty."""
        del self._records[record[ID]]
        self._payload_bytes -= len(record[STATE])
        execution = self._executions[record[EXECUTION]]
        del execution.versions[record[VERSION]]
        if not execution.versions and not execution.waiting:
            del self._executions[execution.name]
        # A dict never shrinks as keys leave; its table, high in the heap, would keep the
        # freed records' memory from going back to the system.  Rebuild it once it is a
        # quarter full (amortized O(1) per removal).
        if self._records_peak > SHRINK_MIN and len(self._records) < self._records_peak // 4:
            self._records = dict(self._records)
            self._records_peak = len(self._records)

    def save(self, record: Sequence[Any], expected_version: int | None = None) -> int:
        """Store ``record`` and return the version assigned to it.

        Raises:
            VersionConflict: ``expected_version`` is not the execution's latest version
                (0 when it is empty); nothing was written.
        """
        with self._lock:
            self._ops["save"] += 1
            if expected_version is not None:
                execution = self._executions.get(record[EXECUTION])
                actual = execution.latest_version() if execution is not None else 0
                if actual != expected_version:
                    raise VersionConflict(
                        f"execution {record[EXECUTION]!r} is at version {actual}, "
                        f"not {expected_version}; load the latest and try again",
                        execution_id=record[EXECUTION], expected=expected_version, actual=actual,
                    )
            return self._insert(record)

    def save_many(self, records: Iterable[Sequence[Any]]) -> list[int]:
        """Store every record at once; return their versions in order."""
        with self._lock:
            self._ops["save_many"] += 1
            return [self._insert(record) for record in records]

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
            raise _not_found(checkpoint_id)
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
                    raise _not_found(cid)
                out.append(record)
            return out

    def list(
        self,
        execution_id: str,
        limit: int | None = None,
        before_version: int | None = None,
        newest_first: bool = False,
    ) -> builtins.list[Record]:
        """Records of one execution in version order; cost grows with that execution only."""
        with self._lock:
            self._ops["list"] += 1
            execution = self._executions.get(execution_id)
            if execution is None or limit == 0:
                return []
            records = self._records
            versions = execution.versions
            if before_version is None and limit is None:
                ids: Iterable[str] = versions.values()
                if newest_first:
                    ids = reversed(versions.values())
                return [records[cid] for cid in ids]
            out: builtins.list[Record] = []
            if newest_first:
                for version in reversed(versions):
                    if before_version is not None and version >= before_version:
                        continue
                    out.append(records[versions[version]])
                    if limit is not None and len(out) >= limit:
                        break
            else:
                for version, cid in versions.items():
                    if before_version is not None and version >= before_version:
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
        self, execution_id: str, after_version: int = 0, timeout: float | None = None
    ) -> Record | None:
        """Block until the execution has a version above ``after_version``.

        Returns the latest record then, or None if ``timeout`` seconds ran out first.
        The thread sleeps on a condition that the matching save notifies: no polling.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            self._ops["wait"] += 1
            execution = self._enter_wait(execution_id)
            try:
                while execution.latest_version() <= after_version:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return None
                    assert execution.waiters is not None
                    execution.waiters.wait(remaining)
                return self._latest(execution_id)
            finally:
                self._leave_wait(execution)

    def _enter_wait(self, execution_id: str) -> _Execution:
        """Register a waiter on an execution (under the lock); create its condition."""
        execution = self._executions.get(execution_id)
        if execution is None:
            execution = self._executions[execution_id] = _Execution(execution_id)
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
            if record[NODE] == node_name:
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
    ) -> tuple[str, Any]:
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

    def complete(self, record: Sequence[Any], token: str) -> tuple[str, Any]:
        """Store the computed ``record`` and release the lease, unless the node has one.

        Returns (`SAVED`, version), or (`DONE`, the existing record) when another
        computation completed first (its lease expired under it, say): a node gets one
        computed record however many computations ran.
        """
        key = (record[EXECUTION], record[NODE])
        with self._lock:
            self._ops["complete"] += 1
            existing = self._latest_of_node(*key)
            if existing is not None:
                self._drop_lease(key, token)
                return (DONE, existing)
            version = self._insert(record)
            self._drop_lease(key, token)
            return (SAVED, version)

    def figures(self) -> tuple[int, int]:
        """``(checkpoints, payload_bytes)`` right now, without taking the lock (a sample)."""
        return len(self._records), self._payload_bytes

    def stats(self) -> dict[str, Any]:
        """Counts, bytes, process figures and operation counters, as a plain dict."""
        with self._lock:
            self._ops["stats"] += 1
            figures: dict[str, Any] = {
                "checkpoints": len(self._records),
                "executions": sum(1 for ex in self._executions.values() if ex.versions),
                "payload_bytes": self._payload_bytes,
                "ops": dict(self._ops),
            }
        figures["server_pid"] = self._process.pid
        figures["server_rss"] = self._process.memory_info().rss
        figures["uptime_s"] = time.monotonic() - self._started
        return figures


def _not_found(checkpoint_id: str) -> CheckpointNotFound:
    return CheckpointNotFound(
        f"no checkpoint with id {checkpoint_id!r}", checkpoint_id=checkpoint_id
    )
