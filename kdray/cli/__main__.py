"""``python -m kdray.cli``: the same as the ``kdray`` command."""

from kdray.cli import entry

if __name__ == "__main__":
    entry()
