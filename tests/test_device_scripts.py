"""The device scripts run only on the lent GPU machine, where a syntax error costs a whole call of
scarce device time. CI cannot run them; it can at least parse them and check what they call exists."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((ROOT / "device").glob("*.sh"))
# a repository file run by a script: python3 path.py, bash path.sh, source path.sh
RUNS = re.compile(r"(?:python3?|bash|source)\s+((?:benchmarks|studies|device|tests)/[\w./-]+\.(?:py|sh))")


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_device_script_parses_and_its_files_exist(script):
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = script.read_text()
    called = RUNS.findall(text)
    called += re.findall(r"\b(tests/test_\w+\.py)", text)  # the GPU tests they hand to pytest
    for rel in called:
        assert (ROOT / rel).is_file(), f"{script.name} calls {rel}, which does not exist"


def test_the_check_sees_what_the_scripts_call():
    assert len(SCRIPTS) >= 5 and sum(len(RUNS.findall(s.read_text())) for s in SCRIPTS) >= 10
