"""``python -m impl``: the ``jobledger`` command."""

from __future__ import annotations

from impl.cli.main import main

if __name__ == "__main__":
    main()
