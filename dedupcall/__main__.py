"""``python -m dedupcall``: the same as the ``dedupcall`` command."""

from dedupcall.command import main

main()
