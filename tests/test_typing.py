"""procqueue/ is type-checked with mypy --strict (pyproject [tool.mypy]), so the annotations
on the public API and the internals stay true."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(240)
def test_mypy_strict_passes_on_the_package():
    pytest.importorskip("mypy", reason="mypy comes with the test extras: pip install -e .[test]")
    run = subprocess.run([sys.executable, "-m", "mypy", "procqueue"], cwd=ROOT,
                         capture_output=True, text=True, timeout=230)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
