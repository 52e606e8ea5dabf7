"""``python -m intes``: the same CLI as the ``intes`` command."""

from intes.cli import main

main()
