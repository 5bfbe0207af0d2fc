"""Memory sampling (sampler), its reader (recorder), CSV/PNG files (export), live view (view)."""

from .sampler import *  # noqa: F403  (the old module path shmstore.monitor)
from .sampler import __all__ as __all__
