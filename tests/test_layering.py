"""The core (data, models, methods, engine, teachers, CLI train) runs on bare torch + torchvision."""

import subprocess
import sys


def test_core_imports_neither_ray_nor_mlflow():
    code = (
        "import sys\n"
        "import kdray.data, kdray.models, kdray.distill, kdray.engine, kdray.teachers, kdray.runner, kdray.export\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow', 'optuna'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()
    assert out == "", f"core imported: {out}"


# --- the import graph inside kdray/ ------------------------------------------------------------------
import ast  # noqa: E402
from pathlib import Path  # noqa: E402

PKG = Path(__file__).resolve().parents[1] / "kdray"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (PKG.parent / rel).with_suffix(".py").is_file() or (PKG.parent / rel / "__init__.py").is_file()


def kdray_imports(path: Path) -> set:
    """Every kdray module ``path`` imports, at module level or inside a function."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "kdray"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            if base.split(".")[0] != "kdray":
                continue
            subs = [f"{base}.{a.name}" for a in node.names if is_module(f"{base}.{a.name}")]
            out |= set(subs) if subs and len(subs) == len(node.names) else {base} | set(subs)
    return out - {me}


def import_graph() -> dict:
    return {module_name(p): kdray_imports(p) for p in PKG.rglob("*.py")}


def find_cycle(graph: dict):
    state: dict = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path + [node, nxt]
            if nxt not in state:
                found = visit(nxt, path + [node])
                if found:
                    return found
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [])
            if found:
                return found
    return None


def test_graph_sees_an_import_cycle_when_there_is_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}})
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_inside_kdray():
    graph = import_graph()
    assert "kdray.engine" in graph and "kdray.teachers" in graph["kdray.engine"]  # the graph is read
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_tracking_is_a_side_channel_importing_nothing_above_it():
    assert kdray_imports(PKG / "tracking.py") <= {"kdray.errors", "kdray.values"}  # values: plain helpers


def test_dependencies_point_one_way_cli_tune_scale_engine_distill():
    graph = import_graph()
    below = {"kdray.engine": {"kdray.scale", "kdray.tune", "kdray.cli", "kdray.runner", "kdray.teacher_training"},
             "kdray.scale": {"kdray.tune", "kdray.cli", "kdray.runner"},
             "kdray.tune": {"kdray.cli"},
             "kdray.teachers": {"kdray.engine", "kdray.teacher_training"}}
    for module, above in below.items():
        assert not graph[module] & above, f"{module} imports {graph[module] & above}"
    for name, deps in graph.items():
        if name.startswith(("kdray.distill", "kdray.models", "kdray.data")):
            assert not deps & {"kdray.engine", "kdray.scale", "kdray.tune", "kdray.cli", "kdray.tracking"}, name
