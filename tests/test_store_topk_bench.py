"""benchmarks/store_topk.py: the tiny (--quick) run trains every encoding from its own store and
prints the accuracy, store and bytes tables and the reproduce line; a run whose teachers ran live
or whose store keeps another encoding stops it with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "store_topk.py"


def _bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import store_topk
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return store_topk


@pytest.mark.slow
def test_quick_run_prints_every_table_and_each_encoding(tmp_path):
    """About a minute on 2 cores: one digits teacher (1 epoch), then fp32, top-1 and top-2 students."""
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--workdir", str(tmp_path / "w"), "--cache", str(tmp_path / "cache"),
         "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    text = proc.stdout
    assert "| logits | test acc % | per seed | val acc % | gap pts | s.e. of gap pts | |gap| > larger std |" in text
    for row in ("| fp32 (exact) | ", "| top-1 | ", "| top-2 | "):
        assert text.count(row) == 2  # the accuracy table and the store table
    assert "| logits | C = 10 | C = 100 | C = 1,000 |" in text and "| topk-k10 | n/a (k ≥ C) | 52 | 52 |" in text
    assert "**Build rate**, all stores together: " in text
    reproduce = next(line for line in text.splitlines() if line.startswith("reproduce: "))
    assert reproduce.startswith("reproduce: python benchmarks/store_topk.py --dataset digits ")
    assert "--seeds 0 --topk 1,2 " in reproduce and f"--workdir {tmp_path / 'w'}" in reproduce
    doc = json.loads(out.read_text())
    assert set(doc["encodings"]) == {"fp32", "topk-k1", "topk-k2"}
    assert doc["reproduce"] == reproduce[len("reproduce: "):]
    for lab, e in doc["encodings"].items():
        st = e["store"]
        want = {"encoding": "fp32", "classes": 10} if lab == "fp32" else \
            {"encoding": "topk", "classes": 10, "k": int(lab[len("topk-k"):])}
        assert st["encoding"] == want and st["rows"] > 0 and st["bytes_per_view"] == st["bytes_per_row"]
        assert all(r["teacher_images"] == 0 for r in e["runs"].values()) and set(e["runs"]) == {"0"}
        assert 0 <= e["summary"]["mean"] <= 1 and (lab == "fp32") == ("gap" not in e)
    assert doc["bytes_per_row"]["fp32"] == {"10": 48, "100": 408, "1000": 4008}  # 1 teacher: 8 + 4 C
    assert doc["build_rate"]["rows"] == sum(e["store"]["rows"] for e in doc["encodings"].values())
    # run again: every run and the teachers are read back, nothing is trained
    again = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--workdir", str(tmp_path / "w"), "--cache", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert again.returncode == 0 and "kdray train" not in again.stderr and "reusing" in again.stderr, again.stderr
    assert again.stdout.split("wall time")[0] == text.split("wall time")[0]


def _store(root: Path, digest: str, logits: dict, shas=("a",)) -> None:
    folder = root / digest
    folder.mkdir(parents=True)
    key = {"format": 2, "teachers": list(shas), "precision": {"device": "cpu", "bf16": True}, "logits": logits}
    (folder / "meta.json").write_text(json.dumps({"key": key, "digest": digest, "rows": 4, "views": 10, "info": [1, []],
                                                  "feats": False, "bytes": 80, "build_s": 0.1, "updated": "x"}))


def test_a_live_run_or_a_store_of_another_encoding_stops_it_with_status_2(tmp_path, capsys):
    bench = _bench()
    args = SimpleNamespace(workdir=tmp_path)
    top2 = ("topk", 2)
    _store(tmp_path / "stores" / "topk-k2", "0" * 16, {"encoding": "topk", "classes": 10, "k": 2})
    assert bench.used_store(args, top2, ["a"], {"teacher_images": 0}, 0)["digest"] == "0" * 16
    with pytest.raises(SystemExit) as live:
        bench.used_store(args, top2, ["a"], {"teacher_images": 3}, 0)
    assert live.value.code == 2 and "run topk-k2-s0 ran its teachers live on 3 images" in capsys.readouterr().err
    _store(tmp_path / "stores" / "topk-k2", "1" * 16, {"encoding": "fp32", "classes": 10})
    with pytest.raises(SystemExit) as other:
        bench.used_store(args, top2, ["a"], {"teacher_images": 0}, 0)
    err = capsys.readouterr().err
    assert other.value.code == 2 and "keeps logits {'encoding': 'fp32', 'classes': 10}, not top-2" in err
    _store(tmp_path / "stores" / "topk-k1", "2" * 16, {"encoding": "topk", "classes": 10, "k": 2})
    with pytest.raises(SystemExit) as wrong_k:
        bench.used_store(args, ("topk", 1), ["a"], {"teacher_images": 0}, 0)
    assert wrong_k.value.code == 2 and "not top-1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as none:
        bench.used_store(args, ("fp16", 0), ["a"], {"teacher_images": 0}, 0)
    assert none.value.code == 2 and "no store of these teachers" in capsys.readouterr().err


def test_gap_and_bytes_table():
    bench = _bench()
    exact = {"mean": 0.60, "std": 0.01, "n": 3}
    g = bench.gap({"mean": 0.57, "std": 0.02, "n": 3}, exact)
    assert g["gap"] == pytest.approx(-0.03) and g["gap_se"] == pytest.approx((0.0005 / 3) ** 0.5)
    assert g["seed_spread"] == 0.02 and g["exceeds_spread"] is True
    assert bench.gap({"mean": 0.6, "std": 0.0, "n": 1}, {"mean": 0.5, "std": 0.0, "n": 1})["exceeds_spread"] is None
    table = bench.bytes_table(2)
    assert table["fp32"] == {"10": 88, "100": 808, "1000": 8008} and table["bf16"]["100"] == 408
    assert table["topk-k5"] == {"10": 8 + 2 * 24, "100": 56, "1000": 56} and table["topk-k10"]["10"] is None
