"""CPython's own Pool tests pass with procqueue.Pool (tests/cpython_pool_suite.py), under each
start method and under procqueue's default (none set).

Each start method runs in its own interpreter: CPython's tests set the start method for the
whole process and check for dangling processes and threads at the end, which a pytest process
shared with other tests would disturb.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SUITE = Path(__file__).with_name("cpython_pool_suite.py")
# The classes cpython_pool_suite.py runs hold 33 tests on CPython 3.11 (more on later
# versions): fewer means the suite lost some on the way.
MIN_TESTS = 33

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("test._test_multiprocessing") is None,
    reason="this interpreter ships no `test` package (some distributions split it out, e.g. "
           "Debian's libpython3-testsuite): CPython's Pool tests are not there to run")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("start_method", ["default", "fork", "forkserver", "spawn"])
def test_cpython_pool_tests_pass_with_procqueue_pool(start_method: str) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(SUITE.parent.parent)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    run = subprocess.run([sys.executable, str(SUITE), start_method], capture_output=True,
                         text=True, timeout=170, env=env, stdin=subprocess.DEVNULL)
    report = run.stdout + run.stderr
    assert run.returncode == 0, report
    ran = re.search(r"^Ran (\d+) tests? in", report, re.MULTILINE)
    assert ran is not None, report
    assert int(ran.group(1)) >= MIN_TESTS, report
    assert re.search(r"^OK\s*$", report, re.MULTILINE), report  # "OK (skipped=1)" is not
