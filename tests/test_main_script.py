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


def test_a_script_piped_into_python_fails_fast_saying_why_under_forkserver(tmp_path):
    # forkserver workers re-import the main module from its __file__, here '<stdin>'
    done = subprocess.run([sys.executable, "-"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=50, input=textwrap.dedent("""
        from procqueue import Pool

        def double(x):
            return 2 * x

        with Pool(2, context="forkserver") as pool:
            print(pool.map(double, [1, 2]))
    """))
    assert done.returncode != 0
    assert "InitializerError" in done.stderr
    assert "'<stdin>') is not a file the workers can import" in done.stderr
    assert "context='fork'" in done.stderr


@pytest.mark.parametrize("context", [None, "fork"])
def test_a_script_piped_into_python_runs(tmp_path, context):
    done = subprocess.run([sys.executable, "-"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=50, input=textwrap.dedent("""
        import json
        from procqueue import Pool

        def double(x):
            return 2 * x

        with Pool(2, context=%r) as pool:
            print(json.dumps(pool.map(double, [1, 2])))
    """ % context))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [2, 4]


# What multiprocessing.Pool code relies on under Linux's fork, kept by default: a class of the
# program in results and arguments, globals an initializer sets, top-level code run once.
HABITS = """
import json, os, sys
from procqueue import Pool

with open(sys.argv[1], "a") as log:  # top-level code: must run once, not once per worker
    log.write("ran\\n")

class Point:
    def __init__(self, x):
        self.x = x

_scale = None

def setup(scale):
    global _scale
    _scale = scale

def shift(p):
    return Point(p.x * _scale)
"""
HABITS_RUN = """
with Pool(2, initializer=setup, initargs=(10,)) as pool:
    points = pool.map(shift, [Point(i) for i in range(4)])
    single = pool.apply(shift, (Point(5),))
    first = pool.submit(shift, Point(6)).result()
    worker_parent = pool.apply(os.getppid)
print(json.dumps({"x": [p.x for p in points] + [single.x, first.x],
                  "ours": all(type(p) is Point for p in points + [single, first]),
                  "parent_is_us": worker_parent == os.getpid()}))
"""
HABITS_IN_A_FUNCTION = HABITS + "\ndef run():" + textwrap.indent(HABITS_RUN, "    ") + "\n"


def run_habits(tmp_path: Path, source: str, as_file: bool = True) -> object:
    log = tmp_path / "log"
    if as_file:
        (tmp_path / "job.py").write_text(source)
        args = [sys.executable, str(tmp_path / "job.py"), str(log)]
    else:
        args = [sys.executable, "-c", source, str(log)]
    done = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=50)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), log.read_text().count("ran")


@pytest.mark.parametrize("shape", ["top level", "main() at top level", "python -c"])
def test_a_program_without_the_main_guard_runs_as_with_multiprocessing(tmp_path, shape):
    # forkserver would re-run the script in each worker (making pools there); with no file it
    # could not import it at all: these get fork workers, as multiprocessing.Pool on Linux.
    source = HABITS + HABITS_RUN if shape == "top level" else HABITS_IN_A_FUNCTION + "run()\n"
    out, runs = run_habits(tmp_path, source, as_file=shape != "python -c")
    assert out == {"x": [0, 10, 20, 30, 50, 60], "ours": True, "parent_is_us": True}
    assert runs == 1


# Returns once both workers run a task of it, so both have imported the script by then (a
# worker still starting when the pool ends is stopped before its import: a count of imports
# without this depended on the second worker's start beating the work's end).
MEET = """
def meet(i):
    import time
    open(f"met-{i}", "w").close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not all(os.path.exists(f"met-{j}") for j in (0, 1)):
        time.sleep(0.005)
    return os.getpid()
"""


def test_a_guarded_script_keeps_the_fork_server(tmp_path):
    # forked from the clean, single-threaded fork server, not from this threaded program
    run = HABITS_RUN.replace(
        "    worker_parent = pool.apply(os.getppid)\n",
        "    worker_parent = pool.apply(os.getppid)\n"
        "    assert len(set(pool.map(meet, [0, 1], chunksize=1))) == 2\n")
    assert run != HABITS_RUN
    source = HABITS + MEET + "\ndef run():" + textwrap.indent(run, "    ") + "\n"
    out, runs = run_habits(tmp_path, source + 'if __name__ == "__main__":\n    run()\n')
    assert out == {"x": [0, 10, 20, 30, 50, 60], "ours": True, "parent_is_us": False}
    assert runs == 3  # the script, and each worker's import of it


@pytest.mark.parametrize("guarded", [True, False])
def test_a_task_can_make_its_own_pool(tmp_path, guarded):
    # Unguarded, the script's fork workers must give their own pools fork workers too: the
    # fork server's workers would import the script, and run its pool, once more.
    body = textwrap.dedent("""
        import json
        from procqueue import Pool

        def square(x):
            return x * x

        def inner(n):
            with Pool(2) as pool:
                return sum(pool.map(square, range(n)))

        if True:
            with Pool(2) as pool:
                print(json.dumps(pool.map(inner, [3, 4])))
    """)
    if guarded:
        body = body.replace("if True:", 'if __name__ == "__main__":')
    script = tmp_path / "job.py"
    script.write_text(body)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=50)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[5, 14]"]
