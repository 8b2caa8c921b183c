"""`procqueue report`: one self-contained HTML page, rendered in a real headless Chromium:
it loads, and shows one task bar per attempt."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from procqueue import Pool, load_trace, render_report

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def slow_or_failing(x):
    import time
    if x % 7 == 3:
        raise RuntimeError(f"bad {x}")
    time.sleep(0.002 * (x % 5))
    return x


@pytest.fixture
def trace(tmp_path):
    path = tmp_path / "run.json"
    with Pool(2, trace=str(path)) as pool:
        pool.map(slow_or_failing, range(30), return_exceptions=True)
    return path


def chromium(args, tmp_path):
    if CHROMIUM is None:
        # CI (CI=true) installs it with .ci/install-browser, so there its absence fails;
        # on a developer's fresh machine with only Python and pip this one test is skipped.
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/install-browser should have done it")
        pytest.skip("needs headless Chromium: run .ci/install-browser (as root)")
    return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                           *args], capture_output=True, text=True, timeout=90)


def test_report_is_self_contained(trace):
    page = render_report(load_trace(trace))
    assert page.count("class='task-bar'") == 30
    assert "http://" not in page and "https://" not in page and "<script" not in page


@pytest.mark.timeout(120)
def test_report_renders_in_headless_chromium_with_one_bar_per_attempt(trace, tmp_path):
    html = tmp_path / "report.html"
    run = subprocess.run([sys.executable, "-m", "procqueue.cli.main", "report", str(trace),
                          "-o", str(html)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    dom = chromium(["--dump-dom", html.as_uri()], tmp_path).stdout
    assert dom.count('class="task-bar"') == 30
    assert dom.count('data-outcome="error"') == 4  # 3, 10, 17, 24
    shot = tmp_path / "report.png"
    chromium([f"--screenshot={shot}", "--window-size=1200,900", html.as_uri()], tmp_path)
    assert shot.exists() and shot.stat().st_size > 10_000
