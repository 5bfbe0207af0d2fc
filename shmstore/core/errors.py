"""The exception tree of shmstore.

::

    ShmstoreError
    ├── ConfigError(ValueError)           bad option, URL, id
    ├── EncodeError(TypeError)            state cannot be encoded; names the path
    ├── DecodeError(ValueError)           corrupt or over-limit payload
    ├── CheckpointNotFound(KeyError)
    ├── VersionConflict                   expected_version did not match
    ├── StoreFull                         a limit would be exceeded; nothing was written
    ├── StoreUnavailable(ConnectionError) server gone / refused / socket missing
    ├── StoreTimeout(TimeoutError)        no answer in time, or wait() ran out
    └── AccessDenied(PermissionError)     wrong authkey

Every exception pickles (they cross the process boundary) and keeps its data in
attributes.  The constructor's keyword arguments are exactly those attributes, so
``type(e)(e.message, **e.attrs)`` rebuilds any of them; ``__reduce__`` and the wire
format rely on that.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AccessDenied",
    "CheckpointNotFound",
    "ConfigError",
    "DecodeError",
    "EncodeError",
    "ShmstoreError",
    "StoreFull",
    "StoreTimeout",
    "StoreUnavailable",
    "VersionConflict",
]


class ShmstoreError(Exception):
    """Base class of every error shmstore raises.

    Parameters:
        message: what went wrong and, where it helps, what to do about it.
        **attrs: the data of the error, kept as attributes of the same name.
    """

    def __init__(self, message: str = "", **attrs: Any) -> None:
        super().__init__(message)
        self.message = message
        self.attrs = attrs
        for key, value in attrs.items():
            setattr(self, key, value)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.attrs))

    def __str__(self) -> str:
        return self.message


def _rebuild(cls: type[ShmstoreError], message: str, attrs: dict[str, Any]) -> ShmstoreError:
    return cls(message, **attrs)


class ConfigError(ShmstoreError, ValueError):
    """A bad option, URL, id or argument; raised before anything is sent."""


class EncodeError(ShmstoreError, TypeError):
    """A state or metadata value cannot be encoded.

    Attributes:
        path: where the offending value is, e.g. ``state['rows'][3]['when']``.
        type_name: the type of the offending value.
    """

    path: str
    type_name: str


class DecodeError(ShmstoreError, ValueError):
    """A payload is corrupt, of an unknown extension type, or over the size limit."""


class CheckpointNotFound(ShmstoreError, KeyError):
    """No checkpoint has this id.

    Attributes:
        checkpoint_id: the id that was asked for.
    """

    checkpoint_id: str

    def __str__(self) -> str:  # KeyError would quote the message; keep it readable
        return self.message


class VersionConflict(ShmstoreError):
    """``expected_version`` did not match the execution's latest version.

    Attributes:
        execution_id: the execution.
        expected: the version the caller expected.
        actual: the execution's latest version (0 when it is empty).
    """

    execution_id: str
    expected: int
    actual: int


class StoreFull(ShmstoreError):
    """A limit would be exceeded; nothing was written.

    Attributes:
        limit: the name of the limit (``max_bytes``, ``max_checkpoints`` ...).
    """

    limit: str


class StoreUnavailable(ShmstoreError, ConnectionError):
    """The server is gone, refused the connection, or its socket is missing.

    Attributes:
        address: the URL of the server.
    """

    address: str


class StoreTimeout(ShmstoreError, TimeoutError):
    """No answer in time, or ``wait()`` ran out.

    Attributes:
        timeout: the number of seconds that ran out.
    """

    timeout: float


class AccessDenied(ShmstoreError, PermissionError):
    """The server refused the authkey.

    Attributes:
        address: the URL of the server.
    """

    address: str
