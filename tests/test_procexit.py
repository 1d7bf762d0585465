"""kdray.core.procexit: a process leaves with its own exit code after every atexit handler, skipping the
interpreter teardown that Ray's leftover native threads can crash."""

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import atexit, os, sys
from kdray.core.procexit import exit_after_atexit
set_code = exit_after_atexit() if {use} else None

class CrashesInTeardown:  # stands in for a native object whose teardown faults
    def __del__(self):
        os.abort()

keep = CrashesInTeardown()
atexit.register(lambda: open({marker!r}, "w").write("ran"))  # registered later: must still run
sys.stdout.write("buffered output")  # never flushed by the script itself
if set_code:
    set_code({code})
sys.exit({code})
"""


def _run(tmp_path: Path, *, use: bool, code: int):
    marker = tmp_path / f"marker-{use}-{code}"
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(use=use, marker=str(marker), code=code)],
                          capture_output=True, text=True, timeout=120)
    return proc, marker


def test_teardown_crash_is_real_without_the_handler(tmp_path):
    proc, marker = _run(tmp_path, use=False, code=3)
    assert proc.returncode < 0  # killed by SIGABRT during teardown: the hazard the handler avoids
    assert marker.read_text() == "ran"


def test_exit_code_output_and_later_atexit_handlers_kept(tmp_path):
    for code in (0, 3):
        proc, marker = _run(tmp_path, use=True, code=code)
        assert proc.returncode == code, proc.stderr
        assert proc.stdout == "buffered output"
        assert marker.read_text() == "ran"


def test_console_script_uses_it(tmp_path):
    exe = Path(sys.executable).with_name("kdray")
    proc = subprocess.run([str(exe), "train", "--method", "nosuch", "--dataset", "digits"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "nosuch" in proc.stderr
    imports = [ln for ln in exe.read_text().splitlines() if "import" in ln]
    assert "from kdray.cli import entry" in imports, imports
