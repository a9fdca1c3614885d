"""``python -m dedupcall``: the same as the ``dedupcall`` command."""

from dedupcall.cli import main

main()
