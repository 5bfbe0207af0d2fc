"""`RedisStore`: the store contract on Redis, for work spread over several machines.

Install with ``pip install shmstore[redis]`` (redis-py; hiredis where it has a wheel).
Moving from the local server to Redis is a change of URL::

    store = shmstore.connect("redis://redis.example:6379/0")     # was unix:///...

Every contract operation is one Lua script (``EVALSHA``), so each is atomic in Redis and one
round trip: versions, ``expected_version``, re-saves that move an id, retention and store-wide
limits all happen inside the script that writes.  ``save_many`` and ``load_many`` send
the whole batch in one script call.  The LangGraph queries are scripts too: ``find``
filters by node, id and ``before_id`` in Redis and by metadata in the client (Python's
equality, as the table); ``purge`` and ``copy`` read the scope with one script and write
with another (``purge`` drops only records still there at the version it read, so a
record saved in between survives; ``copy`` stores all or nothing under the limits).
The scripts are files of the package, backends/lua/<op>.lua, each run behind
backends/lua/prelude.lua (the Lua twins of core/rules.py's admission, eviction and
retention, which must run inside the writing script); what needs no atomicity (the
metadata filter, the purge plan, ``copy``'s renaming, every refusal's message) is
core/rules.py's Python, shared with the table.

Payloads are the msgpack bytes the client encoded, kept as they came (the same bytes the
shared server keeps), so a checkpoint moves between backends unchanged.

``wait`` and the waiting part of ``load_or_compute`` sleep on a Redis channel, not in a
client poll loop: when the script finds nothing to return, the client subscribes to the
execution's wake-up channel (on a connection of its own), runs the script once more (so
a save in between is not missed), then sleeps until a message, the timeout or a lease's
expiry.  Every save and released lease ``PUBLISH``es one message, which wakes every
waiter; a message needs no memory, so waits still wake when Redis is at ``maxmemory``
(a stream entry, as this module first used, could not be written then).  A waiter keeps
its execution's generation (bumped when the execution empties, see the contract's
``wait``) in ``P{E}:g``, which lives as long as its waiters, and while the execution
has checkpoints once someone waited on it (so a follower busy between two waits still
sees a clear).

Key layout (``P`` is the prefix, ``shmstore:`` by default; ``{E}`` is the execution id
as a Redis Cluster hash tag, so one execution's keys share a slot)::

    P{E}:v          zset   checkpoint id -> version (the execution's index)
    P{E}:hi         string the execution's high-water version (gone when it empties,
                           so a cleared execution starts again at 1)
    P{E}:r:<id>     hash   one record: n node, v version, t timestamp (µs), p parent
                           (absent for None), m metadata bytes, s state bytes
    P{E}:l:<node>   hash   the load_or_compute lease on a node: t token, o owner; its
                           TTL is the lease
    P{E}:w          channel wake-ups for waiters (pub/sub: not a key, holds nothing)
    P{E}:g          string the execution's generation while someone waits on it, and
                           while it has checkpoints once someone did
    Pids            hash   checkpoint id -> execution id (load by id, re-saves)
    Porder          zset   checkpoint id -> store-wide save sequence (eviction order)
    Pexecs          hash   execution id -> checkpoints
    Pebytes         hash   execution id -> payload bytes
    Pstats          hash   payload_bytes, seq, tokens, evictions, rejections, pruned
    Pops            hash   operation -> calls
    Plimits         hash   the `Limits` in force (absent: the defaults)

An execution id containing ``{`` or ``}`` or starting with ``~`` appears in key names
as ``~`` and its UTF-8 bytes in hex, so that the tag stays whole and names never
collide.

Cluster: the per-execution keys are slot-local, but ids, counters and limits are
store-wide, and a re-save may move an id between executions, so the scripts touch keys
of several slots.  RedisStore therefore needs one Redis primary (standalone, or with
replicas/Sentinel); on Redis Cluster the scripts are refused with CROSSSLOT.

Memory: Redis' own ``maxmemory`` refusals become `StoreFull` (limit ``"maxmemory"``);
configure ``maxmemory-policy noeviction`` (Redis' default): a policy that evicts keys
would drop parts of the index behind the store's back.  ``max_rss`` is compared with
``INFO memory`` ``used_memory_rss`` inside the saving script.

Limits (`Limits`) are a property of the data set, not of a client: a store made with
``limits=`` writes them to ``Plimits``; one made without uses whatever is there.
"""

from __future__ import annotations

import builtins
import functools
import hashlib
import json
import math
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Generator, Sequence
from importlib import resources
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit, urlunsplit

from ..core import rules
from ..core.backend import (
    BACKEND_OPS,
    BUSY,
    DONE,
    GRANTED,
    HELD,
    ROLE_WORKER,
    SAVED,
    TABLE_OPS,
    Backend,
    ClaimAnswer,
    CompleteAnswer,
    EncodedWhere,
    Found,
    Sample,
    StatsDict,
)
from ..core.codec import MsgpackCodec
from ..core.errors import (
    AccessDenied,
    ConfigError,
    ShmstoreError,
    StoreFull,
    StoreTimeout,
    StoreUnavailable,
    VersionConflict,
)
from ..core.limits import DEFAULT_MAX_CHECKPOINT_BYTES, LIMIT_FIELDS, Limits, LimitsDict
from ..core.record import Record
from ..core.rules import decode_where, not_found, purge_plan, with_children
from ..core.store import BaseStore
from ..core.validate import duration

try:
    import redis as _redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
except ImportError:  # pragma: no cover - the extra is not installed
    _redis = None  # type: ignore[assignment]

__all__ = ["DEFAULT_PREFIX", "REDIS_SCHEMES", "SCRIPT_SOURCES", "RedisBackend", "RedisOps",
           "RedisStore",
           "check_prefix", "open_client"]

DEFAULT_PREFIX = "shmstore:"
DEFAULT_TIMEOUT = 30.0
#: URL schemes that name a Redis server (``redis+unix:///path`` is a unix socket).
REDIS_SCHEMES = ("redis", "rediss", "redis+unix")
ENV_REDIS_PASSWORD = "SHMSTORE_REDIS_PASSWORD"
WAKE_GRACE_MS = 5000  # a generation key outlives its last waiter's slice by this much

# -- Lua ---------------------------------------------------------------------------------
# The scripts are files of the package (lua/<op>.lua), each run with lua/prelude.lua in
# front of it; what must be atomic (admission, eviction, retention, versions) lives there.
_LUA = resources.files("shmstore.backends") / "lua"


def _script(name: str) -> str:
    """The source of one script: the prelude, then the op's own file."""
    prelude = (_LUA / "prelude.lua").read_text(encoding="utf-8")
    return (prelude.replace("DEFAULT_MAX_CHECKPOINT_BYTES", str(DEFAULT_MAX_CHECKPOINT_BYTES))
            + (_LUA / f"{name}.lua").read_text(encoding="utf-8"))


# One script per file; the prelude is no script of its own.
SCRIPTS = tuple(sorted(entry.name[:-len(".lua")] for entry in _LUA.iterdir()
                       if entry.name.endswith(".lua") and entry.name != "prelude.lua"))

# Scripts by name: (source, SHA1).  EVALSHA needs no load first; NOSCRIPT loads once.
#: Each script's Lua source (loaded when Redis does not know its SHA yet).
SCRIPT_SOURCES = {name: _script(name) for name in SCRIPTS}
_SHAS = {name: hashlib.sha1(source.encode()).hexdigest()
         for name, source in SCRIPT_SOURCES.items()}


def _b(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def _s(data: bytes) -> str:
    return data.decode("utf-8", "surrogatepass")


def execution_tag(execution_id: str) -> str:
    """How an execution id appears inside ``{...}`` in key names (see the module doc)."""
    if "{" in execution_id or "}" in execution_id or execution_id.startswith("~"):
        return "~" + _b(execution_id).hex()
    return execution_id


def _info_field(info: bytes, name: str) -> int:
    for line in info.split(b"\r\n"):
        if line.startswith(name.encode() + b":"):
            return int(line.split(b":", 1)[1])
    return 0


def _record(raw: Sequence[Any]) -> Record:
    parent = raw[5]
    return Record(_s(raw[0]), _s(raw[1]), _s(raw[2]), raw[3], int(raw[4]),
                  None if parent is None else _s(parent), raw[6], raw[7])


def _record_args(record: Record) -> list[Any]:
    cid, execution, node, _version, ts, parent, meta, state = record
    return [_b(cid), _b(execution), _b(node), b"%d" % ts,
            b"" if parent is None else _b(parent), meta, state]


def _redis_url(url: str) -> str:
    """The URL redis-py takes for one of ours (``redis+unix`` is its ``unix``)."""
    scheme = url.split(":", 1)[0].lower()
    if scheme not in REDIS_SCHEMES:
        raise ConfigError(
            f"a Redis URL must start with redis://, rediss:// or redis+unix://, not {url!r:.80}",
            value=url[:80],
        )
    if scheme == "redis+unix":
        return "unix" + url[len("redis+unix"):]
    return url


def check_prefix(prefix: object) -> str:
    """A key prefix as given, checked; also that redis-py is there.

    Raises:
        ConfigError: redis-py is not installed, or the prefix is not a str without braces.
    """
    if _redis is None:
        raise ConfigError("RedisStore needs redis-py: pip install 'shmstore[redis]'",
                          value="redis")
    if not isinstance(prefix, str) or "{" in prefix or "}" in prefix:
        raise ConfigError(f"prefix must be a str without braces, not {prefix!r:.80}",
                          value=repr(prefix)[:80])
    return prefix


def open_client(client_class: Any, retry_class: Any, url: str, timeout: float) -> Any:
    """A redis-py client (sync or asyncio: ``client_class`` and its ``retry_class``) for
    one of our URLs: the call timeout on its sockets, never a retry (a retried script
    could run twice: a save after a timeout), the password from `ENV_REDIS_PASSWORD`
    when the URL has none.

    Raises:
        ConfigError: a bad URL.
    """
    target = _redis_url(url)
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": retry_class(NoBackoff(), 0),
    }
    if urlsplit(target).password is None and os.environ.get(ENV_REDIS_PASSWORD):
        options["password"] = os.environ[ENV_REDIS_PASSWORD]
    try:
        return client_class.from_url(target, **options)
    except ValueError as exc:
        raise ConfigError(f"bad Redis URL {_redact(url)}: {exc}", value=_redact(url)) from None


def _redact(url: str) -> str:
    """The URL without its password, for messages and repr."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.hostname or ""
        netloc = (f"{parts.username}:***@" if parts.username else ":***@") + host
        if parts.port is not None:
            netloc += f":{parts.port}"
    except ValueError:  # a malformed URL: show none of it past the scheme
        return url.split(":", 1)[0] + "://***"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class RedisStore(BaseStore):
    """A store whose checkpoints live in Redis: the same contract across machines.

    Use it from any number of threads and processes (redis-py's pool is thread-safe and
    opens new connections in a forked child); it pickles for spawned children as its
    URL, prefix and options.

    Parameters:
        url_or_client: ``redis://[[user]:password@]host:port/db``, ``rediss://...`` (TLS),
            ``redis+unix:///path/to/redis.sock?db=0``, or a ready ``redis.Redis`` client.
            Without a password in the URL, ``SHMSTORE_REDIS_PASSWORD`` is used if set
            (keep secrets off command lines).
        prefix: every key starts with it; stores with different prefixes share a Redis
            without seeing each other.  No ``{`` or ``}``.
        limits: what the data set may hold (`Limits` or a dict); written to Redis for
            every client of this prefix.  None: keep what is configured there.
        timeout: seconds any call may take before `StoreTimeout` (blocking waits add
            their own length).
        codec: encodes states and metadata.

    Raises:
        ConfigError: a bad URL, prefix, timeout or limits; redis-py is not installed.
        StoreUnavailable, AccessDenied: only when ``limits`` must be written now.

    Example:
        >>> store = RedisStore("redis://127.0.0.1:6379/0")
        >>> store.save(Checkpoint(execution_id="run", state={"n": 1})).version
        1
    """

    def __init__(
        self,
        url_or_client: Any,
        *,
        prefix: str = DEFAULT_PREFIX,
        limits: Limits | dict[str, Any] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        codec: MsgpackCodec | None = None,
    ) -> None:
        super().__init__(codec=codec)
        self.prefix = check_prefix(prefix)
        self.timeout = duration(timeout, "timeout")
        if isinstance(url_or_client, str):
            self.url: str | None = url_or_client
            client, owns_client = self._open(url_or_client), True
        elif isinstance(url_or_client, _redis.Redis):
            self.url = None
            client, owns_client = url_or_client, False
        else:
            raise ConfigError(
                "RedisStore takes a redis:// URL or a redis.Redis client, not "
                f"{type(url_or_client).__name__}", value=repr(url_or_client)[:80])
        self.address = _redact(self.url) if self.url else repr(client)
        self._backend: RedisBackend = RedisBackend(client, _b(prefix), self.timeout,
                                                   self.address, owns_client=owns_client)
        if limits is not None:
            self._backend._write_limits(Limits.coerce(limits))

    def _open(self, url: str) -> Any:
        return open_client(_redis.Redis, Retry, url, self.timeout)

    def __repr__(self) -> str:
        return f"<RedisStore {self.address} prefix={self.prefix!r}>"

    def __reduce__(self) -> tuple[Any, ...]:
        if self.url is None:
            kwargs = {k: v for k, v in self._client.connection_pool.connection_kwargs.items()
                      if isinstance(v, (str, int, float, bool, type(None)))}
            cls = self._client.connection_pool.connection_class
            return (_rebuild_from_kwargs, (cls.__module__, cls.__qualname__, kwargs,
                                           self.prefix, self.timeout))
        return (_rebuild, (self.url, self.prefix, self.timeout))

    @property
    def _client(self) -> Any:
        """The redis-py client (the backend's)."""
        return self._backend._client

    @property
    def _closed(self) -> bool:
        return self._backend._closed

    def _is_closed(self) -> bool:
        return self._backend._closed

    def flush(self) -> int:
        """Drop every key of this prefix (checkpoints, counters, limits); return how many.

        For tests and resets; other prefixes in the same Redis are left alone.
        """
        return self._backend.flush()

    def close(self) -> None:
        """Close this store's connections (a client passed in is left open).

        Calls in flight in other threads finish; their connections close as they end.
        A ``wait`` or ``follow`` blocked in another thread is woken (``wait`` raises
        `StoreUnavailable`, ``follow`` ends).  Later calls raise `StoreUnavailable`.
        """
        self._backend.close()


_R = TypeVar("_R")


def _guarded(op: Callable[..., _R]) -> Callable[..., _R]:
    """``op`` with the one call path around it: refused once closed, redis-py's errors
    translated into the exception tree, idle connections dropped if closed meanwhile."""

    @functools.wraps(op)
    def call(self: RedisBackend, *args: object) -> _R:
        if self._closed:
            raise StoreUnavailable(f"this RedisStore was closed ({self.address})",
                                   address=self.address)
        try:
            return op(self, *args)
        except ShmstoreError:
            raise
        except Exception as exc:
            if self._closed:  # closed by another thread under this call (close wakes waits)
                raise StoreUnavailable(f"this RedisStore was closed while its {op.__name__!r} "
                                       f"call ran ({self.address})",
                                       address=self.address) from None
            raise self._translate(exc) from None
        finally:
            if self._closed:  # closed by another thread meanwhile: drop what we used
                self._disconnect_idle()

    return call


#: What an operation's steps yield to their runner: run a script (``_RUN, name, *args``),
#: read a hash (``_HGETALL, key``), subscribe to an execution's wake-ups
#: (``_SUBSCRIBE, execution_id``: the runner sends back the subscription, and closes it
#: when the operation ends), sleep on one until a wake-up or ``seconds``
#: (``_SLEEP, subscription, seconds``).
_RUN, _HGETALL, _SUBSCRIBE, _SLEEP = "run", "hgetall", "subscribe", "sleep"
#: One operation as steps: a generator of the I/O it needs, returning its answer.
Steps = Generator[tuple[Any, ...], Any, _R]


class RedisOps:
    """Every `Backend` operation on Redis as steps (``_g_<op>``), with no I/O of its own:
    what to ask Redis (the scripts, their arguments) and what the answers mean, once, for
    the sync runner (`RedisBackend`) and the asyncio one (`shmstore.aio.redis`).  A runner
    sends each step's result back into the generator, or throws its error in.
    """

    def __init__(self, prefix: bytes, timeout: float, address: str) -> None:
        self._prefix = prefix
        self.timeout = timeout
        self.address = address

    def _translate(self, exc: Exception) -> ShmstoreError | Exception:
        """Map a redis-py error to the exception tree."""
        address = self.address
        if _redis is None:  # pragma: no cover
            return exc
        errors = _redis.exceptions
        text = str(exc)
        if isinstance(exc, errors.AuthenticationError) or isinstance(
                exc, (errors.AuthenticationWrongNumberOfArgsError, errors.NoPermissionError)) \
                or text.startswith(("NOAUTH", "WRONGPASS", "NOPERM")):
            return AccessDenied(f"Redis at {address} refused us: {text}; check the password "
                                f"(URL or {ENV_REDIS_PASSWORD}) and the user's ACL",
                                address=address)
        if isinstance(exc, errors.TimeoutError):
            return StoreTimeout(f"Redis at {address} did not answer within {self.timeout} s",
                                timeout=self.timeout, address=address)
        if isinstance(exc, errors.ConnectionError):
            return StoreUnavailable(f"cannot reach Redis at {address}: {text}", address=address)
        if isinstance(exc, errors.OutOfMemoryError) or "OOM command not allowed" in text:
            return self._maxmemory_full()
        if isinstance(exc, errors.ResponseError) and text.startswith("SHMSTORE "):
            return _shmstore_error(json.loads(text[len("SHMSTORE "):]))
        if isinstance(exc, errors.ResponseError) and text.startswith(("LOADING", "READONLY",
                                                                      "MASTERDOWN")):
            return StoreUnavailable(f"Redis at {address} cannot serve writes now: {text}",
                                    address=address)
        if isinstance(exc, (errors.RedisError, OSError)):
            return ShmstoreError(f"Redis at {address} failed: {text}")
        return exc

    def _memory_figures(self) -> tuple[int, int]:
        """Redis' ``maxmemory`` and ``used_memory`` for a refusal's message (0, 0 here:
        a runner that can read them on the spot says so)."""
        return 0, 0

    def _maxmemory_full(self) -> StoreFull:
        maximum, current = self._memory_figures()
        return StoreFull(
            f"Redis at {self.address} is at its maxmemory ({maximum} bytes, {current} used) "
            "and refuses writes; delete or clear executions, set shmstore limits below it, "
            "or raise Redis' maxmemory",
            limit="maxmemory", maximum=maximum, current=current, requested=0,
        )

    def _key(self, execution_id: str, suffix: str) -> bytes:
        return self._prefix + b"{" + _b(execution_tag(execution_id)) + b"}:" + _b(suffix)

    def _evalsha(self, name: str, args: Sequence[Any]) -> tuple[Any, ...]:
        """The command that runs script ``name`` (its source: `SCRIPT_SOURCES`)."""
        return ("EVALSHA", _SHAS[name], 0, self._prefix, *args)

    # -- table operations, as steps ----------------------------------------------------

    def _g_save(self, record: Record, expected_version: int | None = None) -> Steps[int]:
        expected = b"" if expected_version is None else b"%d" % expected_version
        try:
            return int((yield _RUN, "save", expected, *_record_args(record)))
        except _redis.exceptions.ResponseError as exc:
            error = self._translate(exc)
            if isinstance(error, VersionConflict):
                raise rules.version_conflict(record.execution_id, expected_version,
                                             error.actual) from None
            raise error from None

    def _g_store(self, op: str, records: Sequence[Record], only_new: bool) -> Steps[list[int]]:
        records = list(records)
        args: list[Any] = []
        for record in records:
            args.extend(_record_args(record))
        return [int(v) for v in (yield _RUN, "store", op, b"1" if only_new else b"0",
                                          len(records), *args)]

    def _g_save_many(self, records: Sequence[Record]) -> Steps[builtins.list[int]]:
        return (yield from self._g_store("save_many", records, False))

    def _g_save_new(self, records: Sequence[Record]) -> Steps[builtins.list[int]]:
        return (yield from self._g_store("save_new", records, True))

    def _g_scan(self, op: str, executions: Sequence[str], prefix: bool, *,
              node_name: str | None = None, checkpoint_id: str | None = None,
              before_id: str | None = None, children: str | None = None,
              limit: int | None = None,
              by_id: bool = False) -> Steps[list[tuple[str, list[Record], list[Record]]]]:
        """Per execution in scope (in id order): its records that pass the filters, newest
        first, and its ``children`` records, oldest first (one script call)."""
        if not executions:
            (yield _RUN, "scan", op, b"0", b"", b"0", b"", b"", b"", b"0", 0, b"0")  # counts the op
            return []
        answer = (yield _RUN,
            "scan", op, b"1" if prefix else b"0",
            b"" if node_name is None else _b(node_name), b"0" if node_name is None else b"1",
            b"" if checkpoint_id is None else _b(checkpoint_id),
            b"" if before_id is None else _b(before_id),
            b"" if children is None else _b(children), b"0" if children is None else b"1",
            -1 if limit is None else limit, b"1" if by_id else b"0",
            *[_b(name) for name in executions])
        return [(_s(name), [_record(r) for r in found], [_record(r) for r in kids])
                for name, found, kids in answer]

    def _g_find(self, executions: Sequence[str], prefix: bool = False,
             node_name: str | None = None, where: EncodedWhere | None = None,
             before_id: str | None = None, limit: int | None = None,
             checkpoint_id: str | None = None, children: str | None = None,
             by_id: bool = False) -> Steps[builtins.list[Found]]:
        # Metadata is filtered here, with Python's equality (1 == 1.0, a tuple is not a
        # list), exactly as the table does; Redis applies every other filter.
        filters = decode_where(where)
        scanned = (yield from self._g_scan("find", executions, prefix, node_name=node_name,
                             checkpoint_id=checkpoint_id, before_id=before_id,
                             children=children, by_id=by_id,
                             limit=limit if filters is None else (0 if limit == 0 else None)))
        out: builtins.list[Found] = []
        for _name, found, kids in scanned:
            matched = rules.first_matches(found, None, filters, None,
                                          None if limit is None else limit - len(out))
            out.extend(with_children(matched, kids))
            if limit is not None and len(out) >= limit:
                break
        return out

    def _g_purge(self, executions: Sequence[str], prefix: bool = False,
              node_name: str | None = None, where: EncodedWhere | None = None,
              keep: int = 0, children: str | None = None) -> Steps[int]:
        # Read the scope, decide as the table does, then drop in one script the records
        # that are still there at the same version (a record saved in between survives).
        filters = decode_where(where)
        doomed: builtins.list[Record] = []
        for _name, newest_first, _kids in (yield from self._g_scan("purge", executions, prefix)):
            doomed += purge_plan(newest_first[::-1], node_name, filters, keep, children)
        if not doomed:
            return 0
        args: builtins.list[bytes] = []
        for record in doomed:
            args += [_b(record.id), b"%d" % record.version]
        return int((yield _RUN, "drop", *args))

    def _g_copy(self, source: str, target: str, prefix: bool = False) -> Steps[int]:
        if source == target:
            raise rules.copy_onto_itself(source)
        plan = [(record, rules.renamed(name, source, target))
                for name, newest_first, _ in (yield from self._g_scan("copy", [source], prefix))
                for record in newest_first[::-1]]
        copies = rules.copy_records(plan, source, target)
        if copies:
            yield from self._g_store("", copies, False)
        return len(copies)

    def _g_load(self, checkpoint_id: str) -> Steps[Record]:
        raw = (yield _RUN, "load", _b(checkpoint_id))
        if raw is None:
            raise not_found(checkpoint_id)
        return _record(raw)

    def _g_load_many(self, checkpoint_ids: Sequence[str]) -> Steps[builtins.list[Record]]:
        ok, value = (yield _RUN, "load_many", *[_b(cid) for cid in checkpoint_ids])
        if not ok:
            raise not_found(_s(value))
        return [_record(raw) for raw in value]

    def _g_list(self, execution_id: str, limit: int | None = None,
             before_version: int | None = None, newest_first: bool = False,
             after_version: int | None = None) -> Steps[builtins.list[Record]]:
        raws = (yield _RUN, "list", _b(execution_id), -1 if limit is None else limit,
                         b"" if before_version is None else b"%d" % before_version,
                         b"1" if newest_first else b"0",
                         b"" if after_version is None else b"%d" % after_version)
        return [_record(raw) for raw in raws]

    def _g_latest(self, execution_id: str) -> Steps[Record | None]:
        raw = (yield _RUN, "latest", _b(execution_id))
        return None if raw is None else _record(raw)

    def _g_delete(self, checkpoint_id: str) -> Steps[bool]:
        return bool((yield _RUN, "delete", _b(checkpoint_id)))

    def _g_clear(self, execution_id: str) -> Steps[int]:
        return int((yield _RUN, "clear", _b(execution_id)))

    def _g_executions(self) -> Steps[builtins.list[str]]:
        names = yield _RUN, "executions"
        return sorted(_s(name) for name in names)

    def _g_wait(self, execution_id: str, after_version: int = 0,
             timeout: float | None = None,
             generation: int = 0) -> Steps[tuple[Record | None, int]]:
        deadline = None if timeout is None else time.monotonic() + timeout
        count = b"1"
        name = _b(execution_id)
        wakeups: Any = None  # (the runner closes its subscriptions when the op ends)
        while True:
            ms = 60_000 if deadline is None else int((deadline - time.monotonic()) * 1000)
            found, value, generation = (yield _RUN, "wait", name, after_version, count,
                                                 max(ms, 0) + WAKE_GRACE_MS, generation)
            generation = int(generation)
            count = b"0"
            if found:
                return (_record(value), generation)
            if ms < 1:
                return (None, generation)
            if wakeups is None:
                # Subscribe, then look again: a save between the two is not missed.
                wakeups = yield _SUBSCRIBE, execution_id
                continue
            yield _SLEEP, wakeups, ms / 1000

    def _g_claim(self, execution_id: str, node_name: str, owner: str, lease_s: float,
              timeout: float = 0.0) -> Steps[ClaimAnswer]:
        deadline = time.monotonic() + timeout
        lease_ms = max(1, math.ceil(lease_s * 1000))
        count = b"1"
        args = (_b(execution_id), _b(node_name), _b(owner), lease_ms)
        wakeups: Any = None  # (the runner closes its subscriptions when the op ends)
        while True:
            ms = int((deadline - time.monotonic()) * 1000)
            answer = (yield _RUN, "claim", *args, count)
            count = b"0"
            kind = _s(answer[0])
            if kind == DONE:
                return (DONE, _record(answer[1]))
            if kind == GRANTED:
                return (GRANTED, _s(answer[1]))
            if kind == HELD:
                return (HELD, _s(answer[1]))
            holder, pttl = _s(answer[1]), int(answer[2])  # the script's only other: busy
            if ms < 1:
                return (BUSY, holder)
            if wakeups is None:
                wakeups = yield _SUBSCRIBE, execution_id  # then look again
                continue
            # Timed to the lease's expiry: a dead owner's lease passes on then.
            yield _SLEEP, wakeups, max(1, min(ms, pttl)) / 1000

    def _g_renew(self, execution_id: str, node_name: str, token: str,
                 lease_s: float) -> Steps[bool]:
        return bool((yield _RUN, "renew", _b(execution_id), _b(node_name), _b(token),
                              max(1, math.ceil(lease_s * 1000))))

    def _g_release(self, execution_id: str, node_name: str, token: str) -> Steps[bool]:
        return bool((yield _RUN, "release", _b(execution_id), _b(node_name), _b(token)))

    def _g_complete(self, record: Record, token: str) -> Steps[CompleteAnswer]:
        kind, value = (yield _RUN, "complete", _b(token), *_record_args(record))
        if kind == b"done":
            return (DONE, _record(value))
        return (SAVED, int(value))

    def _g_limits(self) -> Steps[LimitsDict]:
        return (yield from self._g_read_limits()).to_dict()

    def _g_read_limits(self) -> Steps[Limits]:
        stored = yield _HGETALL, self._prefix + b"limits"
        if not stored:
            return Limits()
        values: dict[str, Any] = dict.fromkeys(LIMIT_FIELDS)
        for key, value in stored.items():
            name = _s(key)
            values[name] = _s(value) if name == "on_full" else int(value)
        return Limits.from_dict(values)

    def _g_stats(self) -> Steps[StatsDict]:
        (checkpoints, executions, payload, ops_flat, stats_flat, largest_flat,
         info_server, info_memory) = (yield _RUN, "stats")
        ops = dict.fromkeys(TABLE_OPS, 0)
        for i in range(0, len(ops_flat), 2):
            ops[_s(ops_flat[i])] = int(ops_flat[i + 1])
        counters = {_s(stats_flat[i]): int(stats_flat[i + 1])
                    for i in range(0, len(stats_flat), 2)}
        rss = _info_field(info_memory, "used_memory_rss")
        return {
            "checkpoints": int(checkpoints),
            "executions": int(executions),
            "payload_bytes": int(payload),
            "ops": ops,
            "largest_executions": [
                (_s(largest_flat[i]), int(largest_flat[i + 1]), int(largest_flat[i + 2]))
                for i in range(0, len(largest_flat), 3)],
            "evictions": counters.get("evictions", 0),
            "rejections": counters.get("rejections", 0),
            "pruned": counters.get("pruned", 0),
            "limits": (yield from self._g_read_limits()).to_dict(),
            "server_pid": _info_field(info_server, "process_id"),
            "server_rss": rss,
            # Redis reports no RSS high-water mark; its allocator's peak is the nearest.
            "server_peak_rss": max(rss, _info_field(info_memory, "used_memory_peak")),
            "uptime_s": float(_info_field(info_server, "uptime_in_seconds")),
            "clients": [],
        }

    def _g_memory_history(self, since: float | None = None) -> Steps[builtins.list[Sample]]:
        """Redis keeps no history: the present as one sample (a poller builds the series)."""
        stats = (yield from self._g_stats())
        now = time.time()
        if since is not None and now <= since:
            return []
        return [{"t": now, "server_rss": stats["server_rss"], "server_uss": None,
                 "checkpoints": stats["checkpoints"], "payload_bytes": stats["payload_bytes"],
                 "segment_bytes": 0, "clients": {},
                 "executions": [list(e) for e in stats["largest_executions"]]}]



class RedisBackend(RedisOps):
    """`RedisStore`'s `Backend`: each operation one or a few scripts (see the module doc),
    its `RedisOps` steps run with redis-py's blocking client.

    It holds no reference to its store (the store owns it; a cycle would keep a dropped
    store's sockets open until the cyclic collector ran).
    """

    def __init__(self, client: Any, prefix: bytes, timeout: float, address: str, *,
                 owns_client: bool) -> None:
        super().__init__(prefix, timeout, address)
        self._client = client
        self._owns_client = owns_client
        self._closed = False
        # The subscriptions waits sleep on now: close() wakes them.
        self._sleeping: set[_WakeUps] = set()
        self._sleeping_lock = threading.Lock()

    def _memory_figures(self) -> tuple[int, int]:
        try:
            info = self._client.info("memory")
            return int(info["maxmemory"]), int(info["used_memory"])
        except Exception:  # the figures are a courtesy; the error stands
            return 0, 0

    def _drive(self, steps: Steps[_R]) -> _R:
        """Run an operation's steps with blocking calls; its answer."""
        subscribed: builtins.list[_WakeUps] = []
        value: Any = None
        error: BaseException | None = None
        try:
            while True:
                try:
                    step = steps.send(value) if error is None else steps.throw(error)
                except StopIteration as done:
                    result: _R = done.value
                    return result
                value, error = None, None
                try:
                    value = self._do(step, subscribed)
                except Exception as exc:
                    error = exc
        finally:
            for wakeups in subscribed:
                self._unsubscribe(wakeups)

    def _do(self, step: tuple[Any, ...], subscribed: builtins.list[_WakeUps]) -> Any:
        kind = step[0]
        if kind == _RUN:
            return self._run(*step[1:])
        if kind == _HGETALL:
            return self._client.hgetall(step[1])
        if kind == _SUBSCRIBE:
            wakeups = self._subscribe(step[1])
            subscribed.append(wakeups)
            return wakeups
        step[1].sleep(step[2])
        return None

    def _run(self, name: str, *args: Any) -> Any:
        """Run one script (EVALSHA; loaded when Redis does not know it yet)."""
        client = self._client
        try:
            return client.execute_command(*self._evalsha(name, args))
        except _redis.exceptions.NoScriptError:
            client.script_load(SCRIPT_SOURCES[name])
        return client.execute_command(*self._evalsha(name, args))

    def _subscribe(self, execution_id: str) -> _WakeUps:
        """Listen to the execution's wake-up channel; subscribed when this returns.
        Close it with `_unsubscribe`."""
        wakeups = _WakeUps(self._client, self._key(execution_id, "w"), self.timeout)
        with self._sleeping_lock:
            self._sleeping.add(wakeups)
            closed = self._closed
        if closed:  # closed meanwhile: its close() did not see this one
            wakeups.interrupt()
        return wakeups

    def _unsubscribe(self, wakeups: _WakeUps) -> None:
        with self._sleeping_lock:
            self._sleeping.discard(wakeups)
        wakeups.close()

    # -- table operations ---------------------------------------------------------------

    def save(self, record: Record, expected_version: int | None = None) -> int:
        return self._drive(self._g_save(record, expected_version))

    def save_many(self, records: Sequence[Record]) -> builtins.list[int]:
        return self._drive(self._g_save_many(records))

    def save_new(self, records: Sequence[Record]) -> builtins.list[int]:
        return self._drive(self._g_save_new(records))

    def find(self, executions: Sequence[str], prefix: bool = False,
             node_name: str | None = None, where: EncodedWhere | None = None,
             before_id: str | None = None, limit: int | None = None,
             checkpoint_id: str | None = None, children: str | None = None,
             by_id: bool = False) -> builtins.list[Found]:
        return self._drive(self._g_find(executions, prefix, node_name, where, before_id,
                                        limit, checkpoint_id, children, by_id))

    def purge(self, executions: Sequence[str], prefix: bool = False,
              node_name: str | None = None, where: EncodedWhere | None = None,
              keep: int = 0, children: str | None = None) -> int:
        return self._drive(self._g_purge(executions, prefix, node_name, where, keep, children))

    def copy(self, source: str, target: str, prefix: bool = False) -> int:
        return self._drive(self._g_copy(source, target, prefix))

    def load(self, checkpoint_id: str) -> Record:
        return self._drive(self._g_load(checkpoint_id))

    def load_many(self, checkpoint_ids: Sequence[str]) -> builtins.list[Record]:
        return self._drive(self._g_load_many(checkpoint_ids))

    def list(self, execution_id: str, limit: int | None = None,
             before_version: int | None = None, newest_first: bool = False,
             after_version: int | None = None) -> builtins.list[Record]:
        return self._drive(self._g_list(execution_id, limit, before_version, newest_first,
                                        after_version))

    def latest(self, execution_id: str) -> Record | None:
        return self._drive(self._g_latest(execution_id))

    def delete(self, checkpoint_id: str) -> bool:
        return self._drive(self._g_delete(checkpoint_id))

    def clear(self, execution_id: str) -> int:
        return self._drive(self._g_clear(execution_id))

    def executions(self) -> builtins.list[str]:
        return self._drive(self._g_executions())

    def wait(self, execution_id: str, after_version: int = 0,
             timeout: float | None = None,
             generation: int = 0) -> tuple[Record | None, int]:
        return self._drive(self._g_wait(execution_id, after_version, timeout, generation))

    def claim(self, execution_id: str, node_name: str, owner: str, lease_s: float,
              timeout: float = 0.0) -> ClaimAnswer:
        return self._drive(self._g_claim(execution_id, node_name, owner, lease_s, timeout))

    def renew(self, execution_id: str, node_name: str, token: str, lease_s: float) -> bool:
        return self._drive(self._g_renew(execution_id, node_name, token, lease_s))

    def release(self, execution_id: str, node_name: str, token: str) -> bool:
        return self._drive(self._g_release(execution_id, node_name, token))

    def complete(self, record: Record, token: str) -> CompleteAnswer:
        return self._drive(self._g_complete(record, token))

    def limits(self) -> LimitsDict:
        return self._drive(self._g_limits())

    def stats(self) -> StatsDict:
        return self._drive(self._g_stats())

    def memory_history(self, since: float | None = None) -> builtins.list[Sample]:
        return self._drive(self._g_memory_history(since))

    def _write_limits(self, limits: Limits) -> None:
        fields: dict[bytes, bytes] = {b"on_full": _b(limits.on_full)}
        for name in LIMIT_FIELDS:
            value = getattr(limits, name)
            if value is not None:
                fields[_b(name)] = b"%d" % value
        key = self._prefix + b"limits"
        try:
            with self._client.pipeline(transaction=True) as pipe:
                pipe.delete(key)
                pipe.hset(key, mapping=fields)
                pipe.execute()
        except Exception as exc:
            raise self._translate(exc) from None

    def register_client(self, pid: int, name: str = "", role: str = ROLE_WORKER,
                        leaving: bool = False) -> None:
        """Nothing to do: Redis keeps no registry of client processes."""

    # -- life cycle -----------------------------------------------------------------------

    def flush(self) -> int:
        """Drop every key of this prefix; return how many (`RedisStore.flush`)."""
        if self._closed:
            raise StoreUnavailable(f"this RedisStore was closed ({self.address})",
                                   address=self.address)
        dropped = 0
        try:
            pattern = re.sub(rb"([*?\[\]\\])", rb"\\\1", self._prefix) + b"*"
            batch: builtins.list[bytes] = []
            for key in self._client.scan_iter(match=pattern, count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    dropped += int(self._client.delete(*batch))
                    batch = []
            if batch:
                dropped += int(self._client.delete(*batch))
        except Exception as exc:
            raise self._translate(exc) from None
        return dropped

    def close(self) -> None:
        """Close the store's connections (`RedisStore.close`)."""
        with self._sleeping_lock:
            if self._closed:
                return
            self._closed = True
            sleeping = builtins.list(self._sleeping)
        for wakeups in sleeping:  # a wait blocked in another thread returns now
            wakeups.interrupt()
        self._disconnect_idle()

    def _disconnect_idle(self) -> None:
        if self._owns_client:
            try:
                self._client.connection_pool.disconnect(inuse_connections=False)
            except Exception:  # closing a dead connection is not an error
                pass


class _WakeUps:
    """A subscription to one execution's wake-up channel, on a connection of its own.

    The subscription is confirmed before the constructor returns, so a caller that
    subscribes and then looks at the data misses no wake-up published after its look.
    """

    def __init__(self, client: Any, channel: bytes, timeout: float) -> None:
        self._pubsub = client.pubsub()
        try:
            self._pubsub.subscribe(channel)
            deadline = time.monotonic() + timeout
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _redis.exceptions.TimeoutError("no confirmation of SUBSCRIBE")
                message = self._pubsub.get_message(timeout=remaining)
                if message is not None and message["type"] == "subscribe":
                    return
        except BaseException:
            self.close()
            raise

    def sleep(self, seconds: float) -> None:
        """Return at the next wake-up, or after ``seconds``."""
        end = time.monotonic() + seconds
        while True:
            remaining = end - time.monotonic()
            if remaining <= 0:
                return
            message = self._pubsub.get_message(timeout=remaining)
            if message is not None and message["type"] == "message":
                return

    def interrupt(self) -> None:
        """Wake a `sleep` in another thread: shut its connection's socket down (its read
        fails, so the wait raises and its store, closed, ends it)."""
        connection = self._pubsub.connection
        sock = None if connection is None else getattr(connection, "_sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # already closed
                pass

    def close(self) -> None:
        """Drop the subscription and its connection."""
        self._pubsub.close()


# Every operation goes through the one call path; written once here, not per method.
for _op in BACKEND_OPS:
    setattr(RedisBackend, _op, _guarded(getattr(RedisBackend, _op)))
del _op

_REDIS: Final[type[Backend]] = RedisBackend  # mypy checks that it is a complete Backend


def _shmstore_error(fields: dict[str, Any]) -> ShmstoreError:
    """Rebuild the error a script refused with (the same messages as `CheckpointTable`)."""
    kind = fields.get("k")
    if kind == "conflict":
        return VersionConflict("version conflict", execution_id="", expected=None,
                               actual=int(fields["actual"]))
    if kind == "full":
        value = fields.get("value")
        return rules.store_full(
            str(fields["limit"]), int(fields["maximum"]), int(fields["current"]),
            int(fields["requested"]), checkpoint_id=fields.get("id"),
            value=None if value is None else int(value), alone=bool(fields.get("alone")))
    return ShmstoreError(f"Redis script failed: {fields!r}")


def _rebuild(url: str, prefix: str, timeout: float) -> RedisStore:
    return RedisStore(url, prefix=prefix, timeout=timeout)


def _rebuild_from_kwargs(module: str, qualname: str, kwargs: dict[str, Any], prefix: str,
                         timeout: float) -> RedisStore:
    import importlib

    cls = getattr(importlib.import_module(module), qualname)
    if not (isinstance(cls, type) and issubclass(cls, _redis.connection.AbstractConnection)):
        raise ConfigError(f"not a redis-py connection class: {module}.{qualname}",
                          value=qualname)
    pool = _redis.ConnectionPool(connection_class=cls, **kwargs)
    store = RedisStore(_redis.Redis(connection_pool=pool), prefix=prefix, timeout=timeout)
    store._backend._owns_client = True  # made here, for this copy: its close() closes it
    return store

