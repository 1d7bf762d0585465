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
