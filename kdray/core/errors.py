"""User-facing errors: one clear line, raised at the door, turned into exit code 2 by the CLI."""


class KdrayError(Exception):
    """An error caused by the user's input or environment.

    The message is a single line that names what was wrong and what is allowed.
    """


def choice_error(what: str, value, allowed) -> KdrayError:
    allowed = ", ".join(str(a) for a in allowed)
    return KdrayError(f"unknown {what} {value!r}; allowed: {allowed}")


class DiskFull(KdrayError):
    """A disk filled while kdray wrote to it: one line naming the file, exit code 1 (the input was
    fine; the run continues with ``--resume`` once there is space)."""

    exit_code = 1
