"""`connect()`: an `AsyncStore` for a URL, as `shmstore.connect` gives a sync store."""

from __future__ import annotations

from typing import Any

from ..core.config import DEFAULT_TIMEOUT, is_redis_url, parse_url
from ..core.factory import _authkey_from_environment, _url_from_environment
from .store import AsyncStore

__all__ = ["MEMORY_URL", "connect"]

#: The URL of a new in-process store (`AsyncMemoryStore`).
MEMORY_URL = "memory://"


async def connect(
    url: str | None = None,
    *,
    authkey: bytes | str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    name: str | None = None,
    data_plane: bool = True,
    data_plane_threshold: int | None = None,
    copy_on_load: bool = False,
    max_connections: int | None = None,
) -> AsyncStore:
    """An async store for a shmstore server, Redis, or this process (``memory://``).

    The URL and key come from the arguments or the environment exactly as for
    `shmstore.connect`; ``memory://`` gives a new `AsyncMemoryStore`.  Connections open
    on the first call, in the running event loop; use the store from that loop.

    Parameters:
        url, authkey, timeout, name, data_plane, data_plane_threshold, copy_on_load: as
            for `shmstore.connect`.
        max_connections: the most connections open at once (default 16; a shmstore
            server or Redis); tasks beyond wait for one.

    Raises:
        ConfigError: no URL or authkey could be found, or one is malformed.

    Example:
        >>> async with await shmstore.aio.connect("unix:///tmp/s.sock", authkey=key) as store:
        ...     print(await store.latest("run-1"))
    """
    if url is None:
        url, authkey = _url_from_environment(authkey)
    if url == MEMORY_URL:
        from .memory import AsyncMemoryStore

        return AsyncMemoryStore()
    pool: dict[str, Any] = {} if max_connections is None else {
        "max_connections": max_connections}
    if is_redis_url(url):
        from .redis import AsyncRedisStore

        return AsyncRedisStore(url, timeout=timeout)
    parse_url(url)
    if authkey is None:
        authkey = _authkey_from_environment(url)
    from .shared import AsyncSharedStore

    plane: dict[str, Any] = {"data_plane": data_plane, "copy_on_load": copy_on_load}
    if data_plane_threshold is not None:
        plane["data_plane_threshold"] = data_plane_threshold
    return AsyncSharedStore(url, authkey=authkey, timeout=timeout, name=name, **plane, **pool)
