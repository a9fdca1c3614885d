"""The ``dedupcall`` console script: runs the CLI when the ``cli`` extra is installed, and
otherwise says exactly what to install. Standard library only, so it always loads."""

from __future__ import annotations

import json
import sys

INSTALL = 'pip install "dedupcall[cli]"'
EXIT_FAILED = 1


def main() -> None:
    """Console script entry point (also ``python -m dedupcall``)."""
    missing = []
    for name in ("click", "rich"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        message = (
            f"the dedupcall command needs {' and '.join(missing)}, "
            f"from the cli extra, which is not installed: {INSTALL}"
        )
        if "--json" in sys.argv[1:]:
            print(json.dumps({"error": "NotInstalled", "message": message}))
        else:
            print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_FAILED)

    from dedupcall.cli import main as run

    run()
