"""Drop-in fidelity: what a multiprocessing.Pool user relies on, one test per bug a new user
hit (issue #19).  CPython's own Pool tests run in test_cpython_pool.py."""
from __future__ import annotations

import gc
import multiprocessing
import multiprocessing.pool
import os
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
