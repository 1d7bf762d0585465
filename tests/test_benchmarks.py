"""The step-throughput benchmark times the engine's own ``train_epoch`` (the function ``fit``
runs each epoch), not a copy of its loop; it runs end to end on tiny settings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import kdray.engine as engine
from conftest import small_cfg

ROOT = Path(__file__).resolve().parents[1]


def test_fit_trains_each_epoch_through_train_epoch(tmp_path, monkeypatch):
    calls = []
    real = engine.train_epoch

    def counting(parts, batches):
        calls.append(parts)
        return real(parts, batches)

    monkeypatch.setattr(engine, "train_epoch", counting)
    engine.fit(small_cfg(method="ce", epochs=2), checkpoint_root=str(tmp_path), log=lambda s: None)
    assert len(calls) == 2


def test_step_throughput_benchmark_runs_on_the_engine(tmp_path):
    text = (ROOT / "benchmarks" / "step_throughput.py").read_text()
    assert "engine.train_epoch(" in text and "verbatim" not in text
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "step_throughput.py"), "--dataset", "fake", "--method", "kd",
         "--teachers", "resnet8", "--teachers-count", "1", "--student", "resnet8", "--batch-size", "32",
         "--steps", "2", "--warmup", "1", "--repeats", "1", "--workers", "0", "--json"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["kdray_img_s"] > 0 and result["reference_img_s"] > 0 and result["ratio"] > 0
