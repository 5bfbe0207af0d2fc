"""``python -m shmstore``: the same as the ``shmstore`` command."""

from .cli import main

raise SystemExit(main())
