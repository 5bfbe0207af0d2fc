"""The store's rules, written once: pure functions and data, no I/O, no locks.

Every backend keeps the same rules (see `Limits` for what the limits mean): the
in-process `CheckpointTable` calls these functions under its lock; `RedisStore` calls
them in the client for what needs no atomicity (the metadata filter of ``find``, the
purge plan, ``copy``'s renaming, the refusal messages) and keeps the Lua twins of the
atomic ones (admission, eviction, retention, inside the script that writes) in
backends/lua/prelude.lua.  tests/contract/test_rules_agree.py drives both over the same
inputs, so a twin that drifts fails there.

A record is a tuple ``(id, execution_id, node_name, version, timestamp_us, parent_id,
metadata, state)``; the functions take any sequence laid out so and give the caller's
records back as they came.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple, TypeVar

import msgpack

from .checkpoint import new_id
from .errors import CheckpointNotFound, ConfigError, StoreFull, VersionConflict
from .limits import Limits
from .record import Record

__all__ = [
    "Projection", "Where", "copy_onto_itself", "copy_records",
    "decode_where", "evictions", "first_matches", "matches", "metadata_matches",
    "not_found", "over", "oversized", "project", "purge_plan", "renamed", "retention_excess",
    "rss_refusal", "store_full", "store_wide", "version_conflict", "with_children",
]

# (id, execution_id, node_name, version, timestamp_us, parent_id, metadata, state)
R = TypeVar("R", bound=Sequence[Any])

# Field positions in a record.
ID, EXECUTION, NODE, VERSION, TIMESTAMP, PARENT, METADATA, STATE = range(8)

# -- refusals and conflicts: one function per message -------------------------------------

_WHAT = {"max_bytes": "bytes of payload", "max_checkpoints": "checkpoints"}


def store_full(limit: str, maximum: int, current: int, requested: int, *,
               checkpoint_id: str | None = None, value: int | None = None,
               alone: bool = False, unsent: bool = False) -> StoreFull:
    """The `StoreFull` a limit refuses a save with, its message saying what to do.

    ``checkpoint_id`` names the checkpoint over ``max_checkpoint_bytes``; ``value`` is
    what a store-wide limit's figure would become; ``alone``: the batch by itself is over;
    ``unsent``: the client refused it before sending anything.
    """
    if limit == "max_checkpoint_bytes":
        message = (f"checkpoint {checkpoint_id!r} is {current} bytes encoded, over "
                   f"max_checkpoint_bytes={maximum}; checkpoint a reference to large data "
                   "instead, or raise the limit" + (" (nothing was sent)" if unsent else ""))
    elif limit == "max_rss":
        message = (f"the store's process uses {current} bytes of memory (RSS), over "
                   f"max_rss={maximum}; delete or clear executions, or raise the limit")
    elif alone:
        message = (f"{requested} {_WHAT[limit]} in one save can never fit under "
                   f"{limit}={maximum}; save less at once, or raise the limit")
    else:
        message = (f"the store is full: {limit}={maximum}, it holds {current} {_WHAT[limit]} "
                   f"and this save would make it {value}; delete or clear executions, "
                   "raise the limit, or use on_full='evict'")
    return StoreFull(message, limit=limit, maximum=maximum, current=current,
                     requested=requested)


def version_conflict(execution_id: str, expected: int | None, actual: int) -> VersionConflict:
    """The refusal of a save whose ``expected_version`` is not the execution's latest."""
    return VersionConflict(
        f"execution {execution_id!r} is at version {actual}, not {expected}; "
        "load the latest and try again",
        execution_id=execution_id, expected=expected, actual=actual,
    )


def not_found(checkpoint_id: str) -> CheckpointNotFound:
    """The answer to a load of an id that has no record."""
    return CheckpointNotFound(f"no checkpoint with id {checkpoint_id!r}",
                              checkpoint_id=checkpoint_id)


def copy_onto_itself(source: str) -> ConfigError:
    """The refusal of a `copy` whose source is its target."""
    return ConfigError(f"cannot copy {source!r} onto itself", value=source)


# -- admission, eviction, retention -------------------------------------------------------


def retention_excess(count: int, keep: int | None) -> int:
    """How many of an execution's oldest records retention drops when it holds ``count``
    (keep the newest ``keep``; None: keep all)."""
    return 0 if keep is None else max(0, count - keep)


def over(limits: Limits, count: int, nbytes: int) -> tuple[str, int, int] | None:
    """The first store-wide limit that ``count``/``nbytes`` break, as (name, max, value)."""
    if limits.max_checkpoints is not None and count > limits.max_checkpoints:
        return ("max_checkpoints", limits.max_checkpoints, count)
    if limits.max_bytes is not None and nbytes > limits.max_bytes:
        return ("max_bytes", limits.max_bytes, nbytes)
    return None


def oversized(limits: Limits, records: Iterable[Sequence[Any]]) -> StoreFull | None:
    """The refusal of the first record over ``max_checkpoint_bytes`` (state plus
    metadata), or None."""
    largest = limits.max_checkpoint_bytes
    if largest is None:
        return None
    for record in records:
        size = len(record[STATE]) + len(record[METADATA])
        if size > largest:
            return store_full("max_checkpoint_bytes", largest, size, size,
                              checkpoint_id=record[ID])
    return None


def rss_refusal(limits: Limits, rss: int) -> StoreFull | None:
    """The refusal of any save while the store's process uses more than ``max_rss``."""
    if limits.max_rss is None or rss <= limits.max_rss:
        return None
    return store_full("max_rss", limits.max_rss, rss, 0)


class Projection(NamedTuple):
    """What storing a batch would leave: the store's and the batch's count and bytes."""

    checkpoints: int
    payload_bytes: int
    batch_checkpoints: int
    batch_bytes: int


def project(
    records: Iterable[Sequence[Any]],
    count: int,
    nbytes: int,
    stored: Callable[[str], tuple[str, int] | None],
    members: Callable[[str], Iterable[str]],
    keep: int | None,
) -> Projection:
    """What storing ``records`` in order into a store of ``count`` records and ``nbytes``
    payload bytes would leave, with re-saved ids and retention acting as a save does.

    Parameters:
        stored: a stored id's (execution, state size), or None if it is not stored.
        members: an execution's stored ids, oldest first (only asked with ``keep``).
        keep: ``max_per_execution``.
    """
    batch: dict[str, tuple[str, int]] = {}  # batch id -> (execution, size), alive
    gone: set[str] = set()  # stored ids the batch replaces or retention drops
    ids: dict[str, list[str]] = {}  # execution -> ids, oldest first

    def ids_of(name: str) -> list[str]:
        if name not in ids:
            ids[name] = list(members(name))
        return ids[name]

    for record in records:
        cid, name, size = record[ID], record[EXECUTION], len(record[STATE])
        old = batch.pop(cid, None) if cid in batch else (
            None if cid in gone else stored(cid))
        if old is not None:
            gone.add(cid)
            count, nbytes = count - 1, nbytes - old[1]
            if keep is not None:
                ids_of(old[0]).remove(cid)
        batch[cid] = (name, size)
        count, nbytes = count + 1, nbytes + size
        if keep is not None:
            members_now = ids_of(name)
            members_now.append(cid)
            for _ in range(retention_excess(len(members_now), keep)):
                drop = members_now.pop(0)
                dropped = batch.pop(drop) if drop in batch else stored(drop)
                gone.add(drop)
                count, nbytes = count - 1, nbytes - (dropped[1] if dropped else 0)
    return Projection(count, nbytes, len(batch), sum(size for _, size in batch.values()))


def store_wide(limits: Limits, count: int, nbytes: int,
               projection: Projection) -> tuple[bool, StoreFull | None]:
    """The store-wide verdict on a save: (whether eviction must follow, refusal or None).

    ``count``/``nbytes`` are the store's figures now, ``projection`` what the save would
    leave.  A batch over a limit by itself is refused also under ``on_full="evict"``.
    """
    broken = over(limits, projection.checkpoints, projection.payload_bytes)
    if broken is None:
        return False, None
    name, maximum, value = broken
    alone = over(limits, projection.batch_checkpoints, projection.batch_bytes) is not None
    if limits.on_full == "evict" and not alone:
        return True, None
    if name == "max_bytes":
        now, requested = nbytes, projection.batch_bytes
    else:
        now, requested = count, projection.batch_checkpoints
    return False, store_full(name, maximum, now, requested, value=value, alone=alone)


def evictions(limits: Limits, count: int, nbytes: int, oldest_first: Iterable[R]) -> list[R]:
    """The oldest records (of all the store's, given oldest first) that eviction drops so
    that a store of ``count`` records and ``nbytes`` payload bytes fits its limits."""
    victims: list[R] = []
    for record in oldest_first:
        if over(limits, count, nbytes) is None:
            break
        victims.append(record)
        count, nbytes = count - 1, nbytes - len(record[STATE])
    return victims


# -- copy -----------------------------------------------------------------------------------


def renamed(name: str, source: str, target: str) -> str:
    """``name`` with its prefix ``source`` replaced by ``target``."""
    return target + name[len(source):]


def copy_records(plan: Iterable[tuple[Sequence[Any], str]], source: str,
                 target: str) -> list[Record]:
    """The copies `copy` stores of ``(record, target execution)`` pairs, in order.

    An id or parent id that starts with ``source`` gets ``target`` in its place; other
    ids get new ones, and parent links between copied records follow them, so the copy
    is linked as the original.  Copies carry version 0: the store assigns theirs.
    """
    pairs = list(plan)
    ids = {record[ID]: renamed(record[ID], source, target) if record[ID].startswith(source)
           else new_id() for record, _ in pairs}
    copies = []
    for record, name in pairs:
        parent = record[PARENT]
        if parent in ids:
            parent = ids[parent]
        elif parent is not None and parent.startswith(source):
            parent = renamed(parent, source, target)
        copies.append(Record(ids[record[ID]], name, record[NODE], 0, record[TIMESTAMP],
                             parent, record[METADATA], record[STATE]))
    return copies


# -- queries: find and purge ------------------------------------------------------------------
# ``where`` maps a metadata key to the msgpack encodings of the values it may have (one of
# them); a missing key counts as None.  A record's *children* are the records of the node
# named ``children`` in its execution whose parent_id is its id, in version order.

Where = list[tuple[str, list[Any]]]


def _unpack(data: bytes) -> Any:
    # Plain msgpack: extension values stay msgpack.ExtType, compared by their bytes.
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def decode_where(where: Mapping[str, Sequence[bytes]] | None) -> Where | None:
    """``where`` as (key, accepted values) pairs, values decoded once per call."""
    if not where:
        return None
    try:
        return [(key, [_unpack(value) for value in values]) for key, values in where.items()]
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"a where filter must map keys to lists of msgpack-encoded values: "
                          f"{exc}", value=repr(where)[:80]) from None


def metadata_matches(metadata: bytes, where: Where) -> bool:
    """True if the msgpack map ``metadata`` has, for every key of ``where``, one of its
    values (a missing key counts as None), with Python's equality (1 == 1.0)."""
    try:
        meta = _unpack(metadata)
    except (TypeError, ValueError):
        return False
    if not isinstance(meta, dict):
        return False
    return all(meta.get(key) in accepted for key, accepted in where)


def matches(record: Sequence[Any], node_name: str | None, filters: Where | None,
            before_id: str | None = None) -> bool:
    """Whether ``record`` passes the filters of `find` and `purge` (ids compare as str)."""
    return ((node_name is None or record[NODE] == node_name)
            and (before_id is None or record[ID] < before_id)
            and (filters is None or metadata_matches(record[METADATA], filters)))


def first_matches(candidates: Iterable[R], node_name: str | None, filters: Where | None,
                  before_id: str | None, room: int | None) -> list[R]:
    """The candidates that match, in order, at most ``room`` (None: all)."""
    found: list[R] = []
    if room is not None and room <= 0:
        return found
    for record in candidates:
        if matches(record, node_name, filters, before_id):
            found.append(record)
            if room is not None and len(found) >= room:
                break
    return found


def with_children(parents: Sequence[R], kids: Iterable[R]) -> list[tuple[R, list[R]]]:
    """``[parent, its children]`` for each parent; ``kids`` are candidates, oldest first,
    and a kid belongs to the parent its parent_id names."""
    found: dict[str, list[R]] = {record[ID]: [] for record in parents}
    for kid in kids:
        siblings = found.get(kid[PARENT])
        if siblings is not None:
            siblings.append(kid)
    return [(record, found[record[ID]]) for record in parents]


def purge_plan(oldest_first: Sequence[R], node_name: str | None, filters: Where | None,
               keep: int, children: str | None) -> list[R]:
    """What `purge` drops of one execution's records (given oldest first), oldest first:
    the matches but the newest ``keep``, and the ``children`` whose parent goes."""
    if node_name is None and filters is None and not keep:
        return list(oldest_first)
    newest_first = first_matches(reversed(oldest_first), node_name, filters, None, None)
    dropped = {record[ID] for record in newest_first[keep:]}
    if dropped and children is not None:
        dropped.update([record[ID] for record in oldest_first
                        if record[NODE] == children and record[PARENT] in dropped])
    return [record for record in oldest_first if record[ID] in dropped]
