"""`kdray spaces` and `kdray clusters`: list, show and copy the files kdray ships."""

from __future__ import annotations

from pathlib import Path

from kdray.cli.common import (
    emit_json,
)


def list_shipped(args, files: dict, width: int, hint: str) -> int:
    """Print shipped files (name -> path) with their one-line descriptions, or them as JSON."""
    from kdray.core.shipped import description

    rows = [{"name": n, "path": str(p), "description": description(p)} for n, p in files.items()]
    if getattr(args, "json", False):
        emit_json(rows)
        return 0
    for r in rows:
        print(f"{r['name']:{width}}  {r['description']}")
    print(hint)
    return 0


def cmd_spaces(args) -> int:
    from kdray.core.shipped import copy_out, resolve_space, shipped_spaces

    action = args.spaces_command or "list"
    if action == "show":
        print(resolve_space(args.name).read_text(), end="")
        return 0
    if action == "copy":
        copied = copy_out([resolve_space(args.name)], Path(args.dest))
        print(f"copied to {copied[0]}; run it with `kdray tune --space {copied[0]}`")
        return 0
    return list_shipped(args, shipped_spaces(), 10,
                        "run one with `kdray tune --space NAME`; `kdray spaces copy NAME` gives you a file to edit")


def cmd_clusters(args) -> int:
    from kdray.core.shipped import copy_out, shipped_cluster_files

    files = shipped_cluster_files()
    if args.clusters_command == "copy":
        copied = copy_out(files, Path(args.dest))
        print(f"copied {len(copied)} files to {Path(args.dest)}/; build the wheel into ./dist "
              f"(`python -m pip wheel --no-deps -w dist .` in a checkout) and start a cluster with "
              f"`ray up {Path(args.dest) / 'onprem.yaml'}` (see its README)")
        return 0
    return list_shipped(args, {f.name: f for f in files}, 14, "`kdray clusters copy` copies them to ./clusters")
