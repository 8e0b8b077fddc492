"""``python -m farm`` is the ``farm`` command."""

from farm.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
