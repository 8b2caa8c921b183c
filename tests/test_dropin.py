"""Drop-in fidelity: what a multiprocessing.Pool user relies on, one test per bug a new user
hit (issue #19).  CPython's own Pool tests run in test_cpython_pool.py."""
from __future__ import annotations

import collections
import gc
import multiprocessing
import multiprocessing.pool
import os
import queue
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from procqueue import ArgumentSerializationError, Pool

HERE = Path(__file__).resolve().parent


def square(x: int) -> int:
    return x * x


def fail_on_three(x: int) -> int:
    if x == 3:
        raise ValueError(f"bad item {x}")
    return x


def identity(x: Any) -> Any:
    return x


def return_a_lambda() -> Any:
    return lambda: 42


class ReduceRaises:
    def __reduce__(self) -> Any:
        raise RuntimeError("cannot pickle")


def run_script(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args],
                          capture_output=True, text=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL)


# ---- 1. nothing is written to a descriptor the pool no longer owns -------------------------

def open_files_writing_data(directory: Path, count: int = 8) -> list[Any]:
    """Open `count` files (they take the lowest free descriptor numbers: those the pool
    closed) and write DATA to each."""
    files = [open(directory / f"file-{i}", "w") for i in range(count)]
    for f in files:
        f.write("DATA")
        f.flush()
    return files


def contents(directory: Path, count: int = 8) -> list[bytes]:
    return [(directory / f"file-{i}").read_bytes() for i in range(count)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("ending", ["terminate", "garbage collection"])
def test_a_pool_never_writes_into_a_descriptor_it_closed(tmp_path: Path, ending: str) -> None:
    pool = Pool(2)
    assert pool.map(square, range(10)) == [x * x for x in range(10)]
    pool.close()
    pool.join()
    files = open_files_writing_data(tmp_path)
    try:
        if ending == "terminate":
            pool.terminate()
        del pool
        gc.collect()
    finally:
        for f in files:
            f.close()
    assert contents(tmp_path) == [b"DATA"] * 8


@pytest.mark.timeout(60)
def test_interpreter_exit_after_join_writes_into_no_file_of_the_program(tmp_path: Path) -> None:
    run = run_script("""
        import sys
        from pathlib import Path
        from procqueue import Pool
        from tests.test_dropin import open_files_writing_data, square
        if __name__ == "__main__":
            pool = Pool(2)
            pool.map(square, range(10))
            pool.close()
            pool.join()
            files = open_files_writing_data(Path(sys.argv[1]))  # left open: exit closes them
    """, str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert contents(tmp_path) == [b"DATA"] * 8
    assert "unrecognized command" not in run.stderr  # the resource tracker's pipe, too


def close_journal_after_opening_files(journal: Any, directory: str) -> None:
    files = open_files_writing_data(Path(directory), 16)
    journal.close()
    for f in files:
        f.close()


@pytest.mark.timeout(60)
def test_a_forked_child_closing_the_journal_leaves_its_own_files_alone(tmp_path: Path) -> None:
    from procqueue import Journal

    files = tmp_path / "files"
    files.mkdir()
    journal = Journal.open(tmp_path / "run.db", function_identity="test")
    try:
        child = multiprocessing.get_context("fork").Process(
            target=close_journal_after_opening_files, args=(journal, str(files)))
        child.start()
        child.join(30)
        assert child.exitcode == 0
    finally:
        journal.close()
    assert contents(files, 16) == [b"DATA"] * 16


# ---- 2. a pool made in a forked child works ---------------------------------------------------

def make_and_use_a_pool() -> None:
    with Pool(2) as pool:
        assert pool.map(square, range(7)) == [x * x for x in range(7)]
    pool.join()


@pytest.mark.timeout(60)
def test_a_child_forked_from_a_program_with_a_pool_makes_and_uses_its_own() -> None:
    with Pool(2) as parent_pool:  # the parent's fork server runs
        assert parent_pool.map(square, range(3)) == [0, 1, 4]
        child = multiprocessing.get_context("fork").Process(target=make_and_use_a_pool)
        child.start()
        child.join(30)
        assert child.exitcode == 0
        assert parent_pool.map(square, range(3)) == [0, 1, 4]  # the parent's pool still works
    parent_pool.join()


# ---- 3. close() lets each started worker finish its initializer ---------------------------

def slow_initializer(directory: str) -> None:
    time.sleep(0.3)
    Path(directory, f"initialized-{os.getpid()}").touch()


@pytest.mark.timeout(60)
def test_close_and_join_let_every_worker_finish_its_initializer(tmp_shared: Path) -> None:
    pool = Pool(4, slow_initializer, (str(tmp_shared),))
    pool.close()
    pool.join()
    assert len(list(tmp_shared.glob("initialized-*"))) == 4


# ---- 4. errors a multiprocessing user catches keep their type -----------------------------

def unpicklable_arguments() -> dict[str, Any]:
    return {"lock": threading.Lock(), "generator": (x for x in range(3)),
            "open file": open(os.devnull, "w")}  # cloudpickle copies a file open for reading


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["lock", "generator", "open file"])
def test_an_unpicklable_argument_is_a_type_error_as_in_multiprocessing(kind: str) -> None:
    argument = unpicklable_arguments()[kind]
    with Pool(2) as pool:
        with pytest.raises(TypeError) as apply_error:
            pool.apply_async(identity, (argument,)).get(timeout=30)
        with pytest.raises(TypeError) as map_error:
            pool.map(identity, [1, argument])
        assert pool.map(square, [3]) == [9]  # the pool is fine
    for error in (apply_error.value, map_error.value):
        assert isinstance(error, ArgumentSerializationError)
        assert error.input_repr is not None and error.index is not None
    assert map_error.value.index == 1


@pytest.mark.timeout(60)
def test_an_argument_whose_reduce_raises_surfaces_as_that_error() -> None:
    with Pool(2) as pool:
        with pytest.raises(RuntimeError, match="cannot pickle") as error:
            pool.map(square, [ReduceRaises()] * 3)
        with pytest.raises(ArgumentSerializationError):
            pool.apply(square, (ReduceRaises(),))
    assert isinstance(error.value, ArgumentSerializationError)
    assert isinstance(error.value.__cause__, RuntimeError)


@pytest.mark.timeout(60)
def test_the_remote_traceback_is_multiprocessings_with_tb() -> None:
    with Pool(1) as pool:
        with pytest.raises(ValueError) as error:
            pool.map(fail_on_three, range(5))
    cause = error.value.__cause__
    assert type(cause) is multiprocessing.pool.RemoteTraceback
    assert 'raise ValueError(f"bad item {x}")' in cause.tb
    assert "ValueError: bad item 3" in cause.tb


@pytest.mark.timeout(60)
def test_maybe_encoding_error_value_is_the_repr_of_the_unpicklable_result() -> None:
    with Pool(1) as pool:
        with pytest.raises(multiprocessing.pool.MaybeEncodingError) as error:
            pool.apply(return_a_lambda)
    assert "<lambda>" in error.value.value
    assert error.value.exc


# ---- 5. a task's exception keeps its message and notes -------------------------------------

@pytest.mark.timeout(60)
def test_a_tasks_exception_matches_as_it_does_with_multiprocessing() -> None:
    with Pool(2) as pool:
        with pytest.raises(ValueError, match="^bad item 3$") as error:
            pool.map(fail_on_three, range(5))
        with pytest.raises(ValueError, match="^bad item 3$"):
            pool.apply_async(fail_on_three, (3,)).get(timeout=30)
        with pytest.raises(ValueError, match="^bad item 3$"):
            pool.submit(fail_on_three, 3).result(timeout=30)
    exc = error.value
    assert getattr(exc, "__notes__", []) == []
    assert (exc.index, exc.input_repr, exc.attempts) == (3, "3", 1)
    assert isinstance(exc.pid, int)
    # who/where is still told: in the remote traceback printed right above the exception
    assert f"raised by task 3 (input 3) in worker pid {exc.pid}" in exc.__cause__.tb


# ---- 6. multiprocessing.set_start_method() is honoured -------------------------------------

START_METHOD_PROBE = """
    import multiprocessing, os, sys
    import procqueue

    SEEN = []

    def probe(_):
        # (forked from this program?, a global this program set after starting)
        return os.getppid() == int(os.environ["PROBE_PARENT"]), list(SEEN)

    if __name__ == "__main__":
        os.environ["PROBE_PARENT"] = str(os.getpid())
        how = sys.argv[1]
        if how == "implicit fork":
            multiprocessing.Queue()  # fixes multiprocessing's default context: no choice
        elif how != "none":
            multiprocessing.set_start_method(how)
        SEEN.append("set at run time")
        with procqueue.Pool(1) as pool:
            print(pool.map(probe, [0])[0])
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how, expected", [
    ("fork", (True, ["set at run time"])),  # a copy of the program: sees what it set
    ("spawn", (True, [])),  # a fresh interpreter started by the program
    ("forkserver", (False, [])),  # forked by the fork server, not by the program
    ("none", (False, [])),  # procqueue's default: forkserver
    ("implicit fork", (False, [])),  # multiprocessing fixed "fork" itself: not a choice
])
def test_the_start_method_the_program_set_is_used(how: str, expected: tuple[Any, ...],
                                                  tmp_path: Path) -> None:
    script = tmp_path / "probe.py"  # a script file: forkserver and spawn workers import it
    script.write_text(textwrap.dedent(START_METHOD_PROBE))
    run = subprocess.run([sys.executable, str(script), how], capture_output=True, text=True,
                         timeout=60, env=dict(os.environ, PYTHONPATH=str(HERE.parent)),
                         stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == repr(expected)


def numbers(n: int) -> Any:
    yield from range(n)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("chunksize", [1000, 2048, 5000])
def test_imap_over_a_generator_with_any_chunksize_completes(chunksize: int) -> None:
    # Whole chunks are held back until complete (see the CPython tests above): one larger
    # than the pool's input window must not wait forever for places the window never frees.
    with Pool(2) as pool:
        assert list(pool.imap(square, numbers(10_000), chunksize)) == [
            x * x for x in range(10_000)]


# ---- 7. a fixed chunksize cuts the input as multiprocessing's does ----------------------------

def pid_of(x: int) -> int:
    return os.getpid()


@pytest.mark.timeout(60)
def test_each_chunk_of_a_fixed_chunksize_runs_whole_in_one_worker() -> None:
    # More inputs than the pool posts to its supervisor in one go (4,096): a chunk that
    # straddled two posts went out as two batches, often to two workers, and the workers
    # that got the short pieces ran out of work while others still had whole chunks.
    n, chunksize = 40_000, 2_500
    for _ in range(4):  # whether a post is dispatched before the next one is a race
        with Pool(4) as pool:  # (likelier while the workers are still starting)
            pids = pool.map(pid_of, range(n), chunksize=chunksize)
        for start in range(0, n, chunksize):
            assert len(set(pids[start:start + chunksize])) == 1, (
                f"the chunk at {start} was split")


def slow_first_chunk(x: int) -> int:
    time.sleep(0.1 if x < 10 else 0.01)  # inputs 0-9, the first chunk: 1 s; the others 0.1 s
    return os.getpid()


@pytest.mark.timeout(60)
def test_no_chunk_waits_behind_a_slow_one_while_another_worker_has_nothing_to_do() -> None:
    # multiprocessing's workers take the next chunk when they are free.  A chunk sent ahead
    # to the busy worker with the slow first chunk waited there for a second while the other
    # worker, done with its own, sat idle.
    with Pool(2) as pool:
        pool.map(abs, range(8))  # both workers running
        pids = pool.map(slow_first_chunk, range(40), chunksize=10)
    slow_worker = pids[0]
    assert pids[:10] == [slow_worker] * 10
    assert slow_worker not in pids[10:], "a chunk waited behind the slow one"


def nap_then_pid(x: int) -> int:
    time.sleep(0.0005)
    return os.getpid()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("api", ["imap", "imap_unordered"])
@pytest.mark.parametrize("inputs", ["range", "generator"])
def test_imap_with_a_chunksize_gives_each_free_worker_a_whole_chunk(api: str,
                                                                    inputs: str) -> None:
    # Four chunks of 1,000 inputs on four workers: imap fed a range in groups of 256, which
    # could go out as pieces of chunks, and only two whole chunks fitted its input window
    # (2,048 inputs): the others waited for the first ones' results while workers sat idle.
    workers, chunksize = 4, 1_000
    items = range(workers * chunksize)
    if inputs == "generator":
        items = (x for x in items)
    with Pool(workers) as pool:
        pool.map(abs, range(4 * workers))  # every worker running
        pids = list(getattr(pool, api)(nap_then_pid, items, chunksize=chunksize))
    if api == "imap":  # (imap_unordered's results come in completion order)
        for start in range(0, len(pids), chunksize):
            assert len(set(pids[start:start + chunksize])) == 1, f"the chunk at {start} split"
    assert sorted(collections.Counter(pids).values()) == [chunksize] * workers, (
        "the chunks did not run one in each worker")


# ---- 8. an iterator's input starts as soon as it is produced --------------------------------

def _results_of(pool: Pool, api: str, items: Any) -> Any:
    if api == "imap_outcomes":
        return (outcome.value for outcome in pool.imap_outcomes(square, items))
    return getattr(pool, api)(square, items)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("api", ["imap", "imap_unordered", "imap_outcomes"])
def test_a_generator_may_wait_for_the_results_of_the_inputs_it_gave(api: str) -> None:
    # A feedback loop: each input is the last result plus one.  The feeder gathered an
    # iterator's inputs in groups and handed a group over only once the next input came,
    # so the first input waited for the second, which waited for the first's result: the
    # loop hung (multiprocessing.Pool.imap sends each input as it is produced).
    fed_back: "queue.Queue[int]" = queue.Queue()

    def feedback() -> Any:
        yield 2
        for _ in range(4):
            yield fed_back.get(timeout=20)  # raises Empty: ends the input with an error

    results = []
    with Pool(2) as pool:
        for result in _results_of(pool, api, feedback()):
            results.append(result)
            fed_back.put(result + 1)
    assert results == [4, 25, 676, 458329, 210066388900]


@pytest.mark.timeout(60)
def test_each_input_of_a_slow_generator_starts_before_the_next_is_produced() -> None:
    # A producer that makes an input every 0.3 s (a sensor, `tail -f`): each input's task
    # starts before the next input exists, not one input late.
    produced: list[float] = []

    def slowly() -> Any:
        for x in range(4):
            produced.append(time.monotonic())
            yield x
            time.sleep(0.3)

    with Pool(2) as pool:
        starts = [start for start, _ in pool.imap(stamp_start, slowly())]
    for x in range(3):
        assert starts[x] < produced[x + 1], f"input {x} started after input {x + 1} was made"


def stamp_start(x: int) -> tuple[float, int]:
    return time.monotonic(), x


@pytest.mark.timeout(60)
def test_cancelling_a_call_whose_generator_waits_ends_it_with_what_it_took() -> None:
    # imap_outcomes(...).cancel() ended the call only once the generator gave its next input
    # (`tail -f | procqueue map`, Ctrl-C: the command waited for the next line).
    # (imported here: scripts of this module's tests import it from the repository root,
    # where conftest is not a module)
    from conftest import cancel_after, inputs_then_wait

    release = threading.Event()
    try:
        with Pool(2) as pool:
            outcomes = pool.imap_outcomes(square, inputs_then_wait([1, 2, 3], release))
            first, rest, waited = cancel_after(outcomes, 3)
    finally:
        release.set()
    assert first == [1, 4, 9] and rest == []
    assert waited < 15, f"the cancelled call waited {waited:.1f} s for its generator"


@pytest.mark.timeout(60)
def test_a_halted_call_whose_generator_waits_ends_with_what_it_took() -> None:
    from conftest import inputs_then_wait  # (see the test above)

    release = threading.Event()
    try:
        with Pool(2) as pool:
            began = time.monotonic()
            outcomes = list(pool.imap_outcomes(fail_on_three, inputs_then_wait([1, 3], release),
                                               halt="now,fail=1"))
            waited = time.monotonic() - began
    finally:
        release.set()
    # (input 1 may be killed by the halt, "now", if it still runs: either way it has its one
    # outcome; the input the generator had not given is not one of the call's)
    assert [o.input for o in outcomes] == [1, 3] and not outcomes[1].ok
    assert waited < 15, f"the halted call waited {waited:.1f} s for its generator"


# ---- 9. a callable object's state travels with each call; integers of any kind -------------

class Scaler:
    def __init__(self, factor: int) -> None:
        self.factor = factor

    def __call__(self, x: int) -> int:
        return x * self.factor


def scaled(x: int, factors: list[int]) -> int:
    return x * factors[0]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("api", ["apply", "apply_async", "submit"])
def test_a_callable_objects_state_at_each_call_is_the_one_it_runs_with(api: str) -> None:
    # multiprocessing pickles the callable with each task: a callable instance (or a partial)
    # changed between two calls runs changed.  One pickle per object was kept: silently the
    # first state's results.
    import functools

    def call(pool: Any, fn: Any) -> Any:
        if api == "apply":
            return pool.apply(fn, (1,))
        if api == "apply_async":
            return pool.apply_async(fn, (1,)).get(timeout=20)
        return pool.submit(fn, 1).result(timeout=20)

    with Pool(2) as pool:
        scaler, factors = Scaler(2), [3]
        partial = functools.partial(scaled, factors=factors)
        assert (call(pool, scaler), call(pool, partial)) == (2, 3)
        scaler.factor, factors[0] = 10, 30
        assert (call(pool, scaler), call(pool, partial)) == (10, 30)


class Integer:
    """An integer that is not an int (numpy's int64 is one: Pool(np.int64(4)))."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value


@pytest.mark.timeout(60)
def test_processes_and_chunksize_may_be_any_integer_as_in_multiprocessing() -> None:
    with Pool(Integer(2), chunksize=Integer(3)) as pool:
        assert pool._processes == 2
        assert pool.map(abs, range(-5, 0), Integer(2)) == [5, 4, 3, 2, 1]
        assert list(pool.imap(abs, range(-3, 0), Integer(2))) == [3, 2, 1]
    for wrong in (True, 2.0, "2"):
        with pytest.raises((TypeError, ValueError)):
            Pool(wrong)


def worker_name(_: Any) -> tuple[str, tuple[int, ...]]:
    time.sleep(0.05)
    process = multiprocessing.current_process()
    return process.name, process._identity


@pytest.mark.timeout(60)
@pytest.mark.parametrize("context", [None, "spawn"])
def test_workers_are_named_as_multiprocessing_names_them(context: Any) -> None:
    # ForkServerPoolWorker-3: logs show it, and programs read a worker's number from it (a
    # GPU, a progress bar's row).  They were procqueue-worker-0, -1: a number off by one.
    prefix = "SpawnPoolWorker" if context == "spawn" else "ForkServerPoolWorker"
    with Pool(2, context=context) as pool:
        named = set(pool.map(worker_name, range(8), 1))
        listed = {process.name for process in pool._pool}
    assert named and {name for name, _ in named} <= listed
    assert {name for name, _ in named} == {f"{prefix}-{n}" for _, (n,) in named}


# ---- signals in what a task runs ---------------------------------------------------------------

def sigint_of_a_program_and_of_the_worker(_: Any) -> tuple[bool, bool]:
    """Whether a program the task runs gets Python's usual SIGINT handler, and whether a
    SIGINT sent to the worker itself left the task running."""
    import signal
    child = subprocess.run(
        [sys.executable, "-c",
         "import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"],
        capture_output=True, text=True, check=True)
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C is the supervisor's: the worker goes on
    time.sleep(0.05)
    return child.stdout.strip() == "True", True


@pytest.mark.timeout(60)
def test_programs_a_task_runs_get_sigint_as_usual() -> None:
    # The worker ignored SIGINT with SIG_IGN, which every program it ran inherited: a task's
    # `child.send_signal(SIGINT)` to stop a tool did nothing.
    with Pool(1) as pool:
        assert pool.apply(sigint_of_a_program_and_of_the_worker, (0,)) == (True, True)
