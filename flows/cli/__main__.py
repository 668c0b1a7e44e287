"""``python -m flows.cli``: the ``brats`` program."""

from flows.cli.main import entry

entry()
