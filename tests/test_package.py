"""kdray as a package: the wheel built from this checkout, installed into a fresh virtual
environment with no checkout on sys.path, runs a sweep by a shipped space's name from the CLI and
from the Python API; the shipped files are listed and copied by the CLI."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from kdray.cli import main

REPO = Path(__file__).resolve().parents[1]


def run(cmd, cwd, env=None, timeout=600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # --no-build-isolation: setuptools is already here (no download); the build is still PEP 517
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
        cwd=out)
    (whl,) = out.glob("kdray-*.whl")
    return whl


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv holding only the wheel; torch, Ray, MLflow ... come from this environment's
    site-packages through a .pth path line (a path line does not run that directory's own .pth
    files, so the checkout's editable install stays out)."""
    venv = tmp_path_factory.mktemp("venv")
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=venv)
    py = venv / "bin" / "python"
    purelib = Path(run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=venv)
                   .stdout.strip())
    deps = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if Path(p).is_dir()]
    (purelib / "_deps_from_test_env.pth").write_text("\n".join(dict.fromkeys(deps)) + "\n")
    run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)], cwd=venv)
    return venv


def clean_env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI", "KDRAY_WORKDIR")}
    env.update(HOME=str(home), PYTHONNOUSERSITE="1")
    return env


def test_wheel_ships_spaces_clusters_license_and_typing(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    spaces = {p.name for p in (REPO / "search_spaces").glob("*.yaml")}
    clusters = {p.name for p in (REPO / "clusters").iterdir() if p.suffix in (".yaml", ".sh", ".md")}
    assert {f"kdray/search_spaces/{n}" for n in spaces} <= names
    assert {f"kdray/clusters/{n}" for n in clusters} <= names
    assert {"kdray/py.typed", "kdray/__main__.py", "kdray/api.py"} <= names
    assert any(n.endswith("licenses/LICENSE") for n in names)
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in meta and "Project-URL: Source" in meta and "Classifier:" in meta
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "kdray").rglob("*.py")}
    assert modules <= names, f"modules missing from the wheel: {sorted(modules - names)}"


@pytest.mark.slow
def test_installed_wheel_runs_a_sweep_by_space_name_from_cli_and_api(installed, tmp_path):
    py, kdray = installed / "bin" / "python", installed / "bin" / "kdray"
    env = clean_env(tmp_path)
    where = run([str(py), "-c", "import json, kdray, sys; print(json.dumps([kdray.__file__, sys.path]))"],
                cwd=tmp_path, env=env)
    module, path = json.loads(where.stdout)
    assert module.startswith(str(installed)), module
    assert not [p for p in path if p and Path(p).resolve() == REPO], path  # "" is the child's cwd, tmp_path

    assert "smoke" in run([str(py), "-m", "kdray", "spaces"], cwd=tmp_path, env=env).stdout
    listed = json.loads(run([str(kdray), "clusters", "--json"], cwd=tmp_path, env=env).stdout)
    assert {"onprem.yaml", "kdray-head.sh"} <= {c["name"] for c in listed}
    assert all(c["path"].startswith(str(installed)) for c in listed)

    cli = run([str(kdray), "--workdir", "w", "tune", "--space", "smoke", "--samples", "1", "--json"],
              cwd=tmp_path, env=env)
    summary = json.loads(cli.stdout.strip().splitlines()[-1])
    assert summary["study_counts"] == {"COMPLETE": 1} and summary["best"]["metrics"]["val_acc"] > 0.2
    assert summary["space"].startswith(str(installed))  # the shipped file, from the wheel
    assert (tmp_path / "w" / "mlflow.db").is_file()

    script = (
        "import json, kdray\n"
        "r = kdray.sweep('smoke', samples=1, experiment='api', workdir='w')\n"
        "s = kdray.load_student(r.best['student_path'])\n"
        "print(json.dumps({'n': len(r.trials), 'grid': len(r.result_grid), 'study': r.study.study_name,\n"
        "    'complete': len(r.study.trials), 'best': r.best['metrics']['val_acc'],\n"
        "    'run': r.best.get('mlflow_run_id'),\n"
        "    'arch': s.record['arch'], 'runs': len(r.mlflow_runs)}))\n"
    )
    api = run([str(py), "-c", script], cwd=tmp_path, env=env)
    got = json.loads(api.stdout.strip().splitlines()[-1])
    assert got["n"] == 1 and got["grid"] == 1 and got["study"] == "api" and got["complete"] == 1
    assert got["best"] > 0.2 and got["arch"] == "resnet8" and got["run"] and got["runs"] >= 2  # parent + trial


def test_spaces_resolve_by_name_and_path(tmp_path, capsys, monkeypatch):
    from kdray.tune.space import load_space

    assert load_space("quick").name == "quick" and load_space("quick.yaml").name == "quick"
    own = tmp_path / "quick"  # a file of the same name wins: a path is a path
    own.write_text((REPO / "search_spaces" / "smoke.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    assert load_space("quick").name == "smoke"
    assert main(["tune", "--space", "nope", "--no-track"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'nope'" in err[0] and "quick" in err[0] and "smoke" in err[0]


def test_spaces_and_clusters_copy_never_overwrite(tmp_path, capsys):
    assert main(["spaces", "copy", "ekd", str(tmp_path)]) == 0
    copied = tmp_path / "ekd.yaml"
    assert copied.read_text() == (REPO / "search_spaces" / "ekd.yaml").read_text()
    copied.write_text("# mine\n")
    assert main(["spaces", "copy", "ekd", str(tmp_path)]) == 2
    assert copied.read_text() == "# mine\n"
    assert "already exist" in capsys.readouterr().err

    dest = tmp_path / "clusters"
    assert main(["clusters", "copy", str(dest)]) == 0
    assert {p.name for p in dest.iterdir()} >= {"onprem.yaml", "aws-gpu.yaml", "gcp-gpu.yaml", "kdray-head.sh"}
    assert os.access(dest / "kdray-head.sh", os.X_OK)
    (dest / "onprem.yaml").write_text("mine")
    assert main(["clusters", "copy", str(dest)]) == 2
    assert (dest / "onprem.yaml").read_text() == "mine"


def test_python_m_kdray(tmp_path):
    out = run([sys.executable, "-m", "kdray", "--version"], cwd=tmp_path)
    assert out.stdout.startswith("kdray ")
