"""shmstore: a shared, non-persistent checkpoint store for several local processes.

One server process owns the checkpoints in memory; every other process gets a store
with the same interface as the in-process `MemoryStore`.

The names below are imported on first use (PEP 562), so that ``import shmstore`` — which
every pytest run does through the ``pytest11`` entry point — costs next to nothing until
a store is actually used.

Example:
    >>> import shmstore
    >>> with shmstore.serve() as server:
    ...     store = shmstore.connect()
    ...     store.save(shmstore.Checkpoint(execution_id="run", state={"n": 1})).version
    1
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .checkpoint import Checkpoint
    from .client import SharedStore, connect
    from .codec import MsgpackCodec
    from .errors import (
        AccessDenied,
        CheckpointNotFound,
        ConfigError,
        DecodeError,
        EncodeError,
        ShmstoreError,
        StoreFull,
        StoreTimeout,
        StoreUnavailable,
        VersionConflict,
    )
    from .limits import Limits
    from .memory import MemoryStore
    from .pipeline import CheckpointConfig, Pipeline
    from .redis import RedisStore
    from .server import StoreServer, serve
    from .store import BaseStore, StoreStats

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "AccessDenied": "errors",
    "BaseStore": "store",
    "Checkpoint": "checkpoint",
    "CheckpointConfig": "pipeline",
    "CheckpointNotFound": "errors",
    "ConfigError": "errors",
    "DecodeError": "errors",
    "EncodeError": "errors",
    "Limits": "limits",
    "MemoryStore": "memory",
    "MsgpackCodec": "codec",
    "Pipeline": "pipeline",
    "RedisStore": "redis",
    "SharedStore": "client",
    "ShmstoreError": "errors",
    "StoreFull": "errors",
    "StoreServer": "server",
    "StoreStats": "store",
    "StoreTimeout": "errors",
    "StoreUnavailable": "errors",
    "VersionConflict": "errors",
    "connect": "client",
    "serve": "server",
}

__all__ = [
    "AccessDenied",
    "BaseStore",
    "Checkpoint",
    "CheckpointConfig",
    "CheckpointNotFound",
    "ConfigError",
    "DecodeError",
    "EncodeError",
    "Limits",
    "MemoryStore",
    "MsgpackCodec",
    "Pipeline",
    "RedisStore",
    "SharedStore",
    "ShmstoreError",
    "StoreFull",
    "StoreServer",
    "StoreStats",
    "StoreTimeout",
    "StoreUnavailable",
    "VersionConflict",
    "connect",
    "serve",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'shmstore' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
