"""Programs written for multiprocessing.Pool, run as scripts (`python job.py`): their top-level
functions reach the workers by reference to the worker's import of the script, as with
multiprocessing, so module globals are one namespace per worker."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)


def run_script(tmp_path: Path, body: str) -> object:
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(body))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=50)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("backend", ["local", "dask"])
def test_a_global_set_by_the_initializer_is_seen_by_the_tasks(tmp_path, backend):
    if backend == "dask":
        pytest.importorskip("distributed")
    out = run_script(tmp_path, """
        import json
        from procqueue import Pool

        _model = None

        def load(name):
            global _model
            _model = name.upper()

        def predict(x):
            return [_model, x]

        if __name__ == "__main__":
            with Pool(2, backend=%r, initializer=load, initargs=("weights",)) as pool:
                print(json.dumps(pool.map(predict, range(4))))
    """ % backend)
    assert out == [["WEIGHTS", i] for i in range(4)]


def test_a_task_can_hand_its_script_function_to_an_inner_multiprocessing_pool(tmp_path):
    out = run_script(tmp_path, """
        import json
        import multiprocessing
        from procqueue import Pool

        def square(x):
            return x * x

        def inner(n):  # plain pickle, by reference: needs the worker's own __main__.square
            with multiprocessing.get_context("spawn").Pool(1) as inner_pool:
                return sum(inner_pool.map(square, range(n)))

        if __name__ == "__main__":
            with Pool(1) as pool:
                print(json.dumps(pool.apply(inner, (4,))))
    """)
    assert out == 14


def test_functions_defined_under_the_main_guard_still_run(tmp_path):
    out = run_script(tmp_path, """
        import json
        from procqueue import Pool

        def label(x):
            return ["top", x]

        if __name__ == "__main__":
            def guarded(x):  # absent from the worker's import of the script
                return ["guarded", x]

            def label(x):  # same name as a top-level function, other source
                return ["redefined", x]

            with Pool(2) as pool:
                print(json.dumps([pool.map(guarded, [1]), pool.map(label, [2]),
                                  pool.map(lambda x: ["lambda", x], [3])]))
    """)
    assert out == [[["guarded", 1]], [["redefined", 2]], [["lambda", 3]]]


def test_a_script_piped_into_python_fails_fast_saying_why(tmp_path):
    # forkserver workers re-import the main module from its __file__, here '<stdin>'
    done = subprocess.run([sys.executable, "-"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=50, input=textwrap.dedent("""
        from procqueue import Pool

        def double(x):
            return 2 * x

        with Pool(2) as pool:
            print(pool.map(double, [1, 2]))
    """))
    assert done.returncode != 0
    assert "InitializerError" in done.stderr
    assert "'<stdin>') is not a file the workers can import" in done.stderr
    assert "context='fork'" in done.stderr


def test_a_script_piped_into_python_runs_with_the_fork_context(tmp_path):
    done = subprocess.run([sys.executable, "-"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=50, input=textwrap.dedent("""
        import json
        from procqueue import Pool

        def double(x):
            return 2 * x

        with Pool(2, context="fork") as pool:
            print(json.dumps(pool.map(double, [1, 2])))
    """))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [2, 4]
