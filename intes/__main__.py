"""The ``intes`` command and ``python -m intes``: the CLI, where Ctrl-C during its imports (the
first few tenths of a second) exits 130 as it does later, instead of with a traceback."""

import sys

from intes.errors import INTERRUPTED


def main() -> None:
    try:
        from intes.cli import main as run
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(INTERRUPTED)
    run()


if __name__ == "__main__":
    main()
