"""A task that runs long (or hangs, with no timeout) keeps only itself from finishing, as with
multiprocessing's shared queue: what a worker held behind it goes back and runs on another
worker (procqueue/give_back.py), and nothing runs twice."""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from procqueue import Pool

HANGS = 3  # the input that runs long


def run_once(args):
    """Records each run of an input (a file per run), then returns it; HANGS sleeps.  A dict
    (not plain data) travels in a batch of tasks, a number or a tuple in a block."""
    if isinstance(args, dict):
        args = (args["dir"], args["x"])
    directory, x = args if isinstance(args, tuple) else (None, args)
    if directory is not None:
        with open(os.path.join(directory, f"{x}-{os.getpid()}-{time.monotonic_ns()}"), "w"):
            pass
    if x == HANGS:
        time.sleep(60)
    return x


def runs_of(directory: Path) -> dict[int, int]:
    counts: dict[int, int] = {}
    for name in os.listdir(directory):
        x = int(name.split("-")[0])
        counts[x] = counts.get(x, 0) + 1
    return counts


def quick(x):
    return x


@pytest.mark.timeout(60)
@pytest.mark.parametrize("measured", [False, True], ids=["new-function", "measured-tiny"])
def test_futures_behind_a_task_that_hangs_finish_on_the_other_worker(tmp_path, measured):
    with Pool(2) as pool:
        if measured:  # batches of many tasks then, and one batch ahead per worker
            pool.map(run_once, [(None, x) for x in range(100, 400)])
        futures = [pool.submit(run_once, (str(tmp_path), x)) for x in range(40)]
        others = [f for i, f in enumerate(futures) if i != HANGS]
        done, not_done = concurrent.futures.wait(others, timeout=30)
        assert not not_done, f"{len(not_done)} futures still waiting behind the task that hangs"
        assert [f.result() for f in others] == [x for x in range(40) if x != HANGS]
        assert not futures[HANGS].done()
        runs = runs_of(tmp_path)
    assert runs == {x: 1 for x in range(40)}  # every input ran, and only once


@pytest.mark.timeout(60)
@pytest.mark.parametrize("api", ["imap_unordered-objects", "imap_outcomes-numbers"])
def test_every_other_result_comes_while_one_input_hangs(tmp_path, api):
    # tuples travel as batches of tasks, numbers as blocks: a timed block (imap_outcomes)
    # looks before each input after one that ran long
    with Pool(2) as pool:
        pool.map(quick, range(300))  # measured tiny: many inputs per batch
        if api.startswith("imap_unordered"):
            it = pool.imap_unordered(run_once, [{"dir": str(tmp_path), "x": x}
                                                for x in range(200)])
            got = [it.next(timeout=30) for _ in range(199)]
        else:
            outcomes = pool.imap_outcomes(run_once, range(200), ordered=False)
            got = [next(outcomes).value for _ in range(199)]
        assert sorted(got) == [x for x in range(200) if x != HANGS]
        if api.startswith("imap_unordered"):
            assert runs_of(tmp_path) == {x: 1 for x in range(200)}


@pytest.mark.timeout(60)
def test_an_untimed_block_keeps_at_most_the_rest_of_its_stretch_behind_an_input_that_hangs():
    # imap's blocks look between stretches of inputs (no clock per input): the inputs of the
    # stretch after the one that hangs wait for it; every other input's result comes
    from procqueue.worker import UNTIMED_CHECK_MAX

    with Pool(2) as pool:
        pool.map(quick, range(300))
        it = pool.imap_unordered(run_once, range(2000))
        got = set()
        try:
            while True:
                got.add(it.next(timeout=5))
        except multiprocessing.TimeoutError:
            pass
    missing = sorted(set(range(2000)) - got)
    assert missing[0] == HANGS and missing == list(range(HANGS, HANGS + len(missing)))
    assert len(missing) <= UNTIMED_CHECK_MAX


@pytest.mark.timeout(60)
def test_ordered_map_of_a_long_input_still_gets_every_result(tmp_path):
    # The inputs given back run elsewhere; the call's results keep their order
    def sleepy(x):
        time.sleep(1.0 if x == 5 else 0.0)
        return x * 2

    with Pool(2) as pool:
        pool.map(quick, range(300))
        assert pool.map(sleepy, range(100)) == [x * 2 for x in range(100)]
        stats = pool.stats()
    assert stats.tasks_succeeded == 300 + 100 and stats.tasks_failed == 0
