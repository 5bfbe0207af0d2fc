"""`BaseStore`: the client half of the contract that every backend shares.

A store is this class plus a `Backend` (``self._backend``) whose typed methods run the
table operations somewhere: in this process (`MemoryStore`), in the server process
(`SharedStore`), or in Redis (`RedisStore`).  Everything else — argument checks,
encoding a `Checkpoint` into a `Record` and decoding it back — happens here, once,
before anything is sent, so that every backend behaves the same and bad input never
reaches a server.
"""

from __future__ import annotations

import abc
import builtins
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from . import rules, segment
from .backend import (
    BUSY,
    DONE,
    GRANTED,
    HELD,
    Backend,
    ClaimAnswer,
    CompleteAnswer,
    EncodedWhere,
    Found,
    Sample,
)
from .checkpoint import Checkpoint, timestamp_to_us, us_to_timestamp, validate_id
from .codec import DEFAULT_CODEC, EMPTY_MAP, MsgpackCodec, Split
from .errors import ConfigError, ShmstoreError, StoreTimeout
from .limits import Limits
from .record import Record
from .segment import Segment
from .stats import StoreStats
from .stream import Cleared, FollowCursor, ListAbove
from .validate import count, duration, optional_duration

__all__ = ["DEFAULT_LEASE_S", "BaseStore", "Deadline", "OneOf", "StoreLogic", "check_record",
           "renewed"]

log = logging.getLogger("shmstore")

#: How long a `BaseStore.load_or_compute` lease lasts unless renewed; a computing
#: process renews it every third of that, so only a dead (or frozen) one loses it.
DEFAULT_LEASE_S = 10.0

def _checkpoint(record: Record, codec: MsgpackCodec, copy: bool) -> Checkpoint:
    """Decode a stored record into a new Checkpoint (fields are trusted: skip checks).

    Only a bound the codec was given on purpose applies: the store checked the size
    when it took the record (under its limit then, which may have been higher).  A state
    from the data plane is a read-only mapping (or a segment of this process's, mapped
    here); without ``copy`` its large numpy arrays are views of it.
    """
    cp = object.__new__(Checkpoint)
    # One unpack, not eight field reads: this runs for every checkpoint a store returns.
    cid, execution_id, node_name, version, timestamp_us, parent_id, meta, state = record
    if isinstance(state, Segment):
        state = segment.mapped(state)
    bound = codec.own_max_bytes
    cp.__dict__.update(
        id=cid,
        execution_id=execution_id,
        node_name=node_name,
        version=version,
        timestamp=us_to_timestamp(timestamp_us),
        parent_id=parent_id,
        metadata={} if meta == EMPTY_MAP else codec.decode(meta, max_bytes=bound),
        state=codec.decode(state, max_bytes=bound, copy=copy),
    )
    return cp


def _release(records: Iterable[Record]) -> None:
    """Close the segments of records that were sent: the receiver holds its own
    descriptors now (or, if the send failed, nobody needs them)."""
    for record in records:
        state = record[7]
        if type(state) is Segment:
            state.close()


def _with_version(cp: Checkpoint, version: int) -> Checkpoint:
    out = object.__new__(Checkpoint)
    out.__dict__.update(cp.__dict__)
    out.__dict__["version"] = version
    return out


def check_record(record: object, what: str = "record") -> Record:
    """``record`` as a `Record` if it has a stored record's shape, else `ConfigError`.

    For records that come from outside a store (a dump file, another store's
    `BaseStore.list_records`): 8 fields; ids as `validate_id` takes them; ``node_name``
    a str; ``version`` an int >= 0 (a store assigns its own); ``timestamp_us`` an int
    that is a datetime; metadata and state bytes (or a read-only mapping of them).  The
    bytes are not decoded.

    Parameters:
        record: a `Record`, or any 8-item tuple or list.
        what: how a message names it, e.g. ``record 3 of dump.msgpack``.

    Raises:
        ConfigError: naming the first field that is wrong.

    Example:
        >>> check_record(["id-1", "run", "n", 1, 0, None, b"\\x80", b"\\xc0"]).node_name
        'n'
    """
    fields = Record._fields
    if not isinstance(record, (tuple, list)) or len(record) != len(fields):
        got = type(record).__name__ + (f" of {len(record)}"
                                       if isinstance(record, (tuple, list)) else "")
        raise ConfigError(f"{what} must be an array of the {len(fields)} fields "
                          f"{', '.join(fields)}, not a {got}", value=repr(record)[:80])
    cid, execution_id, node_name, version, timestamp_us, parent_id, meta, state = record
    validate_id(cid, f"{what}: id")
    validate_id(execution_id, f"{what}: execution_id")
    if parent_id is not None:
        validate_id(parent_id, f"{what}: parent_id")
    if type(node_name) is not str:
        raise ConfigError(f"{what}: node_name must be a str, not {type(node_name).__name__}",
                          value=repr(node_name)[:80])
    if type(version) is not int or version < 0:
        raise ConfigError(f"{what}: version must be an int >= 0, not {version!r:.80}",
                          value=repr(version)[:80])
    try:
        if type(timestamp_us) is not int:
            raise TypeError(type(timestamp_us).__name__)
        us_to_timestamp(timestamp_us)
    except (TypeError, OverflowError):
        raise ConfigError(f"{what}: timestamp_us must be an int of microseconds since the "
                          f"epoch within the years 1-9999, not {timestamp_us!r:.80}",
                          value=repr(timestamp_us)[:80]) from None
    for name, value in (("metadata", meta), ("state", state)):
        if not isinstance(value, (bytes, memoryview)):
            raise ConfigError(f"{what}: {name} must be bytes, not {type(value).__name__}",
                              value=repr(value)[:80])
    return record if type(record) is Record else Record._make(record)


class OneOf:
    """A `BaseStore.find`/`purge` filter value that accepts any of several values.

    Example:
        >>> store.purge("run", where={"run_id": OneOf("r1", "r2")})
    """

    __slots__ = ("values",)

    def __init__(self, *values: Any) -> None:
        self.values = values

    def __repr__(self) -> str:
        return f"OneOf{self.values!r}"

def _check_limit(limit: object, name: str) -> int | None:
    return count(limit, name, optional=True)


def _check_optional_str(**values: object) -> None:
    for name, value in values.items():
        if value is not None and type(value) is not str:
            raise ConfigError(f"{name} must be a str or None, not {type(value).__name__}",
                              value=repr(value)[:80])


def _check_lease(lease: object) -> float:
    return duration(lease, "lease")


def _owner() -> str:
    """Who computes: host, process and thread (a re-entrant call is recognised by it)."""
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


def renewed(key: tuple[str, str], held: bool | ShmstoreError) -> bool:
    """What a lease renewal's answer (``held``, or the error it raised) means for the
    heartbeat: True to go on renewing; False (said in the log) to stop."""
    if isinstance(held, ShmstoreError):
        log.warning("cannot renew the lease on %s: %s", key, held)
        return False
    if not held:
        log.warning("lost the lease on %s; another process may compute it too", key)
        return False
    return True


class _Heartbeat:
    """Renews a lease every third of its length while the computation runs."""

    def __init__(self, store: BaseStore, key: tuple[str, str], token: str, lease: float) -> None:
        self._store, self._key, self._token, self._lease = store, key, token, lease
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shmstore-lease", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._lease / 3):
            try:
                held: bool | ShmstoreError = self._store._backend.renew(
                    *self._key, self._token, self._lease)
            except ShmstoreError as exc:
                held = exc
            if not renewed(self._key, held):
                return

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _check_timeout(timeout: object) -> float | None:
    return optional_duration(timeout, "timeout")


class Deadline:
    """A blocking call's clock: the slices it waits in the store, and when it is over.

    Parameters:
        total: the call's timeout in seconds (None: none).
        slice_s: the longest single wait in the store (`BaseStore.wait_slice`).
    """

    __slots__ = ("_at", "_slice", "total")

    def __init__(self, total: float | None, slice_s: float) -> None:
        self.total = total
        self._slice = slice_s
        self._at = None if total is None else time.monotonic() + total

    def chunk(self) -> float:
        """How long the next wait in the store may be."""
        remaining = self._slice if self._at is None else self._at - time.monotonic()
        return max(0.0, min(remaining, self._slice))

    def passed(self) -> bool:
        """Whether the call's time is up."""
        return self._at is not None and time.monotonic() >= self._at


# What `StoreLogic._encoded` hands `_sealed`: the checkpoint, its metadata's and state's
# encodings, and their size.
Encoded = tuple[Checkpoint, bytes, "bytes | Split", int]


class StoreLogic:
    """The pure half of a store, shared by `BaseStore` and ``aio.AsyncStore``: argument
    checks, Checkpoint ↔ `Record`, and what each answer means.  No I/O: each store class
    sends the requests these build (sync or async) and hands the answers back here.
    """

    #: Longest single server-side wait; a longer ``wait`` is several of these, so that a
    #: frozen server is noticed and the call stays interruptible.
    wait_slice: float = 10.0

    #: Whether loads give numpy arrays of data-plane states as private, writable copies
    #: (True) or as read-only views of the shared mapping (False: zero-copy).
    copy_on_load: bool = False
    #: Data plane: states encoded to at least this many bytes are sent as sealed memory
    #: segments (None: never; set by a store whose server takes them).
    _plane_threshold: int | None = None

    def __init__(self, *, codec: MsgpackCodec | None = None) -> None:
        self.codec = codec if codec is not None else DEFAULT_CODEC
        self._max_checkpoint_bytes: int | bool | None = False  # False: not fetched yet

    # -- encoding -----------------------------------------------------------------------

    def _encoded(self, cp: Checkpoint) -> Encoded:
        """Check and encode one checkpoint (`_sealed` makes the record once the store's
        size limit is known)."""
        if not isinstance(cp, Checkpoint):
            raise ConfigError(
                f"expected a Checkpoint, not {type(cp).__name__}", value=repr(cp)[:80]
            )
        codec = self.codec
        # The store's limit is checked below (StoreFull); the codec only applies a bound
        # it was given on purpose, so that its standalone default never overrides Limits.
        bound = codec.own_max_bytes
        meta = EMPTY_MAP if not cp.metadata else codec.encode(cp.metadata, root="metadata",
                                                                max_bytes=bound)
        threshold = self._plane_threshold
        encoded: bytes | Split = codec.encode(cp.state, max_bytes=bound) \
            if threshold is None else codec.encode_split(cp.state, above=threshold,
                                                         max_bytes=bound)
        return cp, meta, encoded, len(encoded) + len(meta)

    def _must_ask_limit(self, encoded: Encoded) -> bool:
        """Whether the store's ``max_checkpoint_bytes`` must be asked before `_sealed`:
        once, and again before refusing (Redis limits belong to the data set, and another
        client may have raised them since we asked)."""
        return self._asks_limit(encoded[3])

    def _asks_limit(self, size: int) -> bool:
        largest = self._max_checkpoint_bytes
        return largest is False or (largest is not None and size > largest)

    def _to_save(self, record: Record, threshold: int | None) -> Record:
        """A checked record (`check_record`) as `save_records` sends it: within
        ``max_checkpoint_bytes`` (asked first where `_asks_limit` says so), version 0,
        a large state in a memory segment."""
        cid, execution_id, node, _version, ts, parent, meta, state = record
        self._check_size(len(state) + len(meta), cid)
        if threshold is not None and not isinstance(state, Segment):
            state = segment.share(bytes(state), threshold)
        return Record(cid, execution_id, node, 0, ts, parent, bytes(meta), state)

    @staticmethod
    def _as_stored(records: Iterable[Record]) -> builtins.list[Record]:
        """Records as `list_records` gives them: a mapped segment's state as a read-only
        memoryview of it."""
        return [r._replace(state=segment.mapped(r.state)) if isinstance(r.state, Segment)
                else r for r in records]

    def _check_size(self, size: int, checkpoint_id: str) -> None:
        """Refuse a checkpoint of ``size`` bytes above the ``max_checkpoint_bytes`` known
        (ask first where `_asks_limit` says so).

        Raises:
            StoreFull: it is larger (nothing was sent).
        """
        largest = self._max_checkpoint_bytes
        if largest is not None and largest is not False and size > largest:
            raise rules.store_full("max_checkpoint_bytes", int(largest), size, size,
                                   checkpoint_id=checkpoint_id, unsent=True)

    def _sealed(self, encoded: Encoded) -> Record:
        """The record of an encoded checkpoint, within the store's size limit.

        Raises:
            StoreFull: it is larger than ``max_checkpoint_bytes`` (nothing was sent).
        """
        cp, meta, data, size = encoded
        self._check_size(size, cp.id)
        threshold = self._plane_threshold
        state = data if threshold is None else segment.share(data, threshold)
        # tuple.__new__: a fifth of the cost of Record(...), on every save.
        return tuple.__new__(Record, (
            cp.id, cp.execution_id, cp.node_name, 0, timestamp_to_us(cp.timestamp),
            cp.parent_id, meta, state,
        ))

    def _decode(self, record: Record | None) -> Checkpoint | None:
        return None if record is None else _checkpoint(record, self.codec, self.copy_on_load)

    def _decoded(self, record: Record, copy: bool | None = None) -> Checkpoint:
        return _checkpoint(record, self.codec, self.copy_on_load if copy is None else copy)

    def _decode_all(self, records: Iterable[Record],
                    copy: bool | None = None) -> builtins.list[Checkpoint]:
        codec, copies = self.codec, self.copy_on_load if copy is None else copy
        return [_checkpoint(r, codec, copies) for r in records]

    def _found(self, found: Iterable[Found],
               ) -> builtins.list[tuple[Checkpoint, builtins.list[Checkpoint]]]:
        codec, copies = self.codec, self.copy_on_load
        return [(_checkpoint(record, codec, copies),
                 [_checkpoint(kid, codec, copies) for kid in kids])
                for record, kids in found]

    # -- arguments: each returns the backend op's arguments, checked --------------------

    @staticmethod
    def _load_many_args(checkpoint_ids: Iterable[str]) -> builtins.list[str]:
        return [validate_id(cid) for cid in checkpoint_ids]

    @staticmethod
    def _list_args(execution_id: str, limit: int | None, before_version: int | None,
                   newest_first: bool, after_version: int | None = None
                   ) -> tuple[str, int | None, int | None, bool, int | None]:
        validate_id(execution_id, "execution_id")
        return (execution_id, _check_limit(limit, "limit"),
                _check_limit(before_version, "before_version"), bool(newest_first),
                _check_limit(after_version, "after_version"))

    @staticmethod
    def _wait_args(execution_id: str, after_version: int, timeout: float | None,
                   slice_s: float) -> tuple[str, int, Deadline]:
        validate_id(execution_id, "execution_id")
        after = _check_limit(after_version, "after_version") or 0
        return execution_id, after, Deadline(_check_timeout(timeout), slice_s)

    @staticmethod
    def _wait_timed_out(execution_id: str, after: int, deadline: Deadline) -> StoreTimeout:
        return StoreTimeout(
            f"no checkpoint above version {after} of execution {execution_id!r} "
            f"within {deadline.total} s",
            timeout=deadline.total,
        )

    @staticmethod
    def _claim_args(execution_id: str, node_name: str, compute: object, timeout: float | None,
                    lease: float, slice_s: float) -> tuple[float, Deadline]:
        """Check `load_or_compute`'s arguments; its lease and clock."""
        validate_id(execution_id, "execution_id")
        if type(node_name) is not str:
            raise ConfigError(f"node_name must be a str, not {type(node_name).__name__}",
                              value=repr(node_name)[:80])
        if not callable(compute):
            raise ConfigError(f"compute must be callable, not {type(compute).__name__}",
                              value=repr(compute)[:80])
        total = _check_timeout(timeout)
        return _check_lease(lease), Deadline(total, slice_s)

    def _claimed(self, answer: ClaimAnswer, execution_id: str, node_name: str,
                 deadline: Deadline) -> Checkpoint | str | None:
        """What a ``claim`` answer means: the node's checkpoint (done), the lease token
        (ours to compute: a str), or None (busy: ask again).

        Raises:
            ConfigError: the caller holds the lease itself (a call from inside compute).
            StoreTimeout: busy, and the call's time is up.
        """
        if answer[0] == DONE:
            return _checkpoint(answer[1], self.codec, self.copy_on_load)
        kind, value = answer
        if kind == GRANTED:
            return value
        if kind == HELD:
            raise ConfigError(
                f"load_or_compute({execution_id!r}, {node_name!r}) was called again "
                "from inside its own compute(); it would wait for itself",
                value=node_name,
            )
        if kind != BUSY:
            raise ShmstoreError(f"unexpected answer to claim: {kind!r}")
        if deadline.passed():
            raise StoreTimeout(
                f"{value} was still computing node {node_name!r} of execution "
                f"{execution_id!r} after {deadline.total} s",
                timeout=deadline.total,
            )
        return None

    def _completed(self, answer: CompleteAnswer, record: Record) -> Checkpoint:
        """The checkpoint every caller of `load_or_compute` gets, from ``complete``'s
        answer to our ``record``."""
        if answer[0] == DONE:
            _release((record,))
            return _checkpoint(answer[1], self.codec, self.copy_on_load)
        # Decode our own bytes: every caller gets an equal snapshot, none the live object.
        return _checkpoint(record._replace(version=answer[1]), self.codec, self.copy_on_load)

    def _scope(self, execution_id: str | Iterable[str], prefix: object) -> builtins.list[str]:
        names = [execution_id] if isinstance(execution_id, str) else list(execution_id)
        what = "execution id prefix" if prefix else "execution_id"
        return [validate_id(name, what) for name in names]

    def _where(self, where: Mapping[str, Any] | None) -> EncodedWhere | None:
        if where is None:
            return None
        if not isinstance(where, Mapping):
            raise ConfigError(f"where must be a mapping, not {type(where).__name__}",
                              value=repr(where)[:80])
        encode = self.codec.encode
        bound = self.codec.own_max_bytes
        out: dict[str, builtins.list[bytes]] = {}
        for key, value in where.items():
            if type(key) is not str:
                raise ConfigError(f"where keys must be str, not {type(key).__name__}",
                                  value=repr(key)[:80])
            values = value.values if isinstance(value, OneOf) else (value,)
            out[key] = [encode(v, root=f"where[{key!r}]", max_bytes=bound) for v in values]
        return out

    def _find_args(self, execution_id: str | Iterable[str], prefix: bool,
                   node_name: str | None, where: Mapping[str, Any] | None,
                   before_id: str | None, limit: int | None, checkpoint_id: str | None,
                   children: str | None, by_id: bool) -> tuple[Any, ...] | None:
        """``find``'s arguments, checked; None when its scope is empty (nothing to ask)."""
        names = self._scope(execution_id, prefix)
        if not names:
            return None
        limit = _check_limit(limit, "limit")
        _check_optional_str(node_name=node_name, before_id=before_id,
                            checkpoint_id=checkpoint_id, children=children)
        return (names, bool(prefix), node_name, self._where(where), before_id, limit,
                checkpoint_id, children, bool(by_id))

    def _purge_args(self, execution_id: str | Iterable[str], prefix: bool,
                    node_name: str | None, where: Mapping[str, Any] | None, keep: int,
                    children: str | None) -> tuple[Any, ...] | None:
        """``purge``'s arguments, checked; None when its scope is empty."""
        names = self._scope(execution_id, prefix)
        keep = _check_limit(keep, "keep") or 0
        if not names:
            return None
        _check_optional_str(node_name=node_name, children=children)
        return (names, bool(prefix), node_name, self._where(where), keep, children)

    def _copy_args(self, source: str, target: str, prefix: bool) -> tuple[str, str, bool]:
        self._scope((source, target), prefix)  # both valid ids
        return source, target, bool(prefix)

    @staticmethod
    def _since(since: float | None) -> float | None:
        if since is not None and (not isinstance(since, (int, float)) or isinstance(since, bool)
                                  or math.isnan(since)):
            raise ConfigError(f"since must be epoch seconds or None, not {since!r}",
                              value=repr(since)[:80])
        return None if since is None else float(since)


class BaseStore(StoreLogic, abc.ABC):
    """The checkpoint-store contract; subclasses supply ``_backend``, a `Backend`.

    Parameters:
        codec: encodes states and metadata (default: msgpack with extension types); the
            store's ``max_checkpoint_bytes`` bounds a save, and a ``max_bytes`` the codec
            was made with applies on top (the stricter wins).
    """

    #: Where the table operations run; set by the subclass's constructor.
    _backend: Backend

    # -- encoding -----------------------------------------------------------------------

    def _record(self, cp: Checkpoint) -> Record:
        encoded = self._encoded(cp)
        if self._must_ask_limit(encoded):
            self._max_checkpoint_bytes = self.limits().max_checkpoint_bytes
        return self._sealed(encoded)

    def limits(self) -> Limits:
        """The `Limits` the store enforces."""
        return Limits.from_dict(self._backend.limits())

    # -- the contract -------------------------------------------------------------------

    def save(self, checkpoint: Checkpoint, *, expected_version: int | None = None) -> Checkpoint:
        """Store an immutable snapshot of ``checkpoint``; return it with its version.

        The version is the execution's latest + 1 (the first is 1), assigned by the store,
        strictly increasing however many processes write.  Saving an id that exists
        replaces that record, which gets a new version.

        Parameters:
            checkpoint: what to store; its ``version`` is ignored.
            expected_version: store only if the execution's latest version equals this
                (0 = the execution has no checkpoints): an atomic compare-and-set.

        Raises:
            EncodeError: the state or metadata cannot be encoded (nothing is sent).
            VersionConflict: ``expected_version`` did not match; nothing was written.

        Example:
            >>> store.save(Checkpoint(execution_id="run", state={"n": 1})).version
            1
        """
        _check_limit(expected_version, "expected_version")
        record = self._record(checkpoint)
        try:
            version = self._backend.save(record, expected_version)
        finally:
            if type(record[7]) is Segment:
                record[7].close()
        return _with_version(checkpoint, version)

    def save_many(self, checkpoints: Iterable[Checkpoint]) -> list[Checkpoint]:
        """Store several checkpoints in one round trip; all or nothing.

        Raises:
            EncodeError: one of them cannot be encoded; nothing is written.
        """
        cps, versions = self._save_all(self._backend.save_many, checkpoints)
        return [_with_version(cp, v) for cp, v in zip(cps, versions, strict=True)]

    def _save_all(self, op: Callable[[builtins.list[Record]], builtins.list[int]],
                  checkpoints: Iterable[Checkpoint],
                  ) -> tuple[builtins.list[Checkpoint], builtins.list[int]]:
        """Encode every checkpoint first (nothing is sent if one fails), then run ``op``."""
        cps = list(checkpoints)
        records: builtins.list[Record] = []
        try:
            for cp in cps:
                records.append(self._record(cp))
            return cps, (op(records) if records else [])
        finally:
            _release(records)

    def save_records(self, records: Iterable[Record]) -> builtins.list[int]:
        """Store records as another store kept them, in one round trip; all or nothing.

        What `save_many` does, for records already encoded (from `list_records`, or a
        ``shmstore dump`` file): ids, nodes, parents, timestamps, metadata and state bytes
        are kept as given, never decoded or re-encoded.  Each record is checked first
        (`check_record`, and ``max_checkpoint_bytes``: nothing is sent if one fails).
        Versions are the store's: each record gets its execution's next one, so records
        saved in version order into an empty execution whose versions are 1..n without a
        gap get the same versions again.

        Returns:
            The version each record got, in order.

        Raises:
            ConfigError: a record is malformed (naming its field).
            StoreFull: one is larger than ``max_checkpoint_bytes``, or they do not fit
                under the store's limits; nothing was written.

        Example:
            >>> target.save_records(source.list_records("run"))
            [1, 2, 3]
        """
        threshold = self._plane_threshold
        sent: builtins.list[Record] = []
        try:
            for record in records:
                checked = check_record(record)
                if self._asks_limit(len(checked.state) + len(checked.metadata)):
                    self._max_checkpoint_bytes = self.limits().max_checkpoint_bytes
                sent.append(self._to_save(checked, threshold))
            return self._backend.save_many(sent) if sent else []
        finally:
            _release(sent)

    def list_records(
        self,
        execution_id: str,
        *,
        limit: int | None = None,
        before_version: int | None = None,
        newest_first: bool = False,
    ) -> builtins.list[Record]:
        """The records of one execution as the store keeps them: `list` without decoding.

        Parameters are those of `list`.  Each `Record` holds its metadata and state as
        the encoded bytes (a state that came through the shared-memory data plane as a
        read-only ``memoryview`` of the mapping): for copying, dumping or measuring
        checkpoints without decoding them (`save_records` takes them back).

        Example:
            >>> sum(len(r.state) for r in store.list_records("run"))  # bytes of state
            1234
        """
        args = self._list_args(execution_id, limit, before_version, newest_first)
        return self._as_stored(self._backend.list(*args))

    def load(self, checkpoint_id: str, *, copy: bool | None = None) -> Checkpoint:
        """The checkpoint with this id, as a fresh snapshot.

        Parameters:
            copy: for a state that came through the shared-memory data plane, whether its
                large numpy arrays are private writable copies (True) or read-only views
                of the shared pages (False: no copy, N readers share one copy); default
                the store's ``copy_on_load``.  Every other value is a fresh object.

        Raises:
            CheckpointNotFound: there is none (a KeyError naming the id).
        """
        return self._decoded(self._backend.load(validate_id(checkpoint_id)), copy)

    def load_many(self, checkpoint_ids: Iterable[str], *,
                  copy: bool | None = None) -> list[Checkpoint]:
        """The checkpoints with these ids, in order, in one round trip (``copy`` as
        for `load`).

        Raises:
            CheckpointNotFound: naming the first id that has none.
        """
        ids = self._load_many_args(checkpoint_ids)
        return self._decode_all(self._backend.load_many(ids), copy) if ids else []

    def list(
        self,
        execution_id: str,
        *,
        limit: int | None = None,
        before_version: int | None = None,
        after_version: int | None = None,
        newest_first: bool = False,
    ) -> builtins.list[Checkpoint]:
        """The checkpoints of one execution, ordered by version.

        Parameters:
            limit: at most this many (the oldest, or the newest with ``newest_first``).
            before_version: only versions strictly below this one.
            after_version: only versions strictly above this one; with ``limit`` (and
                oldest first), the oldest ``limit`` above it: the next page of a reader
                that keeps its position (`follow` reads so).
            newest_first: highest version first.

        Raises:
            ConfigError: a bad id, or a ``limit`` or version that is not an int >= 0.

        Example:
            >>> [c.version for c in store.list("run", after_version=2, limit=2)]
            [3, 4]
        """
        args = self._list_args(execution_id, limit, before_version, newest_first,
                               after_version)
        return self._decode_all(self._backend.list(*args))

    def latest(self, execution_id: str) -> Checkpoint | None:
        """The execution's checkpoint with the highest version, or None."""
        return self._decode(self._backend.latest(validate_id(execution_id, "execution_id")))

    def delete(self, checkpoint_id: str) -> bool:
        """Drop one checkpoint; False when there was none (not an error)."""
        return bool(self._backend.delete(validate_id(checkpoint_id)))

    def clear(self, execution_id: str) -> int:
        """Drop every checkpoint of one execution; return how many were dropped."""
        return int(self._backend.clear(validate_id(execution_id, "execution_id")))

    def executions(self) -> builtins.list[str]:
        """Ids of the executions that have checkpoints, sorted."""
        return list(self._backend.executions())

    def wait(
        self, execution_id: str, *, after_version: int = 0, timeout: float | None = None
    ) -> Checkpoint:
        """Block until the execution has a version above ``after_version``; return the latest.

        If the execution is emptied (cleared, or its last checkpoint deleted) while the
        call waits, it restarts at version 1, and the call returns at its next save
        whatever the version.  The store wakes the waiter; nothing polls.

        Raises:
            StoreTimeout: ``timeout`` seconds passed first.
        """
        execution_id, after, deadline = self._wait_args(execution_id, after_version, timeout,
                                                        self.wait_slice)
        generation = 0  # the execution's generation, carried from slice to slice
        while True:
            record, generation = self._backend.wait(execution_id, after, deadline.chunk(),
                                                    generation)
            if record is not None:
                return self._decoded(record)
            if deadline.passed():
                raise self._wait_timed_out(execution_id, after, deadline)

    def follow(
        self, execution_id: str, *, after_version: int = 0, timeout: float | None = None
    ) -> Iterator[Checkpoint | Cleared]:
        """Every checkpoint of the execution, in version order, as it is saved.

        The iterator returns what is stored above ``after_version`` first (read in pages
        of `stream.FOLLOW_BATCH`), then each new checkpoint as it arrives: it waits in
        the store between them (woken by the save, nothing polls).  A checkpoint deleted
        before it was read is skipped.  When the execution is emptied (cleared, or its
        last checkpoint deleted) it yields a `Cleared` marker, then the new checkpoints
        from version 1: a clear is seen at the first save after it (at once if there is
        one already).  The logic is `stream.FollowCursor`'s (see there for exactly when
        a clear is seen); this method runs its requests.

        Parameters:
            after_version: yield only what comes after this version.  To resume, pass
                the ``version`` of the last checkpoint seen: the new iterator goes on
                exactly after it.
            timeout: the longest wait for the next item, in seconds (None: for ever); when
                it runs out the iterator ends (no exception).

        The iterator also ends when the store is closed, from another thread too: that
        wakes a blocked wait (on every backend).

        Raises:
            ConfigError: a bad execution id, ``after_version`` or ``timeout`` (when called,
                before anything is sent).
            StoreUnavailable: the store cannot be reached (not when it was closed).

        Example:
            >>> for item in store.follow("run", timeout=30):
            ...     if isinstance(item, Cleared):
            ...         continue           # the run restarted; versions from 1 follow
            ...     handle(item.state)     # item.version: where to resume
        """
        cursor = FollowCursor(execution_id, after_version=after_version)
        return self._follow(cursor, _check_timeout(timeout))

    def _follow(self, cursor: FollowCursor,
                total: float | None) -> Iterator[Checkpoint | Cleared]:
        """Run ``cursor``'s requests with blocking calls; yield what it returns."""
        execution_id = cursor.execution_id
        deadline = None if total is None else time.monotonic() + total
        while not self._is_closed():
            request = cursor.request()
            ran_out = False
            try:
                if isinstance(request, ListAbove):
                    items = cursor.on_list(self._backend.list(
                        execution_id, request.limit, None, False, request.after_version))
                else:
                    chunk = 0.0
                    if request.block:
                        left = self.wait_slice if deadline is None \
                            else deadline - time.monotonic()
                        chunk = max(0.0, min(left, self.wait_slice))
                    record, generation = self._backend.wait(
                        execution_id, request.after_version, chunk, request.generation)
                    items = cursor.on_wait(record, generation)
                    ran_out = request.block and record is None
            except ShmstoreError:
                if self._is_closed():  # closed under us (another thread): the end
                    return
                raise
            for item in items:
                yield item if isinstance(item, Cleared) \
                    else _checkpoint(item, self.codec, self.copy_on_load)
            if items and total is not None:
                deadline = time.monotonic() + total
            elif ran_out and deadline is not None and time.monotonic() >= deadline:
                return

    def load_or_compute(
        self,
        execution_id: str,
        node_name: str,
        compute: Callable[[], Any],
        *,
        timeout: float | None = None,
        lease: float = DEFAULT_LEASE_S,
    ) -> Checkpoint:
        """The node's latest checkpoint, computed by exactly one caller if there is none.

        If the execution has a checkpoint of ``node_name``, return the latest one.  Else
        one caller, in whatever thread or process, gets the lease and runs ``compute()``;
        its result is saved as a checkpoint of that execution and node and returned to
        every caller.  The others wait in the store (woken when the checkpoint arrives,
        nothing polls).  While ``compute()`` runs, a thread renews the lease.

        If ``compute()`` raises, the error is raised in that caller and one waiter takes
        over; if the computing process dies, one waiter takes over once its lease
        expires.  A computing process frozen for longer than ``lease`` may find that
        another has computed meanwhile: the node still gets one checkpoint, the first
        completed, and every caller gets that one.

        Parameters:
            execution_id: the execution the checkpoint belongs to.
            node_name: the step whose result it is.
            compute: called with no arguments; returns the state to store.
            timeout: seconds to wait for another caller's computation (None: no limit;
                0: do not wait).  Our own ``compute()`` is never interrupted.
            lease: seconds a silent computing process keeps its claim.

        Raises:
            StoreTimeout: another caller was still computing after ``timeout`` seconds.
            EncodeError: the computed state cannot be encoded (a waiter takes over).
            ConfigError: a bad argument, or a call from inside its own ``compute()``.
            Exception: whatever ``compute()`` raised, in the caller that ran it.

        Example:
            >>> cp = store.load_or_compute("session", "dataset", lambda: build_dataset())
            >>> cp.state          # the same checkpoint in every process
        """
        lease_s, deadline = self._claim_args(execution_id, node_name, compute, timeout,
                                             lease, self.wait_slice)
        owner = _owner()
        while True:
            answer = self._backend.claim(execution_id, node_name, owner, lease_s,
                                         deadline.chunk())
            got = self._claimed(answer, execution_id, node_name, deadline)
            if isinstance(got, str):
                return self._compute(execution_id, node_name, compute, got, lease_s)
            if got is not None:
                return got

    def _compute(self, execution_id: str, node_name: str, compute: Callable[[], Any],
                 token: str, lease_s: float) -> Checkpoint:
        """Run ``compute`` under the lease ``token``; save its result and release."""
        key = (execution_id, node_name)
        try:
            with _Heartbeat(self, key, token, lease_s):
                state = compute()
            record = self._record(Checkpoint(execution_id=execution_id, node_name=node_name,
                                             state=state))
            answer = self._backend.complete(record, token)
        except BaseException:
            # Hand over now rather than at the lease's expiry; if the store is gone too,
            # the lease expires on its own.
            try:
                self._backend.release(*key, token)
            except ShmstoreError as exc:
                log.debug("cannot release the lease on %s: %s", key, exc)
            raise
        return self._completed(answer, record)

    # -- queries over several executions (LangGraph support) --------------------------------

    def find(
        self,
        execution_id: str | Iterable[str],
        *,
        prefix: bool = False,
        node_name: str | None = None,
        where: Mapping[str, Any] | None = None,
        before_id: str | None = None,
        limit: int | None = None,
        checkpoint_id: str | None = None,
        children: str | None = None,
        by_id: bool = False,
    ) -> builtins.list[tuple[Checkpoint, builtins.list[Checkpoint]]]:
        """Checkpoints of one or several executions that match, with their children.

        One round trip, however many executions.  Executions are taken in id order, and
        the checkpoints of each newest version first (with ``by_id``: greatest id first).

        Parameters:
            execution_id: an execution id, or several.
            prefix: take ``execution_id`` as id prefixes: every execution whose id starts
                with one is in scope.
            node_name: only checkpoints of this node.
            where: only checkpoints whose metadata has these values (equality, a missing
                key counts as None; `OneOf` accepts any of several values).
            before_id: only checkpoints whose id sorts below this string.
            limit: at most this many in all.
            checkpoint_id: only the checkpoint with this id.
            children: also return, for each checkpoint found, the checkpoints of this node
                in its execution whose ``parent_id`` is its id (oldest first).
            by_id: order each execution's checkpoints by id, greatest first (``limit``
                then takes the greatest ids), not by version.

        Returns:
            ``(checkpoint, children)`` pairs; ``children`` is empty unless asked for.

        Example:
            >>> [(cp.node_name, len(kids)) for cp, kids in
            ...  store.find("run", node_name="step", children="log", limit=1)]
            [('step', 2)]
        """
        args = self._find_args(execution_id, prefix, node_name, where, before_id, limit,
                               checkpoint_id, children, by_id)
        return [] if args is None else self._found(self._backend.find(*args))

    def save_new(self, checkpoints: Iterable[Checkpoint]) -> builtins.list[Checkpoint | None]:
        """Store, in one round trip, each checkpoint whose id is not stored yet.

        Returns the stored ones with their versions, None in place of those skipped (their
        id was stored already, or came earlier in ``checkpoints``).  All or nothing under
        the store's limits.

        Raises:
            EncodeError: one of them cannot be encoded; nothing is written.
        """
        cps, versions = self._save_all(self._backend.save_new, checkpoints)
        return [_with_version(cp, v) if v else None for cp, v in zip(cps, versions, strict=True)]

    def purge(
        self,
        execution_id: str | Iterable[str],
        *,
        prefix: bool = False,
        node_name: str | None = None,
        where: Mapping[str, Any] | None = None,
        keep: int = 0,
        children: str | None = None,
    ) -> int:
        """Drop the matching checkpoints of one or several executions, atomically.

        Parameters are those of `find`; besides:
            keep: spare the newest ``keep`` matching checkpoints of each execution.
            children: also drop the checkpoints of this node whose parent is dropped.

        Returns how many checkpoints were dropped (children included).

        Example:
            >>> store.purge("run-", prefix=True, node_name="step", keep=1, children="log")
        """
        args = self._purge_args(execution_id, prefix, node_name, where, keep, children)
        return 0 if args is None else int(self._backend.purge(*args))

    def copy(self, source: str, target: str, *, prefix: bool = False) -> int:
        """Copy an execution (or, with ``prefix``, every execution whose id starts with
        ``source``) to ``target`` (+ the rest of its id), in one atomic round trip.

        The copies get new versions in the original order.  Ids and parent ids that start
        with ``source`` get ``target`` in its place, other ids new ones; parent links among
        the copies follow, so the copy is linked like the original.  Returns the count.

        Raises:
            ConfigError: ``source`` equals ``target``.
            StoreFull: the copies do not fit under the limits; nothing was written.
        """
        return int(self._backend.copy(*self._copy_args(source, target, prefix)))

    def stats(self) -> StoreStats:
        """Counts, payload bytes, the server's pid, RSS and uptime, and per-op counters."""
        return StoreStats.from_dict(self._backend.stats())

    def memory_history(self, since: float | None = None) -> builtins.list[Sample]:
        """Memory samples of the store's owner, oldest first (only those after ``since``).

        Each sample is a dict: ``t`` (epoch seconds), ``server_rss``, ``server_uss``
        (None where the platform has no USS), ``checkpoints``, ``payload_bytes``,
        ``segment_bytes`` and ``clients`` (``{pid: [name, rss, alive, pss, role,
        state]}`` for every registered client).  A server's answer holds at most 100,000
        entries (a sample and each of its clients count one): after ``since``, the oldest
        that fit (ask again from the last ``t``), without it the newest;
        `monitor.recorder.MemoryRecorder` reads on until it has them all.

        Raises:
            ConfigError: ``since`` is not a number or None.
        """
        return list(self._backend.memory_history(self._since(since)))

    def close(self) -> None:
        """Release the store's resources; closing twice is fine."""

    def _is_closed(self) -> bool:
        """True once `close` was called (a follower ends then; each store says)."""
        return False

    def __enter__(self) -> BaseStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
