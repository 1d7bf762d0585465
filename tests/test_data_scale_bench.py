"""benchmarks/data_scale.py: the tiny (--quick) run measures every mode at every size in its own
process and prints the table and both target lines; the targets and the process kinds on their own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from datahelpers import CIFAR_JPEG

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "data_scale.py"


def _bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import data_scale
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return data_scale


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR_JPEG.is_file(), reason=f"the CIFAR-10 JPEG tarball {CIFAR_JPEG} is absent: "
                    "the benchmark's image trees are made from it")
def test_quick_run_measures_every_mode_at_every_size(tmp_path):
    """About 1-2 minutes on 2 cores (two local Rays started, one per stream measurement)."""
    out = tmp_path / "out.json"
    # 64 images fit a 0.02 GB in-memory limit (12.6 MB decoded at 256 px), 128 (25.2 MB) do not
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--cache", str(tmp_path / "trees"), "--memory-limit-gb", "0.02",
         "--json", str(out)],
        capture_output=True, text=True, timeout=420, cwd=tmp_path)  # a busy machine
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    text = proc.stdout
    assert "| N | mode | driver peak MB | worker max peak MB |" in text
    assert "memory growth, stream driver+workers peak RSS, N 64 -> 128: " in text
    for n in (64, 128):
        assert f"speed, stream / dataloader img/s at N {n}: " in text
        for mode in ("stream", "dataloader"):
            assert f"| {n} | {mode} | " in text
    assert "| 128 | memory | does not fit (0.0234 GB > 0.02 GB) |" in text
    doc = json.loads(out.read_text())
    got = {(r["mode"], r["n"]): r for r in doc["results"]}
    assert set(got) == {(m, n) for m in ("stream", "memory", "dataloader") for n in (64, 128)}
    assert got[("memory", 128)]["skipped"].startswith("does not fit")
    for key, r in got.items():
        if key == ("memory", 128):
            continue
        assert r["img_s"] > 0 and r["first_batch_s"] > 0 and r["driver_peak_mb"] > 50 and r["rss_samples"] > 0
        assert r["images"] >= 160 and r["driver+workers_peak_mb"] >= r["driver_peak_mb"]
    for n in (64, 128):
        s, d = got[("stream", n)], got[("dataloader", n)]
        assert s["loader"] == "StreamLoader" and s["workers_processes"] >= 1 and s["worker_max_peak_mb"] > 0
        assert s["ray_system_processes"] >= 2 and s["ray_start_s"] > 0
        assert d["loader"].startswith("DataLoader(num_workers=") and d["workers_processes"] >= 1
    assert got[("memory", 64)]["loader"] == "BatchLoader" and got[("memory", 64)]["workers_sum_peak_mb"] is None
    assert set(doc["ratios"]["stream_over_dataloader"]) == {"64", "128"}
    assert doc["ratios"]["stream_memory_growth"]["from"] == 64 and doc["ratios"]["stream_memory_growth"]["to"] == 128
    assert sorted(p.name for p in (tmp_path / "trees").iterdir()) == ["N224-128", "N224-64"]  # no temp folder left


def test_targets_pass_and_fail_on_their_thresholds():
    ds = _bench()

    def row(mode, n, img_s, peak=1000.0):
        return {"mode": mode, "n": n, "img_s": img_s, "driver+workers_peak_mb": peak,
                "driver+workers_anon_peak_mb": peak / 2}

    ok = [row("stream", 4, 90.0, 1000.0), row("dataloader", 4, 100.0), row("memory", 4, 0.0),
          row("stream", 16, 95.0, 1100.0), row("dataloader", 16, 100.0), {"mode": "memory", "n": 16, "skipped": "x"}]
    lines, fails, ratios = ds.targets(ok, [4, 16])
    assert fails == [] and sum(line.endswith("PASS") for line in lines) == 3
    assert ratios["stream_memory_growth"]["growth"] == pytest.approx(0.1)
    bad = [dict(r, **({"img_s": 80.0, "driver+workers_peak_mb": 1200.0} if r["mode"] == "stream" and r["n"] == 16
                      else {})) for r in ok]
    lines, fails, ratios = ds.targets(bad, [4, 16])
    assert len(fails) == 2 and "+20.0%" in fails[0] and "at N 16: 80.0 / 100.0 = 0.80x" in fails[1]


def test_process_kinds_and_class_quota():
    ds = _bench()
    driver = "/venv/bin/python benchmarks/data_scale.py --child dataloader 64"
    kind = lambda cmd: ds._kind(cmd, driver)  # noqa: E731
    assert kind("ray::MapBatches(decode_batch)") == kind("ray::IDLE") == "ray_worker"
    assert kind("/venv/bin/python /venv/lib/python3.11/site-packages/ray/_private/workers/default_worker.py") == \
        "ray_worker"
    assert kind("ray::DashboardAgent   ") == kind("/venv/lib/site-packages/ray/core/src/ray/raylet/raylet --x") == \
        "ray_system"
    assert kind(driver) == "forked" and kind("/usr/bin/sleep 1") == "other"
    assert ds.class_quota(64) == [7, 7, 7, 7, 6, 6, 6, 6, 6, 6] and sum(ds.class_quota(16000)) == 16000
