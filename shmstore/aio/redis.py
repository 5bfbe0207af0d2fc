"""`AsyncRedisStore`: the contract on Redis, as coroutines, over ``redis.asyncio``.

The operations are `backends.redis.RedisOps`' steps, the very ones `RedisStore` runs:
the same Lua scripts, key layout, arguments and answers.  Only the runner differs: each
step is awaited on redis-py's asyncio client (EVALSHA, a hash read, a subscription to an
execution's wake-up channel and a sleep on it), so a wait does not block the event loop
and many tasks share one connection pool.

Example:
    >>> async with await shmstore.aio.connect("redis://127.0.0.1:6379/0") as store:
    ...     (await store.save(Checkpoint(execution_id="run", state=1))).version
    1
"""

from __future__ import annotations

import asyncio
import builtins
import socket
from typing import Any

from ..backends.redis import (
    _HGETALL,
    _RUN,
    _SUBSCRIBE,
    DEFAULT_PREFIX,
    DEFAULT_TIMEOUT,
    SCRIPT_SOURCES,
    RedisOps,
    Steps,
    _b,
    _redact,
    check_prefix,
    open_client,
)
from ..core.codec import MsgpackCodec
from ..core.errors import ShmstoreError, StoreUnavailable
from ..core.validate import duration
from .store import AsyncStore

__all__ = ["AsyncRedisStore"]


class _Subscription:
    """One execution's wake-up channel on a connection of its own (``redis.asyncio``'s
    pubsub); subscribed (confirmed) when `open` returns."""

    def __init__(self, client: Any, channel: bytes) -> None:
        self._pubsub = client.pubsub()
        self._channel = channel

    async def open(self, timeout: float) -> _Subscription:
        try:
            await self._pubsub.subscribe(self._channel)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise TimeoutError("no confirmation of SUBSCRIBE")
                message = await self._pubsub.get_message(timeout=remaining)
                if message is not None and message["type"] == "subscribe":
                    return self
        except BaseException:
            await self.close()
            raise

    async def sleep(self, seconds: float) -> None:
        """Return at the next wake-up, or after ``seconds``."""
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while True:
            remaining = end - loop.time()
            if remaining <= 0:
                return
            message = await self._pubsub.get_message(timeout=remaining)
            if message is not None and message["type"] == "message":
                return

    def interrupt(self) -> None:
        """Wake a `sleep`: shut its connection's socket down (its read fails)."""
        connection = self._pubsub.connection
        writer = None if connection is None else getattr(connection, "_writer", None)
        sock = None if writer is None else writer.get_extra_info("socket")
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # already closed
                pass

    async def close(self) -> None:
        try:
            await self._pubsub.aclose()
        except Exception:  # closing a dead subscription is not an error
            pass


class AsyncRedisBackend(RedisOps):
    """An `AsyncBackend` on Redis: `RedisOps`' steps awaited on a ``redis.asyncio`` client."""

    def __init__(self, client: Any, prefix: bytes, timeout: float, address: str) -> None:
        super().__init__(prefix, timeout, address)
        import redis.exceptions

        self._no_script = redis.exceptions.NoScriptError
        self._client = client
        self.closed = False
        self._sleeping: set[_Subscription] = set()
        self._drained: asyncio.Event | None = None  # set when the last one closed

    async def call(self, op: str, *args: Any) -> Any:
        """Run ``op``: refused once closed, redis-py's errors in the exception tree."""
        if self.closed:
            raise StoreUnavailable(f"this AsyncRedisStore was closed ({self.address})",
                                   address=self.address)
        if op == "register_client":
            return None  # Redis keeps no registry of client processes
        try:
            return await self._drive(getattr(self, "_g_" + op)(*args))
        except ShmstoreError:
            raise
        except Exception as exc:
            if self.closed:
                raise StoreUnavailable(f"this AsyncRedisStore was closed while its {op!r} "
                                       f"call ran ({self.address})",
                                       address=self.address) from None
            raise self._translate(exc) from None

    async def _drive(self, steps: Steps[Any]) -> Any:
        """`RedisBackend._drive`, awaited: each step's result sent back, its error thrown
        in; the subscriptions it opened are closed when it ends."""
        subscribed: builtins.list[_Subscription] = []
        value: Any = None
        error: BaseException | None = None
        try:
            while True:
                try:
                    step = steps.send(value) if error is None else steps.throw(error)
                except StopIteration as done:
                    return done.value
                value, error = None, None
                try:
                    value = await self._do(step, subscribed)
                except Exception as exc:
                    error = exc
        finally:
            for sub in subscribed:
                await sub.close()
                self._sleeping.discard(sub)
            if self.closed and not self._sleeping and self._drained is not None:
                self._drained.set()

    async def _do(self, step: tuple[Any, ...], subscribed: builtins.list[_Subscription]
                  ) -> Any:
        kind = step[0]
        client = self._client
        if kind == _RUN:
            command = self._evalsha(step[1], step[2:])
            try:
                return await client.execute_command(*command)
            except self._no_script:  # Redis restarted, or flushed its scripts
                pass
            await client.script_load(SCRIPT_SOURCES[step[1]])
            return await client.execute_command(*command)
        if kind == _HGETALL:
            return await client.hgetall(step[1])
        if kind == _SUBSCRIBE:
            # Counted before it connects: a close meanwhile waits for it to be closed.
            sub = _Subscription(client, self._key(step[1], "w"))
            subscribed.append(sub)
            self._sleeping.add(sub)
            await sub.open(self.timeout)
            if self.closed:  # closed while it subscribed: no sleep on it
                raise StoreUnavailable(f"this AsyncRedisStore was closed ({self.address})",
                                       address=self.address)
            return sub
        await step[1].sleep(step[2])
        return None

    async def aclose(self) -> None:
        self.closed = True
        if self._sleeping:
            # A wait under way returns now; its subscription's connection is closed by
            # that wait before the pool is (else it outlives the pool, unclosed).
            self._drained = asyncio.Event()
            for sub in builtins.list(self._sleeping):
                sub.interrupt()
            try:
                await asyncio.wait_for(self._drained.wait(), self.timeout)
            except (TimeoutError, asyncio.TimeoutError):
                pass
        try:
            await self._client.aclose()
        except Exception:  # closing a dead connection is not an error
            pass


class AsyncRedisStore(AsyncStore):
    """`RedisStore` as coroutines (``redis.asyncio``; extra ``[redis]``).

    Parameters:
        url: ``redis://[[user]:password@]host:port/db``, ``rediss://...``,
            ``redis+unix:///path?db=0`` (without a password, ``SHMSTORE_REDIS_PASSWORD``).
        prefix: every key starts with it (no braces); the same data set as a
            `RedisStore` of that prefix.
        timeout: seconds any call may take before `StoreTimeout` (waits add their own).
        codec: encodes states and metadata.

    Limits are the data set's (``RedisStore(limits=...)`` writes them); this store
    uses what is there.

    Raises:
        ConfigError: a bad URL, prefix or timeout; redis-py is not installed.
    """

    def __init__(self, url: str, *, prefix: str = DEFAULT_PREFIX,
                 timeout: float = DEFAULT_TIMEOUT, codec: MsgpackCodec | None = None) -> None:
        super().__init__(codec=codec)
        self.prefix = check_prefix(prefix)
        self.timeout = duration(timeout, "timeout")
        import redis.asyncio
        from redis.asyncio.retry import Retry

        self.url = url
        self.address = _redact(url)
        client = open_client(redis.asyncio.Redis, Retry, url, self.timeout)
        self._backend: AsyncRedisBackend = AsyncRedisBackend(
            client, _b(prefix), self.timeout, self.address)

    def __repr__(self) -> str:
        return f"<AsyncRedisStore {self.address} prefix={self.prefix!r}>"

    def _is_closed(self) -> bool:
        return self._backend.closed

    async def aclose(self) -> None:
        """Close the store's connections; a wait under way returns (``follow`` ends);
        later calls raise `StoreUnavailable`; closing twice is fine."""
        if not self._backend.closed:
            await self._backend.aclose()
