"""``python -m sigmma_sc``: the ``sigmma`` command line."""

from ._cli import main

raise SystemExit(main())
