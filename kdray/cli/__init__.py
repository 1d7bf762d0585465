"""The `kdray` command line: the only door users knock on."""

from __future__ import annotations

import os
import sys

from kdray.cli.common import json_to_real_stdout
from kdray.cli.parser import build_parser
from kdray.core.errors import KdrayError
from kdray.core.guards import Interrupted
from kdray.core.outcome import disk_full_line


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from kdray.distributed.local_ray import ray_for_streaming

    ray_for_streaming(getattr(args, "address", None))  # a command that streams data starts kdray's Ray
    try:
        if getattr(args, "json", False):
            with json_to_real_stdout():
                return int(args.func(args) or 0)
        return int(args.func(args) or 0)
    except KdrayError as exc:
        print(f"kdray: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except Interrupted as exc:
        print(f"kdray: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("kdray: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `kdray spaces | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:
        line = disk_full_line(exc)
        if line is None:
            raise
        print(f"kdray: error: {line}", file=sys.stderr)
        return 1


def entry() -> None:
    """The `kdray` console script: main(), then leave without interpreter teardown (see
    kdray.core.procexit: Ray's native client threads outlive ray.shutdown() and can crash it)."""
    from kdray.core.procexit import exit_after_atexit

    set_code = exit_after_atexit()
    code = main()
    set_code(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
