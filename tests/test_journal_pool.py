"""Pool(journal=...): a resumed map/imap recomputes nothing that an earlier run finished, and
reports every input exactly once, in order."""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from procqueue import Journal, JournalMismatchError, Pool, TaskCancelledError


def counted_square(args):
    log, x = args
    with open(log, "a") as f:
        f.write(f"{x}\n")
    if x == 13:
        raise ValueError("thirteen")
    return x * x


def other(args):
    return 0


def calls(log):
    return [int(line) for line in Path(log).read_text().split()] if os.path.exists(log) else []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("api", ["map", "imap", "imap_unordered"])
def test_resumed_run_recomputes_nothing_done(tmp_path, api):
    log, db = str(tmp_path / "calls"), str(tmp_path / "run.db")
    first = [(log, x) for x in range(10)]
    everything = [(log, x) for x in range(20)]

    def run(items):
        with Pool(2, journal=db) as pool:
            if api == "map":
                return pool.map(counted_square, items, return_exceptions=True)
            return list(getattr(pool, api)(counted_square, items, errors="return"))

    assert sorted(run(first)) == sorted(x * x for x in range(10))
    assert sorted(calls(log)) == list(range(10))
    out = run(everything)
    values = sorted((v for v in out if not isinstance(v, Exception)))
    assert values == sorted(x * x for x in range(20) if x != 13)
    assert [type(v) for v in out if isinstance(v, Exception)] == [ValueError]
    assert sorted(calls(log)) == list(range(20))  # 0-9 were not run again
    with Journal.read(db) as journal:
        summary = journal.summary()
    assert (summary.done, summary.failed) == (19, 1)


@pytest.mark.timeout(60)
def test_a_different_function_is_refused(tmp_path):
    db = str(tmp_path / "run.db")
    with Pool(1, journal=db) as pool:
        pool.map(counted_square, [(str(tmp_path / "c"), 1)])
    with Pool(1, journal=db) as pool:
        with pytest.raises(JournalMismatchError):
            pool.map(other, [1])


def fail_on_zero(args):
    log, x = args
    if x == 0:
        raise ValueError("zero")
    with open(log, "a") as f:
        f.write(f"{x}\n")
    return x


@pytest.mark.timeout(60)
def test_inputs_a_halt_cancelled_are_pending_and_the_next_run_runs_them(tmp_path):
    log, db = str(tmp_path / "calls"), str(tmp_path / "run.db")
    items = [(log, x) for x in range(30)]
    with Pool(1, journal=db) as pool:
        first = pool.map(fail_on_zero, items, return_exceptions=True, halt="now,fail=1")
    cancelled = [i for i, v in enumerate(first) if isinstance(v, TaskCancelledError)]
    assert len(cancelled) >= 20
    with Journal.read(db) as journal:
        assert journal.summary().pending == len(cancelled)
    with Pool(1, journal=db) as pool:
        again = pool.map(fail_on_zero, items, return_exceptions=True)
    assert isinstance(again[0], ValueError) and again[1:] == list(range(1, 30))
    assert sorted(calls(log)) == list(range(1, 30))  # each ran to its end once in all


def unique_call(args):
    log, x = args
    with open(log, "a") as f:
        f.write(f"{x}\n")
    return f"{x}:{uuid.uuid4().hex}"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("api", ["map", "imap"])
def test_each_occurrence_of_a_repeated_input_is_a_task_of_its_own(tmp_path, api):
    log, db = str(tmp_path / "calls"), str(tmp_path / "run.db")

    def run(items):
        with Pool(2, journal=db) as pool:
            return list(getattr(pool, api)(unique_call, items))

    first = run([(log, 7)] * 3)
    assert len(set(first)) == 3
    assert run([(log, 7)] * 4)[:3] == first  # the three replayed in order, one more ran
    assert calls(log) == [7] * 4
    with Journal.read(db) as journal:
        assert journal.summary().done == 4


# A program of the user's: its function uses a class and a helper it defines (cloudpickle
# copies those by value, under an id drawn in each process).
PROGRAM = """
import sys
from dataclasses import dataclass
from procqueue import JournalMismatchError, Pool

@dataclass
class Scale:
    factor: int = 3

SCALE = Scale()

def log_call(x):
    with open(sys.argv[2], "a") as f:
        f.write(f"{{x}}\\n")

def process(x):
    log_call(x)
    return x * SCALE.factor{change}

if __name__ == "__main__":
    try:
        with Pool(2, journal=sys.argv[1]) as pool:
            print(sum(pool.map(process, range(10))))
    except JournalMismatchError:
        print("mismatch")
"""


@pytest.mark.timeout(120)
def test_a_comment_added_to_the_program_does_not_refuse_the_journal(tmp_path):
    import subprocess
    import sys

    program, db, log = tmp_path / "program.py", str(tmp_path / "run.db"), tmp_path / "calls"

    def run(source):
        program.write_text(source)
        done = subprocess.run([sys.executable, str(program), db, str(log)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert run(PROGRAM.format(change="")) == "135"
    commented = "# tuned on the 3rd\n\n" + PROGRAM.format(change="  # times the factor")
    assert run(commented) == "135"  # resumed: nothing ran again
    assert sorted(calls(str(log))) == list(range(10))
    assert run(PROGRAM.format(change=" + 1")) == "mismatch"  # the code changed: refused
