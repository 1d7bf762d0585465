"""kdray's layout by stage: folders in data-flow order, each importing only from folders before it;
tracking beside the pipeline; no import cycle; small files and functions; the core runs on bare
torch + torchvision."""

import subprocess
import sys


def test_core_imports_neither_ray_nor_mlflow():
    code = (
        "import sys\n"
        "import kdray.data.sources, kdray.data.loader, kdray.data.stream, kdray.models, kdray.distill\n"
        "import kdray.teachers.ensemble\n"
        "import kdray.teachers.source, kdray.training.fit, kdray.training.run, kdray.deploy.export\n"
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


#: the stage folders in data-flow order: each imports only from itself and the folders before it.
#: tracking (MLflow) sits beside the pipeline: right after core, importing nothing else of kdray.
STAGES = ("core", "tracking", "data", "models", "distill", "teachers", "training", "deploy", "distributed", "tune",
          "api", "cli")
LEAVES = {"kdray._version"}  # plain values anyone may import
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 60
ARGPARSE_DECLARATIONS = {("kdray.cli.parser", "build_parser")}  # a list of add_argument calls, not logic


def stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "kdray"


def stage_violations(graph: dict) -> list:
    out = []
    for module, deps in graph.items():
        here = stage(module)
        if here not in STAGES:  # the package itself, __main__: they only start things
            continue
        for dep in deps - LEAVES:
            there = stage(dep)
            if there == "kdray" or STAGES.index(there) > STAGES.index(here):
                out.append(f"{module} -> {dep}")
    return sorted(out)


def test_stage_rule_sees_an_import_against_the_flow():
    assert stage_violations({"kdray.data.loader": {"kdray.training.fit"}}) == [
        "kdray.data.loader -> kdray.training.fit"
    ]
    assert stage_violations({"kdray.tracking.runs": {"kdray.data.sources"}})
    assert stage_violations({"kdray.training.fit": {"kdray.data.loader", "kdray.core.io", "kdray._version"}}) == []


def test_every_folder_imports_only_from_folders_before_it():
    graph = import_graph()
    assert {stage(m) for m in graph} >= set(STAGES) - {"api"}  # every stage folder is read
    assert graph["kdray.training.fit"], "the graph is read"
    assert stage_violations(graph) == []


def test_tracking_is_beside_the_pipeline_and_imports_only_core():
    graph = import_graph()
    for module, deps in graph.items():
        if stage(module) == "tracking":
            assert {stage(d) for d in deps} <= {"core", "tracking"}, f"{module} imports {deps}"


def test_every_stage_folder_says_its_one_job():
    for folder in STAGES[:-2] + ("cli",):
        doc = ast.get_docstring(ast.parse((PKG / folder / "__init__.py").read_text()))
        assert doc and "TODO" not in doc, f"kdray/{folder}/__init__.py has no docstring"
    for path in PKG.rglob("*.py"):
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and doc.strip() != "TODO", f"{path.relative_to(PKG.parent)} has no docstring"


def test_files_and_functions_stay_small():
    long_files, long_functions = [], []
    for path in PKG.rglob("*.py"):
        text = path.read_text()
        if len(text.splitlines()) > MAX_FILE_LINES:
            long_files.append(f"{path.relative_to(PKG.parent)}: {len(text.splitlines())}")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = node.end_lineno - node.lineno + 1
                if size > MAX_FUNCTION_LINES and (module_name(path), node.name) not in ARGPARSE_DECLARATIONS:
                    long_functions.append(f"{module_name(path)}.{node.name}: {size}")
    assert long_files == [], long_files
    assert long_functions == [], long_functions


def test_graph_sees_an_import_cycle_when_there_is_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}})
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_inside_kdray():
    graph = import_graph()
    assert "kdray.teachers.source" in graph["kdray.training.prepare"]  # the graph is read
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
