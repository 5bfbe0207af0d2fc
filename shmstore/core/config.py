"""Configuration in one place: server URLs, the environment, authkeys, connection files.

Everything that names a server or proves a right to use it is read and checked here, the
same way for every caller: `connect`, `serve`, the server child and the ``shmstore``
command.  The module needs nothing above `core`, and what only some callers need (json
and psutil for connection files, logging for a warning) is imported when it is used:
``from shmstore import connect`` costs only this module.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import stat
from typing import Any, NamedTuple
from urllib.parse import unquote, urlsplit

from .errors import ConfigError, StoreUnavailable

__all__ = ["AUTHKEY_BYTES", "DEFAULT_TIMEOUT", "ENV_AUTHKEY", "ENV_CONNECTION_FILE", "ENV_URL",
           "Address", "coerce_authkey", "is_redis_url", "open_private_temp", "parse_url",
           "read_connection_file", "write_connection_file"]

ENV_URL = "SHMSTORE_URL"
ENV_AUTHKEY = "SHMSTORE_AUTHKEY"
ENV_CONNECTION_FILE = "SHMSTORE_CONNECTION_FILE"
AUTHKEY_BYTES = 32
# Seconds any client call may take before StoreTimeout, unless the caller says otherwise.
DEFAULT_TIMEOUT = 30.0
MAX_UNIX_PATH = 107
REDIS_SCHEMES = ("redis", "rediss", "redis+unix")


class Address(NamedTuple):
    """A server address parsed from a URL.

    Attributes:
        url: the canonical URL (``unix:///path`` or ``tcp://host:port``).
        family: ``"AF_UNIX"`` or ``"AF_INET"``.
        target: what ``socket.connect``/``bind`` take: a path or a (host, port) pair.
    """

    url: str
    family: str
    target: Any

    @property
    def is_loopback(self) -> bool:
        """True for unix sockets and loopback TCP hosts."""
        if self.family == "AF_UNIX":
            return True
        host = self.target[0]
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False


def is_redis_url(url: object) -> bool:
    """True for ``redis://``, ``rediss://`` and ``redis+unix://`` URLs (`RedisStore`'s)."""
    return isinstance(url, str) and url.split(":", 1)[0].lower() in REDIS_SCHEMES


def parse_url(url: object) -> Address:
    """Parse ``unix:///path/to.sock`` or ``tcp://127.0.0.1:PORT`` into an `Address`.

    Raises:
        ConfigError: anything else, with the forms that are accepted.
    """
    if not isinstance(url, str) or not url:
        raise ConfigError(
            f"server URL must be a non-empty str, not {url!r:.80}; "
            "use unix:///path/to.sock or tcp://127.0.0.1:PORT",
            value=repr(url)[:80],
        )
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return _unix_address(url, unquote(parts.path), parts.netloc)
    if parts.scheme == "tcp":
        try:
            host, port = parts.hostname, parts.port
        except ValueError as exc:
            raise ConfigError(f"bad TCP URL {url!r}: {exc}", value=url) from None
        if not host or port is None or parts.path not in ("", "/"):
            raise ConfigError(
                f"bad TCP URL {url!r}: it takes a host and a port, e.g. tcp://127.0.0.1:7700 "
                "(port 0 picks a free one when serving)",
                value=url,
            )
        if ":" in host:
            raise ConfigError(f"IPv6 addresses are not supported: {url!r}; use 127.0.0.1",
                              value=url)
        return Address(f"tcp://{host}:{port}", "AF_INET", (host, port))
    raise ConfigError(
        f"unsupported server URL {url!r}: use unix:///path/to.sock or tcp://127.0.0.1:PORT",
        value=url,
    )


def _unix_address(url: str, path: str, netloc: str) -> Address:
    if netloc or not path.startswith("/"):
        raise ConfigError(
            f"bad unix URL {url!r}: it takes an absolute path, e.g. unix:///tmp/s/store.sock",
            value=url,
        )
    if len(path.encode()) > MAX_UNIX_PATH:
        raise ConfigError(
            f"unix socket path is {len(path.encode())} bytes; the system allows "
            f"{MAX_UNIX_PATH}: choose a shorter path",
            value=url,
        )
    return Address(f"unix://{path}", "AF_UNIX", path)


def coerce_authkey(authkey: bytes | bytearray | str | None) -> bytes:
    """The key as bytes: bytes as they are, a str as hex, None as `AUTHKEY_BYTES` new ones.

    Raises:
        ConfigError: a str that is not hex, another type, or an empty key (the message
            never shows the key).
    """
    if authkey is None:
        return os.urandom(AUTHKEY_BYTES)  # what secrets.token_bytes returns
    if isinstance(authkey, str):
        try:
            key = bytes.fromhex(authkey)
        except ValueError:
            raise ConfigError("an authkey given as str must be hex", value="<hidden>") from None
    elif isinstance(authkey, (bytes, bytearray)):
        key = bytes(authkey)
    else:
        raise ConfigError(f"authkey must be bytes or a hex str, not {type(authkey).__name__}",
                          value="<hidden>")
    if not key:
        raise ConfigError("authkey must not be empty", value="<hidden>")
    return key


# -- connection files ----------------------------------------------------------------------


def write_connection_file(path: str, url: str, authkey: bytes, pid: int) -> None:
    """Write ``{"url", "authkey" (hex), "pid"}`` to ``path``, readable by the owner only.

    The file is written to a fresh temporary file beside ``path`` (``O_EXCL|O_NOFOLLOW``,
    mode 0600) and renamed over it: a symlink or someone else's file at ``path`` is
    replaced, never followed or truncated.

    Raises:
        ConfigError: the directory is missing or not writable.
    """
    import json  # connection files only (see the module doc)

    directory = os.path.dirname(os.path.abspath(path))
    data = json.dumps({"url": url, "authkey": authkey.hex(), "pid": pid}).encode()
    tmp = ""
    try:
        tmp, fd = open_private_temp(directory, os.path.basename(path))
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            os.write(fd, data)
        finally:
            os.close(fd)
        os.rename(tmp, path)  # replaces a symlink itself, never its target
    except OSError as exc:
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(exc, FileNotFoundError):
            why = f"its directory {directory!r} does not exist; create it (mode 0700)"
        else:
            why = f"{exc.strerror or exc}; check the permissions of {directory!r}"
        raise ConfigError(f"cannot write connection file {path!r}: {why} or choose another "
                          "path", value=path) from None


def open_private_temp(directory: str, base: str) -> tuple[str, int]:
    """A new file ``.BASE.RANDOM`` in ``directory`` (mode 0600), never an existing one,
    opened for writing (``O_EXCL|O_NOFOLLOW``): write it, then rename it over the target
    (connection files, ``shmstore dump``).  Returns its path and descriptor.

    Raises:
        OSError: the directory is missing or not writable (the caller words it).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):  # a name taken by someone else: O_EXCL refuses it, try another
        tmp = os.path.join(directory, f".{base}.{os.urandom(8).hex()}")
        try:
            return tmp, os.open(tmp, flags, 0o600)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name in {directory}")


def _connection_file_error(path: str, why: str) -> ConfigError:
    return ConfigError(
        f"cannot read connection file {path!r} ({why}); it is written by "
        "`shmstore serve --connection-file PATH`",
        value=path,
    )


def read_connection_file(path: str) -> tuple[str, bytes]:
    """Read the URL and authkey from a connection file.

    A file that others can read logs a warning (its key is no longer secret); a file
    owned by another user is refused, since whoever owns it chooses the server this
    process trusts.

    Raises:
        ConfigError: the file is missing, unreadable, owned by another user or not a
            connection file.
        StoreUnavailable: the server process that wrote it (its ``pid``) is not running.
    """
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            raw = fh.read()
    except OSError as exc:
        raise _connection_file_error(path, str(exc)) from None
    _check_owner(path, st)
    import json  # connection files only (see the module doc)

    try:
        data = json.loads(raw)
        url, key, pid = str(data["url"]), bytes.fromhex(data["authkey"]), data.get("pid")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise _connection_file_error(path, f"{type(exc).__name__}: {exc}") from None
    # Only a unix socket's server is surely on this machine (a TCP one may be elsewhere).
    if url.startswith("unix:") and isinstance(pid, int) and pid > 0 and not _pid_exists(pid):
        raise StoreUnavailable(
            f"the server (pid {pid}) that wrote connection file {path!r} is not running; "
            "start one again (`shmstore serve --connection-file PATH`)",
            address=url,
        )
    return url, key


def _check_owner(path: str, st: os.stat_result) -> None:
    """Refuse another user's connection file; warn about one that others can read."""
    if st.st_uid != os.getuid():
        raise ConfigError(
            f"connection file {path!r} is owned by uid {st.st_uid}, not by this user "
            f"(uid {os.getuid()}): whoever owns it picks the server you trust; use a file "
            "you wrote with `shmstore serve --connection-file PATH`",
            value=path,
        )
    if st.st_mode & 0o077:
        import logging  # for this warning only (see the module doc)

        logging.getLogger("shmstore").warning(
            "connection file %r is readable by others (mode %04o): its authkey is not "
            "secret; `chmod 600` it, or restart the server to write a new one",
            path, stat.S_IMODE(st.st_mode))


def _pid_exists(pid: int) -> bool:
    # psutil only when a file names a pid: importing it costs a client that never reads one.
    import psutil

    return bool(psutil.pid_exists(pid))
