"""shmstore: a shared, non-persistent checkpoint store for several local processes.

One server process owns the checkpoints in memory; every other process gets a store
with the same interface as the in-process `MemoryStore`.

Example:
    >>> import shmstore
    >>> with shmstore.serve() as server:
    ...     store = shmstore.connect()
    ...     store.save(shmstore.Checkpoint(execution_id="run", state={"n": 1})).version
    1
"""

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
from .memory import MemoryStore
from .server import StoreServer, serve
from .store import BaseStore, StoreStats

__version__ = "0.1.0"

__all__ = [
    "AccessDenied",
    "BaseStore",
    "Checkpoint",
    "CheckpointNotFound",
    "ConfigError",
    "DecodeError",
    "EncodeError",
    "MemoryStore",
    "MsgpackCodec",
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
