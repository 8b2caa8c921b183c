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
