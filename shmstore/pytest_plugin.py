"""The old import path of this module, kept for users: it is the moved module itself."""

import sys

from .integrations.pytest_plugin import *  # noqa: F403  (the names, for type checkers)
from .integrations.pytest_plugin import __all__ as __all__

sys.modules[__name__] = sys.modules[__name__.rpartition(".")[0] + ".integrations.pytest_plugin"]
