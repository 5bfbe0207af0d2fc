"""``python -m shmstore``: the same as the ``shmstore`` command."""

from .cli.main import main

raise SystemExit(main())
