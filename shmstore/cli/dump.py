"""``shmstore dump`` and ``shmstore load``: a store's records as a msgpack stream.

The format (version 1) is a sequence of msgpack items, one after another:

1. a header, ``{"format": "shmstore-dump", "version": 1}``;
2. one item per record, as the store keeps it (`Record`): ``[id, execution_id,
   node_name, version, timestamp_us, parent_id, metadata, state]``, metadata and state
   as msgpack ``bin`` (the bytes the saving client encoded, never decoded here);
   executions in id order, each one's records in version order;
3. an end, ``{"records": N, "sha256": HEX}``: the count, and the SHA-256 of the msgpack
   bytes of every item before it (so a file cut at a record boundary, or a flipped bit
   in a state, is found before anything is loaded).

Nothing in a dump depends on the backend it came from or the time it was made: the same
records give the same bytes, so dump -> load elsewhere -> dump is byte-exact.  A dump
is read whole and checked before the first record is saved; it is then saved in
batches (`BaseStore.save_records`, one ``save_many`` round trip each), and if a batch
fails, the executions loaded so far are cleared again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import sys
from collections.abc import Iterator, Sequence
from typing import IO, Any

import msgpack

from ..core.config import open_private_temp
from ..core.errors import ConfigError, DecodeError, ShmstoreError
from ..core.record import Record
from ..core.store import BaseStore, check_record

__all__ = ["FORMAT", "VERSION", "Dump", "Progress", "dump_store", "load_dump", "read_dump",
           "write_atomically"]

#: The header's ``format`` and ``version``.
FORMAT = "shmstore-dump"
VERSION = 1
#: A load saves at most this many records, or about this many bytes, per round trip.
BATCH_RECORDS = 1000
BATCH_BYTES = 16 * 1024 * 1024
#: Items are small arrays and maps: a corrupt length prefix must not allocate much.
_MAX_ITEM_FIELDS = 16


class Progress:
    """A progress bar on stderr (rich, the ``[cli]`` extra) when it is a terminal;
    silent otherwise.  Use as a context manager; `phase` starts a bar, `advance` moves it.

    Parameters:
        enabled: False: never draw (``--no-progress``).
    """

    def __init__(self, *, enabled: bool = True) -> None:
        self._bar: Any = None
        self._task: Any = None
        if enabled and sys.stderr.isatty():
            try:
                from rich.console import Console
                from rich.progress import Progress as RichProgress
            except ImportError:  # without the [cli] extra: no bar
                return
            self._bar = RichProgress(console=Console(file=sys.stderr), transient=True)

    @property
    def shown(self) -> bool:
        """Whether a bar is drawn (worth asking the store for a total)."""
        return self._bar is not None

    def __enter__(self) -> Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def phase(self, description: str, total: int | None) -> None:
        """Start a new bar of ``total`` steps (None: unknown), ending the previous one."""
        if self._bar is not None:
            if self._task is not None:
                self._bar.remove_task(self._task)
            self._task = self._bar.add_task(description, total=total)

    def advance(self, steps: int) -> None:
        """Move the current bar on by ``steps``."""
        if self._bar is not None and self._task is not None:
            self._bar.advance(self._task, steps)


def _packer() -> msgpack.Packer:
    return msgpack.Packer(use_bin_type=True, autoreset=True)


def dump_store(store: BaseStore, out: IO[bytes], *,
               progress: Progress | None = None) -> tuple[int, int]:
    """Write every record of ``store`` to ``out`` in the dump format.

    Each execution is one `BaseStore.list_records` call: a consistent snapshot of that
    execution (not of the whole store, if others write meanwhile).

    Returns:
        ``(records, executions)`` written.

    Raises:
        ShmstoreError: the store's (`StoreUnavailable` ...); ``out`` then holds a part.
        ConfigError: ``out`` cannot be written, or a state is 4 GiB or more (msgpack's
            ``bin`` limit).

    Example:
        >>> with open("run.dump", "wb") as f:
        ...     dump_store(store, f)
        (3, 1)
    """
    bar = progress or Progress(enabled=False)
    pack = _packer().pack
    digest = hashlib.sha256()
    records = executions = 0

    def write(item: object) -> None:
        try:
            data = pack(item)
        except (ValueError, OverflowError) as exc:  # a bin of 4 GiB or more
            raise ConfigError(f"cannot write a record to a dump: {exc}",
                              value=repr(item)[:80]) from None
        digest.update(data)
        _write(out, data)

    names = store.executions()
    bar.phase("dumping", store.stats().checkpoints if bar.shown else None)
    write({"format": FORMAT, "version": VERSION})
    for name in names:
        found = store.list_records(name)
        if found:
            executions += 1
        for record in found:
            write(record)
            records += 1
        bar.advance(len(found))
    _write(out, pack({"records": records, "sha256": digest.hexdigest()}))
    return records, executions


def _write(out: IO[bytes], data: bytes) -> None:
    try:
        out.write(data)
    except OSError as exc:
        raise ConfigError(f"cannot write the dump: {exc.strerror or exc}",
                          value=getattr(out, "name", "")) from None


@contextlib.contextmanager
def write_atomically(path: str) -> Iterator[IO[bytes]]:
    """A new file that becomes ``path`` when the block ends without an error.

    It is written beside ``path`` (``O_EXCL|O_NOFOLLOW``, mode 0600: a dump holds every
    state) and renamed over it, so a symlink at ``path`` is replaced, never followed,
    and a failed dump leaves no half-written file; on an error it is removed.

    Raises:
        ConfigError: the directory is missing or not writable.
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        tmp, fd = open_private_temp(directory, os.path.basename(path))
    except OSError as exc:
        raise ConfigError(f"cannot write dump file {path!r}: {exc.strerror or exc}; check "
                          f"that {directory!r} exists and is writable", value=path) from None
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.rename(tmp, path)  # replaces a symlink itself, never its target
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class _Counted:
    """A stream that counts the bytes read from it (the unpacker reads ahead)."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream, self.count = stream, 0

    def read(self, n: int = -1) -> bytes:
        try:
            data = self.stream.read(n)
        except OSError as exc:
            raise ConfigError(f"cannot read the dump: {exc.strerror or exc}",
                              value=getattr(self.stream, "name", "")) from None
        self.count += len(data)
        return data


_NOTHING = object()


@dataclasses.dataclass
class Dump:
    """A dump read and checked whole (`read_dump`): its records in file order."""

    records: list[Record]

    def executions(self) -> dict[str, list[Record]]:
        """Its records by execution, in file (version) order."""
        out: dict[str, list[Record]] = {}
        for record in self.records:
            out.setdefault(record.execution_id, []).append(record)
        return out

    def gaps(self) -> list[str]:
        """The executions whose versions are not 1..n: a store cannot give them back."""
        return [name for name, records in self.executions().items()
                if [r.version for r in records] != list(range(1, len(records) + 1))]


def read_dump(stream: IO[bytes], name: str, *, size: int | None = None,
              progress: Progress | None = None) -> Dump:
    """Read and check a whole dump from ``stream`` (``name`` says where in messages).

    Checked: the header (format and version), every record's shape (`check_record`),
    versions increasing within each execution, no id twice, the end item's count and
    SHA-256, and nothing after it.

    Parameters:
        size: the stream's length in bytes, for the progress bar (None: unknown).

    Raises:
        DecodeError: not a dump, a newer format version, truncated, or corrupt (naming
            the item).
    """
    bar = progress or Progress(enabled=False)
    bar.phase("reading", size)
    counted = _Counted(stream)
    unpacker = msgpack.Unpacker(counted, raw=False, max_buffer_size=0,
                                max_array_len=_MAX_ITEM_FIELDS, max_map_len=_MAX_ITEM_FIELDS)
    repack = _packer().pack
    digest = hashlib.sha256()
    items = _items(unpacker, name)
    header = next(items, _NOTHING)
    if header is _NOTHING:
        raise DecodeError(f"{name} is empty, not a shmstore dump")
    if not (isinstance(header, dict) and header.get("format") == FORMAT):
        raise DecodeError(f"{name} is not a shmstore dump (it does not start with a "
                          f"{FORMAT!r} header); write one with `shmstore dump FILE`")
    if header.get("version") != VERSION:
        raise DecodeError(f"{name} is a {FORMAT} of version {header.get('version')!r}; this "
                          f"shmstore reads version {VERSION}: load it with the shmstore that "
                          "wrote it")
    digest.update(repack(header))
    records: list[Record] = []
    seen: set[str] = set()
    last: dict[str, int] = {}
    position = unpacker.tell()
    for item in items:
        if isinstance(item, dict):
            _check_end(item, records, digest, name)
            end = unpacker.tell()
            if next(items, _NOTHING) is not _NOTHING or counted.count != end:
                raise DecodeError(f"{name} is corrupt: there is data after its end item")
            bar.advance(end - position)
            return Dump(records)
        what = f"record {len(records) + 1} of {name}"
        try:
            record = check_record(item, what)
        except ConfigError as exc:
            raise DecodeError(f"{name} is corrupt: {exc}") from None
        if record.id in seen:
            raise DecodeError(f"{name} is corrupt: {what} repeats id {record.id!r}")
        if record.version <= last.get(record.execution_id, 0):
            raise DecodeError(f"{name} is corrupt: {what} has version {record.version} "
                              f"after {last[record.execution_id]} in execution "
                              f"{record.execution_id!r}")
        seen.add(record.id)
        last[record.execution_id] = record.version
        digest.update(repack(item))
        records.append(record)
        now = unpacker.tell()
        bar.advance(now - position)
        position = now
    raise DecodeError(f"{name} is truncated: {len(records)} records and no end item; dump "
                      "again, or copy the whole file")


def _items(unpacker: msgpack.Unpacker, name: str) -> Iterator[Any]:
    """The unpacker's items, its errors as `DecodeError` naming ``name``."""
    while True:
        try:
            item = next(unpacker)
        except StopIteration:
            return
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            # FormatError, StackError, ExtraData, BufferFull and UnicodeDecodeError are
            # ValueErrors: bytes that are not msgpack, or not the msgpack a dump holds.
            raise DecodeError(f"{name} is corrupt or not a shmstore dump: {exc}") from None
        yield item


def _check_end(item: dict[Any, Any], records: Sequence[Record], digest: Any,
               name: str) -> None:
    if item.get("records") != len(records):
        raise DecodeError(f"{name} is corrupt: its end item counts {item.get('records')!r} "
                          f"records, {len(records)} were read")
    if item.get("sha256") != digest.hexdigest():
        raise DecodeError(f"{name} is corrupt: its checksum does not match (a record was "
                          "changed after it was written)")


def load_dump(store: BaseStore, dump: Dump, *, replace: bool = False, renumber: bool = False,
              progress: Progress | None = None) -> dict[str, int]:
    """Save a dump's records into ``store``; return how many went into each execution.

    Versions are kept: each execution is loaded in version order into an empty
    execution, so versions 1..n come back as they were.  A dump whose execution has gaps
    (versions 3, 5, 6 after deletes or retention) cannot be given back those versions by
    any store (they are assigned 1, 2, 3 ...): it is refused unless ``renumber``.

    Parameters:
        replace: clear the executions of the dump that have checkpoints in ``store``
            before loading (else they are refused).
        renumber: load executions with gaps in their versions as 1..n, in order.

    Raises:
        ConfigError: an execution has gaps (without ``renumber``), or already has
            checkpoints (without ``replace``); nothing was loaded.
        ShmstoreError: a batch failed (`StoreFull` ...): the executions loaded so far
            are cleared again, and the message says so.
    """
    bar = progress or Progress(enabled=False)
    by_execution = dump.executions()
    gaps = dump.gaps()
    if gaps and not renumber:
        raise ConfigError(f"{len(gaps)} executions of the dump have gaps in their versions "
                          f"({_names(gaps)}); a store numbers each execution 1, 2, 3 ...: "
                          "pass --renumber to load them so, in the same order", value=gaps[0])
    present = sorted(set(by_execution) & set(store.executions()))
    if present and not replace:
        raise ConfigError(f"{len(present)} executions of the dump already have checkpoints "
                          f"in the store ({_names(present)}); pass --replace to clear them "
                          "first, or load into another store", value=present[0])
    for name in present:
        store.clear(name)
    bar.phase("loading", len(dump.records))
    loaded: dict[str, int] = {}
    try:
        for batch in _batches(dump.records):
            for record in batch:
                loaded[record.execution_id] = loaded.get(record.execution_id, 0) + 1
            versions = store.save_records(batch)
            # Versions 1..n in order: the dump's own, or (renumbered) their places.
            for record, version, want in zip(batch, versions, _places(batch, loaded),
                                             strict=True):
                if version != want:
                    raise ShmstoreError(
                        f"record {record.id!r} of execution {record.execution_id!r} got "
                        f"version {version}, not {want}: another client wrote to it during "
                        "the load")
            bar.advance(len(batch))
    except BaseException as exc:
        undone = _undo(store, loaded)
        if isinstance(exc, ShmstoreError):
            raise type(exc)(f"{exc}; nothing was loaded: {undone}", **exc.attrs) from None
        raise
    return loaded


def _places(batch: Sequence[Record], loaded: dict[str, int]) -> list[int]:
    """The place (from 1) of each record of ``batch`` in its execution, given how many
    of each execution ``loaded`` counts up to the batch's end."""
    places: list[int] = []
    left = dict(loaded)
    for record in reversed(batch):
        places.append(left[record.execution_id])
        left[record.execution_id] -= 1
    return places[::-1]


def _batches(records: Sequence[Record]) -> Iterator[list[Record]]:
    batch: list[Record] = []
    size = 0
    for record in records:
        batch.append(record)
        size += len(record.state) + len(record.metadata)
        if len(batch) >= BATCH_RECORDS or size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _undo(store: BaseStore, loaded: dict[str, int]) -> str:
    """Clear the executions a failed load had written to (they were empty before it)."""
    failed = []
    for name in loaded:
        try:
            store.clear(name)
        except ShmstoreError:
            failed.append(name)
    if failed:
        return (f"the executions loaded so far were cleared again, except {_names(failed)} "
                "(clear them with `shmstore clear`)")
    return "the executions loaded so far were cleared again"


def _names(names: Sequence[str], shown: int = 5) -> str:
    more = len(names) - shown
    return ", ".join(repr(n) for n in names[:shown]) + (f" and {more} more" if more > 0 else "")
