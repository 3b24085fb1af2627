"""``python -m andes``: the ``andes`` command."""

from andes.cli import main

raise SystemExit(main())
