"""The benchmark harness measures what it claims: its memory sampler sees the whole process
tree.  (Timings themselves are never asserted: they belong in bench/.)"""
from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

from bench_modules import load_bench_module

linux_proc = pytest.mark.skipif(not Path("/proc/self/task").is_dir(),
                                reason="walks /proc/PID/task/TID/children (Linux)")


def _harness():
    return load_bench_module("harness.py")


def _sleeper_with_grandchild() -> subprocess.Popen:
    code = ("import subprocess, sys, time; "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); "
            "print('ready', flush=True); time.sleep(30)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    return child


@linux_proc
def test_tree_walk_finds_children_grandchildren_and_those_forked_by_other_threads() -> None:
    harness = _harness()
    started: list[subprocess.Popen] = []
    # One child from the main thread, one from a thread still alive while we look (as the
    # pool's supervisor thread starts the fork server): listed under that thread only.
    started.append(_sleeper_with_grandchild())
    forked, done = threading.Event(), threading.Event()

    def fork_and_stay() -> None:
        started.append(_sleeper_with_grandchild())
        forked.set()
        done.wait(30)

    thread = threading.Thread(target=fork_and_stay)
    thread.start()
    assert forked.wait(30)
    try:
        me = psutil.Process()
        expected = {me.pid} | {p.pid for p in me.children(recursive=True)}
        assert len(expected) >= 5  # us, two children, two grandchildren
        assert set(harness.tree_pids_by_proc(me.pid)) == expected
        sampler = harness.TreeRssSampler()
        psutil_view = sampler._tree_rss_psutil()
        assert sampler.sample() == pytest.approx(psutil_view, rel=0.1)
    finally:
        done.set()
        thread.join()
        for child in started:
            for proc in psutil.Process(child.pid).children(recursive=True):
                proc.kill()
            child.kill()
            child.wait()


def test_worker_idle_splits_each_workers_idle_time_by_when_it_happened() -> None:
    """bench/worker_idle.py: two workers over a 10 s call; the shares of 2 x 10 s add up to
    one and each gap lands in the part of the call it happened in."""
    idle_parts = load_bench_module("worker_idle.py").idle_parts
    # worker 1: .2 s before its first task, gaps of .1 (ramp: the first 1 s), .5 (steady)
    # and .5 (tail: the last 1 s), .2 s after its last; worker 2 busy all along
    stamps = [(1, 0.2, 0.5), (1, 0.6, 5.0), (1, 5.5, 9.0), (1, 9.5, 9.8), (2, 0.0, 10.0)]
    parts = idle_parts(stamps, 0.0, 10.0, jobs=2)
    assert parts["busy"] == pytest.approx((0.3 + 4.4 + 3.5 + 0.3 + 10.0) / 20)
    assert parts["start"] == pytest.approx(0.2 / 20)
    assert parts["ramp"] == pytest.approx(0.1 / 20)
    assert parts["steady"] == pytest.approx(0.5 / 20)
    assert parts["tail"] == pytest.approx(0.5 / 20)
    assert parts["end"] == pytest.approx(0.2 / 20)
    total = sum(parts[p] for p in ("busy", "start", "ramp", "steady", "tail", "end"))
    assert total == pytest.approx(1.0)
    assert idle_parts(stamps[:4], 0.0, 10.0, jobs=2)["start"] == pytest.approx(10.2 / 20)


def test_worker_idle_counts_how_late_the_tasks_ended_and_how_much_of_it_in_the_tail() -> None:
    """bench/worker_idle.py: a task's time beyond what it asked for is `late`, the part of it
    in tasks that started in the last 10% of the call is also `late_tail`; a task that took
    less than it asked for counts nothing."""
    idle_parts = load_bench_module("worker_idle.py").idle_parts
    # one worker, a 20 s call (its last 10%: from 18 s), tasks that ask for 1 s: 0.5 s late
    # at the start, one on time, one that ended early, 0.5 s late before the tail and
    # 0.25 s late in it
    stamps = [(1, 0.0, 1.5), (1, 2.0, 3.0), (1, 4.0, 4.8), (1, 16.0, 17.5), (1, 18.5, 19.75)]
    parts = idle_parts(stamps, 0.0, 20.0, jobs=1, task_s=1.0)
    assert parts["late"] == pytest.approx((0.5 + 0.5 + 0.25) / 20)
    assert parts["late_tail"] == pytest.approx(0.25 / 20)
    assert parts["busy"] == pytest.approx((1.5 + 1.0 + 0.8 + 1.5 + 1.25) / 20)
