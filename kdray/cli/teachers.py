"""`kdray teachers train | show | import | store`: teacher sets and their stores."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

from kdray.cli.common import (
    DATA_KEYS,
    OPTIM_KEYS,
    build_config,
    emit_json,
    log,
    method_keys,
    tracking_from_args,
    workdir,
)
from kdray.core.errors import KdrayError
from kdray.core.guards import stop_signals_interrupt


def teacher_origin(t: dict) -> str:
    """'resnet20 seed 0' for a teacher kdray trained; 'resnet18 imported from FILE' otherwise."""
    if t.get("imported"):
        return f"{t['arch']} imported from {t.get('source', '?')}"
    return f"{t['arch']} seed {t['seed']}"


def cmd_teachers_train(args) -> int:
    cfg = build_config(args, DATA_KEYS + OPTIM_KEYS)
    from kdray.training.teacher_set import train_teachers

    out = Path(args.out) if args.out else workdir(args) / "teachers" / cfg.dataset
    tracking = tracking_from_args(args, "kdray-teachers")
    manifest = train_teachers(cfg, args.arch or ["resnet20"], args.count, out, log=log, tracking=tracking)
    if args.json:
        emit_json({"out": str(out), **manifest}, sort_keys=True)
    else:
        for t in manifest["teachers"]:
            print(f"{t['file']}: {teacher_origin(t)} test acc {t['test_acc']:.4f} ({t['params']} params)")
        print(f"teachers written to {out}")
    return 0


def cmd_teachers_show(args) -> int:
    from kdray.teachers.ensemble import load_teachers
    from kdray.teachers.manifest import read_manifest
    from kdray.teachers.store import STORES
    from kdray.teachers.store_files import list_stores

    manifest = read_manifest(args.dir)
    load_teachers(args.dir)  # verifies every checksum and state dict
    stores = list_stores(Path(args.dir) / STORES)
    if args.json:
        emit_json({**manifest, "stores": stores}, sort_keys=True)
        return 0
    print(f"{args.dir}: {len(manifest['teachers'])} teachers on {manifest['dataset']} "
          f"({len(manifest['classes'])} classes), all verified")
    for t in manifest["teachers"]:
        print(f"  {t['file']}: {teacher_origin(t)} test acc {t['test_acc']:.4f}")
    for m in stores:
        print(store_line(m))
    if not stores:
        print(f"  no teacher store yet (`kdray teachers store {args.dir} --space FILE` builds one; "
              "sweeps build theirs)")
    return 0


def cmd_teachers_import(args) -> int:
    cfg = build_config(args, DATA_KEYS + ("device",))
    from kdray.teachers.importing import import_teachers

    manifest = import_teachers(args.files, out=args.out, cfg=cfg, archs=args.arch, layout=args.layout,
                               weights=args.weights or (), log=log)
    if args.json:
        emit_json({"out": str(args.out), **manifest}, sort_keys=True)
        return 0
    for t in manifest["teachers"]:
        print(f"{t['file']}: {t['arch']} from {t['source']} val acc {t['val_acc']:.4f} test acc {t['test_acc']:.4f} "
              f"({t['params']} params)")
    print(f"teachers written to {args.out}")
    return 0


def store_line(m: dict) -> str:
    """One line per store for `kdray teachers show`: its key, encoding, coverage and size."""
    from kdray.teachers.store import FORMAT
    from kdray.teachers.store_codec import LogitCodec

    k = m["key"]
    if k.get("format") != FORMAT:
        return (f"  store {m['digest']}: format {k.get('format')}, outdated (rebuilt in format {FORMAT} on next use; "
                f"this folder can be deleted), {m.get('bytes', 0) / 1024**2:.1f} MB")
    logits = LogitCodec.from_key(k["logits"]).describe()
    return (f"  store {m['digest']}: {k['dataset']} {k['image_size']}px train split {k['train'][:12]}, "
            f"{view_words(k['views'])}, {'bf16' if k['precision']['bf16'] else 'fp32'}; "
            f"{m['rows']}/{m['views']} views ({100.0 * m['rows'] / max(m['views'], 1):.1f}%), "
            f"{logits}{' + feature maps' if m['feats'] else ''}, {m['bytes'] / 1024**2:.1f} MB, "
            f"built in {m['build_s']} s")


def view_words(views: dict) -> str:
    """A store key's view set in words: pad-and-crop views or RandomResizedCrop views."""
    flip = ", flip" if views.get("hflip") else ""
    if views.get("kind") == "resized_crop":
        scale, ratio = views["scale"], views["ratio"]
        return (f"views {views['count']} resized crops of {views['base_size']}px (scale {scale[0]:g}-{scale[1]:g}, "
                f"ratio {ratio[0]:.3g}-{ratio[1]:.3g}{flip})")
    return f"views crop {views['crop_padding']}{flip}"


def cmd_teachers_store(args) -> int:
    from kdray.distributed.store_tasks import ray_data_builder
    from kdray.teachers.source import open_teacher_store
    from kdray.teachers.store_codec import LogitEncoding
    from kdray.teachers.store_files import list_stores

    encoding = LogitEncoding(args.teacher_store_logits, args.teacher_store_topk)
    encoding.check()

    if args.space:
        from kdray.tune.space import load_space
        from kdray.tune.teachers import sweep_store_needs

        space = load_space(args.space)
        space.base = space.base.replace(teachers=str(args.dir))
        needs = sweep_store_needs(space)
        if needs is None:
            raise KdrayError(f"--space {args.space}: no method of this space uses teachers; nothing to store")
        cfg, seeds, epochs, feats = needs
    else:
        cfg = build_config(args, DATA_KEYS + OPTIM_KEYS + method_keys()).replace(teachers=str(args.dir))
        seeds, epochs, feats = None, None, None
    with stop_signals_interrupt(), ray_running(args.address):
        store = open_teacher_store(cfg, seeds=seeds, epochs=epochs, feats=feats, root=args.store,
                                   budget_gb=args.budget, encoding=encoding, builder=ray_data_builder(), log=log)
    if store is None:
        raise KdrayError(f"method {cfg.method!r} uses no teachers; nothing to store")
    on_disk = list_stores(store.folder.parent) if store.folder is not None else []  # a URI's: its mirror
    meta = next((m for m in on_disk if m["digest"] == store.meta.get("digest")), None)
    if meta is None:
        raise KdrayError(f"teacher store {store.meta.get('digest')} was computed but could not be written "
                         "(see the line above); point --store at a writable folder")
    if args.json:
        emit_json(meta, sort_keys=True)
    else:
        print(store_line(meta).strip())
    return 0


@contextlib.contextmanager
def ray_running(address: Optional[str]):
    """Ray for the store's pipeline: joined at ``address`` (or RAY_ADDRESS), else a local Ray
    started here and stopped when the store is done."""
    import ray

    from kdray.distributed.local_ray import init_ray

    started = not ray.is_initialized()
    init_ray(address, worker_logs=False)
    try:
        yield
    finally:
        if started:
            ray.shutdown()
