"""`kdray export`: write a trained student (from an MLflow run or a file) for deployment."""

from __future__ import annotations

from pathlib import Path

from kdray.cli.common import (
    emit_json,
    log,
    tracking_uri,
)
from kdray.core.errors import KdrayError
from kdray.tracking.store import check_readable_store


def cmd_export(args) -> int:
    from kdray.core.io import safe_load
    from kdray.deploy.export import export_student

    if bool(args.run) == bool(args.student):
        raise KdrayError("give exactly one of --run RUN_ID (an MLflow run) or --student PATH (a student.pt)")
    branch = args.branch
    if branch not in ("best", "all"):
        try:
            branch = int(branch)
        except ValueError:
            raise KdrayError(f"--branch {args.branch!r} is not allowed; "
                             "allowed: best, all or a branch number") from None
    if args.run:
        from kdray.tracking.query import download_student

        uri = tracking_uri(args)
        check_readable_store(uri)
        path = download_student(uri, args.run)
    else:
        path = Path(args.student)
        if not path.is_file():
            raise KdrayError(f"--student {path}: no such file")
    record = safe_load(path, "student")
    info = export_student(record, branch=branch, out=Path(args.out), overwrite=args.overwrite,
                          recheck=not args.no_recheck, log=log, source=path)
    if args.json:
        emit_json(info, sort_keys=True, default=str)
    else:
        acc = info.get("test_acc_rechecked")
        check = (f": test acc re-checked {acc:.4f} (logged {info.get('test_acc_logged')})" if acc is not None
                 else " (accuracy not re-checked)")
        print(f"exported {info.get('branch')} of {record['arch']} ({record['method']}) to {args.out}{check}")
    return 0
