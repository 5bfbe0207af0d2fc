"""The server process that owns the checkpoints (a multiprocessing.managers server)."""

from .manager import *  # noqa: F403  (the old module path shmstore.server)
from .manager import __all__ as __all__
