"""The server process that owns the checkpoints (a multiprocessing.managers server).

`server.manager` is the server (`StoreManager`, `TableServer`, `run_server`);
`server.process` starts and stops it in a child process (`serve`, `StoreServer`).  The
names are imported on first use (PEP 562): the server child imports `server.process`
without paying for what it does not run, and importing this package costs nothing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..core.config import read_connection_file, write_connection_file
    from .manager import StoreManager, TableServer, run_server
    from .process import StoreServer, serve

# Public name -> the module that defines it (relative to this package).
_EXPORTS = {
    "StoreManager": ".manager",
    "StoreServer": ".process",
    "TableServer": ".manager",
    "read_connection_file": "..core.config",
    "run_server": ".manager",
    "serve": ".process",
    "write_connection_file": "..core.config",
}

__all__ = ["StoreManager", "StoreServer", "TableServer", "read_connection_file", "run_server",
           "serve", "write_connection_file"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
