"""`SyncOverAsync`: an `AsyncStore` behind `BaseStore`'s sync interface, so that the one
contract suite runs against the async stores too.

Each call runs the async store's coroutine on a background event loop thread (the store
was opened there, as an async store must be) in the caller's context (so a
``load_or_compute`` called again from inside its own compute, which the async store runs
on a worker thread, is still recognised as the same owner).  Nothing else is translated:
the answer, or the exception, is the async store's own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import inspect
import threading
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any

from shmstore.aio import AsyncStore
from shmstore.core.backend import BACKEND_OPS

_OWN = {"_loop", "_thread", "astore", "_backend"}


class _Raised:
    """A KeyboardInterrupt or SystemExit a coroutine raised, carried to the caller: asyncio
    would let it out of the event loop (stopping it), where the sync store raises it in
    the calling thread."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


async def _carried(coro: Coroutine[Any, Any, Any]) -> Any:
    try:
        return await coro
    except (KeyboardInterrupt, SystemExit) as exc:
        return _Raised(exc)


class _Loop:
    """An event loop running in a daemon thread of its own until `stop`."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._main, name="aio-adapter", daemon=True)
        self.thread.start()

    def _main(self) -> None:
        loop = self.loop
        try:
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()
        context = contextvars.copy_context()

        def start() -> None:
            task = self.loop.create_task(_carried(coro), context=context)

            def finish(task: asyncio.Task[Any]) -> None:
                if task.cancelled():
                    done.cancel()
                elif task.exception() is not None:
                    done.set_exception(task.exception())  # type: ignore[arg-type]
                else:
                    done.set_result(task.result())

            task.add_done_callback(finish)

        self.loop.call_soon_threadsafe(start)
        result = done.result()
        if isinstance(result, _Raised):
            raise result.error
        return result

    def stop(self) -> None:
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


async def _made(make: Callable[[], Any]) -> Any:
    return make()  # (an async generator is made inside the loop's thread)


class _SyncBackend:
    """The async store's backend as a sync `Backend` (tests that call ops directly)."""

    def __init__(self, adapter: SyncOverAsync) -> None:
        self._adapter = adapter

    def __getattr__(self, op: str) -> Callable[..., Any]:
        if op not in BACKEND_OPS:
            raise AttributeError(op)
        astore = self._adapter.astore
        return lambda *args: self._adapter._loop.run(astore._backend.call(op, *args))


class SyncOverAsync:
    """A sync store whose every method runs an `AsyncStore`'s coroutine of the same name.

    Parameters:
        open_store: makes the async store (called on the background loop).
    """

    def __init__(self, open_store: Callable[[], Awaitable[AsyncStore]]) -> None:
        loop = _Loop()
        object.__setattr__(self, "_loop", loop)

        async def opened() -> AsyncStore:
            return await open_store()

        object.__setattr__(self, "astore", loop.run(opened()))
        object.__setattr__(self, "_backend", _SyncBackend(self))
        weakref.finalize(self, loop.stop)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.astore, name)
        if inspect.iscoroutinefunction(value):
            return lambda *args, **kwargs: self._loop.run(value(*args, **kwargs))
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.astore, name, value)

    def __delattr__(self, name: str) -> None:
        delattr(self.astore, name)

    def __repr__(self) -> str:
        return f"<SyncOverAsync {self.astore!r}>"

    def follow(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        """`AsyncStore.follow`'s async iterator, stepped on the loop: a sync iterator.
        (Its arguments are checked at the call, as the sync store checks them.)"""
        agen = self._loop.run(_made(lambda: self.astore.follow(*args, **kwargs)))

        def items() -> Iterator[Any]:
            while True:
                try:
                    yield self._loop.run(agen.__anext__())
                except StopAsyncIteration:
                    return

        return items()

    def close(self) -> None:
        """Close the async store; its loop runs on (later calls must fail as the async
        store fails them) until the adapter is collected."""
        self._loop.run(self.astore.aclose())

    def __enter__(self) -> SyncOverAsync:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
