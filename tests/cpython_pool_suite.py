"""CPython's own Pool tests, run with procqueue.Pool in place of multiprocessing.Pool.

Run as a script by tests/test_cpython_pool.py, once per start method:

    python tests/cpython_pool_suite.py fork|forkserver|spawn|default [unittest options]

"default" sets no start method, so procqueue's own default applies.  The test classes are
the interpreter's, unchanged (`test._test_multiprocessing`, shipped with CPython in the `test`
package): `_TestPool`, `_TestPoolWorkerErrors` and `_TestPoolWorkerLifetime` mixed with the
processes mixin, whose `Pool` is procqueue's, as CPython's own test modules mix them; and
`TestInitializers.test_pool_initializer` and `TestStdinBadfiledescriptor.test_pool_in_process`,
which call `multiprocessing.Pool` by that name, so this module rebinds the name to
procqueue.Pool (at import, so that a spawned child, which imports this module again, does too).
test_pool_in_process is extended by one check: the child making the pool exits with code 0
(CPython's version ignores how the child ended).

Excluded: none.  Every test of these classes passes, including the three that touch
multiprocessing.Pool's internals (`_repopulate_pool()`, `_state` set to a string, `_pool`),
which procqueue.Pool keeps for code written against them.
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.pool
import sys
import unittest

import procqueue

multiprocessing.Pool = procqueue.Pool  # type: ignore[assignment, misc]

import test._test_multiprocessing as cpython  # noqa: E402  (after the rebinding above)


class ProcqueueProcessesMixin(cpython.ProcessesMixin):  # type: ignore[name-defined, misc]
    Pool = staticmethod(procqueue.Pool)


class WithProcqueueTestPool(cpython._TestPool, ProcqueueProcessesMixin,  # type: ignore
                            unittest.TestCase):
    pass


class WithProcqueueTestPoolWorkerErrors(cpython._TestPoolWorkerErrors,  # type: ignore
                                        ProcqueueProcessesMixin, unittest.TestCase):
    pass


class WithProcqueueTestPoolWorkerLifetime(cpython._TestPoolWorkerLifetime,  # type: ignore
                                          ProcqueueProcessesMixin, unittest.TestCase):
    pass


class TestInitializers(cpython.TestInitializers):  # type: ignore[name-defined, misc]
    """Only test_pool_initializer: the other test is about managers, not pools."""

    test_manager_initializer = None  # type: ignore[assignment]


class TestStdinBadfiledescriptor(unittest.TestCase):
    def test_pool_in_process(self) -> None:
        # CPython's test, plus the exit code of the child that makes and uses a pool.
        p = multiprocessing.Process(target=cpython.pool_in_process)
        p.start()
        p.join()
        self.assertEqual(p.exitcode, 0)


def main() -> None:
    method = sys.argv.pop(1)
    if method != "default":
        multiprocessing.set_start_method(method, force=True)
    unittest.main(verbosity=2)


if __name__ == "__main__":
    main()
