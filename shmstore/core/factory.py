"""`connect()`: the one factory for every backend, configured from arguments or the environment.

It sits in `core`, below the backends it builds, so that no backend needs to import it
and ``from shmstore import connect`` costs only the configuration.  The backend modules
are imported when `connect` is called, never at import: that is the one import in the
package that goes upward (core -> backends), and it happens at call time only.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from .backend import ROLE_WORKER
from .config import (
    DEFAULT_TIMEOUT,
    ENV_AUTHKEY,
    ENV_CONNECTION_FILE,
    ENV_URL,
    is_redis_url,
    parse_url,
    read_connection_file,
)
from .errors import ConfigError

if TYPE_CHECKING:
    from ..backends.redis import RedisStore
    from ..backends.shared import SharedStore

__all__ = ["connect"]


def connect(
    url: str | None = None,
    *,
    authkey: bytes | str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    name: str | None = None,
    role: str = ROLE_WORKER,
    data_plane: bool = True,
    data_plane_threshold: int | None = None,
    copy_on_load: bool = False,
) -> SharedStore | RedisStore:
    """Connect to a shmstore server, or to Redis (``redis://``, ``rediss://``, ``redis+unix://``).

    With no ``url``, it comes from ``SHMSTORE_URL`` (and the key from ``SHMSTORE_AUTHKEY``)
    as exported by `serve`, or from the connection file named by
    ``SHMSTORE_CONNECTION_FILE``.  No connection is opened until the first call.

    Parameters:
        url: ``unix:///path`` or ``tcp://host:port``; a Redis URL gives a `RedisStore`
            (same contract; ``authkey``, ``name`` and ``role`` do not apply).
        authkey: bytes or hex; default from the environment.
        timeout: seconds any call may take before `StoreTimeout`.
        name: a name for this client, shown by the server.
        role: what this process is to the server's monitor: ``worker`` (the default),
            ``cli``/``monitor`` (the store's tools, hidden in views), or your own.
        data_plane: on a unix socket, large states travel as sealed shared memory and
            loads map them (`SharedStore`); False: bytes on the socket.
        data_plane_threshold: the smallest encoded state that travels as shared memory
            (default 256 KiB).
        copy_on_load: loads give data-plane numpy arrays as writable private copies
            instead of read-only shared views.

    Raises:
        ConfigError: no URL or authkey could be found, or one is malformed.
        StoreUnavailable: the connection file names a server process that is not running.

    Example:
        >>> store = shmstore.connect()          # inside a process started under serve()
        >>> store.latest("run-1")
    """
    if url is None:
        url, authkey = _url_from_environment(authkey)
    if is_redis_url(url):
        from ..backends.redis import RedisStore  # upward, at call time (see the module doc)

        return RedisStore(url, timeout=timeout)
    parse_url(url)  # a malformed URL is the first thing to fix, before any missing key
    if authkey is None:
        authkey = _authkey_from_environment(url)
    from ..backends.shared import SharedStore  # upward, at call time (see the module doc)

    plane: dict[str, Any] = {"data_plane": data_plane, "copy_on_load": copy_on_load}
    if data_plane_threshold is not None:
        plane["data_plane_threshold"] = data_plane_threshold
    return SharedStore(url, authkey=authkey, timeout=timeout, name=name, role=role, **plane)


def _url_from_environment(authkey: bytes | str | None) -> tuple[str, bytes | str | None]:
    """``SHMSTORE_URL``, or the URL and key of ``SHMSTORE_CONNECTION_FILE``'s file."""
    url = os.environ.get(ENV_URL)
    if url is not None:
        return url, authkey
    path = os.environ.get(ENV_CONNECTION_FILE)
    if path is None:
        raise ConfigError(
            "no server named: pass a URL, or set SHMSTORE_URL and SHMSTORE_AUTHKEY "
            "(serve() does), or SHMSTORE_CONNECTION_FILE to the file written by "
            "`shmstore serve --connection-file PATH`",
            value="",
        )
    url, key = read_connection_file(path)
    return url, key if authkey is None else authkey


def _authkey_from_environment(url: str) -> bytes | str:
    """``SHMSTORE_AUTHKEY``, or the key of the connection file if it names ``url``."""
    authkey: bytes | str | None = os.environ.get(ENV_AUTHKEY)
    if authkey is None and os.environ.get(ENV_CONNECTION_FILE):
        file_url, key = read_connection_file(os.environ[ENV_CONNECTION_FILE])
        if file_url == url:
            authkey = key
    if authkey is None:
        raise ConfigError(
            f"no authkey for {url}: pass authkey=, or set SHMSTORE_AUTHKEY (hex), or "
            "SHMSTORE_CONNECTION_FILE to the file `shmstore serve --connection-file` "
            "wrote for this URL",
            value=url,
        )
    return authkey
