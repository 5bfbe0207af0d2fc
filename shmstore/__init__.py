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
    from .backends.memory import MemoryStore
    from .backends.redis import RedisStore
    from .backends.shared import SharedStore
    from .core.checkpoint import Checkpoint
    from .core.codec import MsgpackCodec
    from .core.errors import (
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
    from .core.factory import connect
    from .core.limits import Limits
    from .core.stats import StoreStats
    from .core.store import BaseStore
    from .core.stream import Cleared
    from .integrations.pipeline import CheckpointConfig, Pipeline
    from .server.process import StoreServer, serve

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "AccessDenied": "core.errors",
    "BaseStore": "core.store",
    "Checkpoint": "core.checkpoint",
    "CheckpointConfig": "integrations.pipeline",
    "CheckpointNotFound": "core.errors",
    "Cleared": "core.stream",
    "ConfigError": "core.errors",
    "DecodeError": "core.errors",
    "EncodeError": "core.errors",
    "Limits": "core.limits",
    "MemoryStore": "backends.memory",
    "MsgpackCodec": "core.codec",
    "Pipeline": "integrations.pipeline",
    "RedisStore": "backends.redis",
    "SharedStore": "backends.shared",
    "ShmstoreError": "core.errors",
    "StoreFull": "core.errors",
    "StoreServer": "server.process",
    "StoreStats": "core.stats",
    "StoreTimeout": "core.errors",
    "StoreUnavailable": "core.errors",
    "VersionConflict": "core.errors",
    "connect": "core.factory",
    "serve": "server.process",
}

__all__ = [
    "AccessDenied",
    "BaseStore",
    "Checkpoint",
    "CheckpointConfig",
    "CheckpointNotFound",
    "Cleared",
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
