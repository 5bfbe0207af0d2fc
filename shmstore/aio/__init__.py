"""``shmstore.aio``: the store contract as coroutines, for asyncio code.

``store = await shmstore.aio.connect(url)`` gives an `AsyncStore` for a shmstore server
(unix or TCP, the same wire, the data plane on a unix socket), Redis (``redis://``) or
this process (``memory://``); every method of the sync store is a coroutine of the same
name, with the same arguments, errors and timeouts.
"""

from __future__ import annotations

from .factory import MEMORY_URL, connect
from .memory import AsyncMemoryStore
from .redis import AsyncRedisStore
from .shared import AsyncSharedStore
from .store import AsyncStore

__all__ = ["MEMORY_URL", "AsyncMemoryStore", "AsyncRedisStore", "AsyncSharedStore",
           "AsyncStore", "connect"]
