"""``python -m qloc_tl.cli``: the ``qloc-tl`` command."""

from qloc_tl.cli import main

raise SystemExit(main())
