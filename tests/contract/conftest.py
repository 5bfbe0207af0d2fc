"""``limited_store``: a factory of empty stores with given `Limits`, on every backend."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

import shmstore
from shmstore import BaseStore, Limits
from tests.conftest import BACKENDS, PLANE_EVERYTHING, SOCKET_ONLY, async_store

LimitedStore = Callable[..., BaseStore]


@pytest.fixture(params=BACKENDS)
def limited_store(request: pytest.FixtureRequest) -> Iterator[LimitedStore]:
    """Call it with `Limits` fields (``limited_store(max_checkpoints=3)``) to get a store."""
    opened: list[Any] = []

    def make(**fields: Any) -> BaseStore:
        limits = Limits(**fields)
        store: BaseStore
        if request.param == "aio-memory":
            store = async_store(request, limits=limits)
        elif request.param == "aio-redis":  # the limits are the data set's: a sync store
            opened.append(request.getfixturevalue("redis_limited_store")(limits))  # writes
            store = async_store(request, flush=False)
        elif request.param.startswith("aio-"):
            server = shmstore.serve(export=False, limits=limits)
            opened.append(server)
            store = async_store(request, server=server)
        elif request.param == "memory":
            store = shmstore.MemoryStore(limits=limits)
        elif request.param.startswith("shared"):
            server = shmstore.serve(export=False, limits=limits)
            opened.append(server)
            plane = PLANE_EVERYTHING if request.param == "shared-plane" else SOCKET_ONLY
            store = server.connect(timeout=10.0, **plane)
        else:
            factory = request.getfixturevalue(f"{request.param}_limited_store")
            store = factory(limits)
        opened.append(store)
        return store

    yield make
    for thing in reversed(opened):
        if isinstance(thing, shmstore.StoreServer):
            thing.shutdown()
        else:
            thing.close()
