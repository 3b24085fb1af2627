"""``python -m loadgen``: the ``andes-loadgen`` command."""

from loadgen.cli import main

raise SystemExit(main())
