"""``python -m edgespeed``: the same as the ``edgespeed`` command."""

from edgespeed.cli.main import main

main()
