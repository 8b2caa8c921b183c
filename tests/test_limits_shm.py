"""The machine-wide limits in shared memory: named Semaphore, shared RateGate, Limit.open().

Cross-process promises are checked with separate interpreters (`python -c`) that record
facts (pid, monotonic timestamps: CLOCK_MONOTONIC is one clock for the whole machine) into
files under tmp_path; the test asserts the invariant from those records.  Every test uses a
unique name, unlinks it in a `finally`, and the `shm_name` fixture fails a test that leaves a
segment behind.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from procqueue.limits import START_SKEW_MARGIN_S, Limit, Rate, RateGate, Semaphore, _shm

CHILD_TIMEOUT_S = 20.0


@pytest.fixture
def shm_name() -> Iterator[str]:
    name = f"pqtest-{uuid.uuid4().hex[:12]}"
    yield name
    left = sorted(path.name for path in _shm.SHM_DIR.glob(f"*.{name}"))
    Semaphore.unlink_name(name)
    RateGate.unlink_name(name)
    assert not left, f"the test left shared segments behind: {left}"


@contextlib.contextmanager
def children(script: str, argvs: list[list[str]]) -> Iterator[list[subprocess.Popen[str]]]:
    """Start one `python -c script` per argv; kill and reap whatever is left on exit."""
    procs: list[subprocess.Popen[str]] = []
    try:
        for argv in argvs:
            procs.append(subprocess.Popen(
                [sys.executable, "-c", script, *argv],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            ))
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=CHILD_TIMEOUT_S)  # reaps, closes the pipes


def wait_for_line(proc: subprocess.Popen[str], expected: str) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line == expected, f"child {proc.pid} said {line!r}, expected {expected!r}"


def start_together(procs: list[subprocess.Popen[str]]) -> None:
    """Wait until every child is ready, then release them all at once."""
    for proc in procs:
        wait_for_line(proc, "ready")
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()


def finish(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        proc.communicate(timeout=CHILD_TIMEOUT_S)
        assert proc.returncode == 0, f"child {proc.pid} exited with {proc.returncode}"


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    # At equal times an end sorts before a start: touching intervals do not overlap.
    events = sorted([(t_end, -1) for _, t_end in intervals]
                    + [(t_start, +1) for t_start, _ in intervals])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


# -- Semaphore: across processes ---------------------------------------------------------

_HOLDER_LOOP = r"""
import os, sys, time
from procqueue.limits import Semaphore
name, rounds, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sem = Semaphore(name, 2)
print("ready", flush=True)
sys.stdin.readline()
records = []
for _ in range(rounds):
    with sem:
        t_start = time.monotonic()  # after acquire returned ...
        time.sleep(0.002)
        t_end = time.monotonic()    # ... and before release: inside the held interval
    records.append(f"{os.getpid()} {t_start!r} {t_end!r}\n")
sem.close()
with open(out, "w") as f:
    f.writelines(records)
"""


def test_never_more_holders_than_value_across_processes(shm_name: str, tmp_path: Path) -> None:
    outs = [tmp_path / f"holder{i}.txt" for i in range(3)]
    try:
        with children(_HOLDER_LOOP, [[shm_name, "30", str(out)] for out in outs]) as procs:
            start_together(procs)
            finish(procs)
        records = [line.split() for out in outs for line in out.read_text().splitlines()]
        assert len(records) == 90
        assert len({pid for pid, _, _ in records}) == 3
        intervals = [(float(t_start), float(t_end)) for _, t_start, t_end in records]
        assert max_overlap(intervals) == 2  # never 3; and 2 did run at once
    finally:
        Semaphore.unlink_name(shm_name)


_HOLD_FOREVER = r"""
import sys, time
from procqueue.limits import Semaphore
sem = Semaphore(sys.argv[1], 1)
sem.acquire()
print("held", flush=True)
time.sleep(60)
"""


def test_sigkilled_holder_permit_is_reclaimed_within_a_second(shm_name: str) -> None:
    sem = Semaphore(shm_name, 1)
    try:
        with children(_HOLD_FOREVER, [[shm_name]]) as (holder,):
            wait_for_line(holder, "held")
            assert sem.statistics().holders == (holder.pid,)
            assert not sem.acquire_nowait()
            os.kill(holder.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            # Not reaped yet: the dead holder is a zombie, and must count as dead.
            assert sem.acquire(timeout=1.0)
            assert time.monotonic() - killed_at < 1.0
            assert sem.statistics().holders == (os.getpid(),)
        sem.release()
    finally:
        sem.close()
        sem.unlink()


def test_permit_of_a_reused_pid_is_reclaimed(shm_name: str) -> None:
    # A holder that died, whose pid now belongs to another (live) process: this one.
    me = _shm.current_identity()
    ghost = _shm.ProcessIdentity(me.pid, me.start_time - 1000.0)
    sem = Semaphore(shm_name, 1)
    try:
        with sem._segment.locked() as mapping:  # forge the slot through the layout view
            _shm.SemaphoreSlots(mapping, 1).write(0, ghost)
        assert not _shm.is_alive(ghost)
        assert sem.acquire_nowait()
        assert sem.statistics().held == 1
        sem.release()
    finally:
        sem.close()
        sem.unlink()


def test_a_holder_stays_alive_when_the_kernels_boot_time_steps(
        shm_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel's boot time (/proc/stat btime, which psutil adds to start times) steps by a
    second when the wall clock is adjusted; a holder identified with it then looked dead, and
    a forked child took the permit its live parent held (a CI failure of 2026-12-04)."""
    psutil_linux = pytest.importorskip("psutil._pslinux")
    sem = Semaphore(shm_name, 1)
    try:
        assert sem.acquire_nowait()
        stepped = psutil_linux.boot_time() + 1.0
        monkeypatch.setattr(psutil_linux, "boot_time", lambda: stepped)
        assert _shm.is_alive(_shm.current_identity())
        child = multiprocessing.get_context("fork").Process(
            target=_forked_child_sees_parents_permit, args=(sem,))
        child.start()
        child.join(CHILD_TIMEOUT_S)
        assert child.exitcode == 0  # the step is inherited: the child still sees the holder
    finally:
        sem.close()
        sem.unlink()


def test_an_identity_written_by_an_earlier_procqueue_is_still_read() -> None:
    """Earlier versions wrote start times since the epoch (psutil's create_time)."""
    import psutil

    me = _shm.ProcessIdentity(os.getpid(), psutil.Process().create_time())
    assert _shm.is_alive(me)
    assert _shm.is_alive(_shm.ProcessIdentity(me.pid, me.start_time + 1.0))  # a btime step
    assert not _shm.is_alive(_shm.ProcessIdentity(me.pid, me.start_time - 1000.0))  # reused
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    assert not _shm.is_alive(_shm.ProcessIdentity(exited.pid, me.start_time))


def _forked_child_sees_parents_permit(sem: Semaphore) -> None:
    took = sem.acquire_nowait()
    sem.close()  # must not release the parent's permit: it is not this process's
    os._exit(3 if took else 0)


def test_forked_child_does_not_share_its_parents_permits(shm_name: str) -> None:
    sem = Semaphore(shm_name, 1)
    try:
        assert sem.acquire_nowait()
        child = multiprocessing.get_context("fork").Process(
            target=_forked_child_sees_parents_permit, args=(sem,))
        child.start()
        child.join(CHILD_TIMEOUT_S)
        assert child.exitcode == 0
        assert sem.statistics().holders == (os.getpid(),)
    finally:
        sem.close()
        sem.unlink()


# -- Semaphore: in one process ------------------------------------------------------------


def test_permits_are_counted_per_process(shm_name: str) -> None:
    first, second = Semaphore(shm_name, 2), Semaphore(shm_name, 2)
    try:
        assert first.acquire_nowait()
        assert second.acquire_nowait()
        assert not first.acquire_nowait()
        assert first.acquire(timeout=0.02) is False
        stats = second.statistics()
        assert (stats.name, stats.value, stats.held) == (shm_name, 2, 2)
        assert stats.holders == (os.getpid(), os.getpid())
        second.release()  # any object of the holding process may release
        second.release()
        assert first.statistics().held == 0
        with pytest.raises(RuntimeError, match="holds none of its permits"):
            first.release()
    finally:
        first.close()
        second.close()
        first.unlink()


def test_context_manager_acquires_and_releases(shm_name: str) -> None:
    sem = Semaphore(shm_name, 1)
    try:
        with sem:
            assert sem.statistics().held == 1
        assert sem.statistics().held == 0
    finally:
        sem.close()
        sem.unlink()


def test_close_releases_the_permits_it_holds(shm_name: str) -> None:
    sem, other = Semaphore(shm_name, 3), Semaphore(shm_name, 3)
    try:
        assert sem.acquire_nowait() and sem.acquire_nowait()
        sem.close()
        sem.close()  # idempotent
        assert other.statistics().held == 0
        with pytest.raises(ValueError, match="is closed"):
            sem.acquire_nowait()
    finally:
        other.close()
        other.unlink()


def test_value_mismatch_names_both_values(shm_name: str) -> None:
    sem = Semaphore(shm_name, 2)
    try:
        with pytest.raises(ValueError, match=r"value=2.*value=3"):
            Semaphore(shm_name, 3)
    finally:
        sem.close()
        sem.unlink()


def test_unlink_removes_the_name(shm_name: str) -> None:
    sem = Semaphore(shm_name, 1)
    path = _shm.segment_path(_shm.SegmentKind.SEMAPHORE, shm_name)
    assert path.exists()
    assert sem.acquire_nowait()
    assert sem.unlink() is True
    assert not path.exists()
    assert Semaphore.unlink_name(shm_name) is False
    fresh = Semaphore(shm_name, 5)  # a new segment: other value allowed, all permits free
    try:
        assert fresh.statistics().held == 0
    finally:
        fresh.close()
        fresh.unlink()
        sem.close()


def test_pickles_by_name(shm_name: str) -> None:
    sem = Semaphore(shm_name, 1)
    copy: Semaphore = pickle.loads(pickle.dumps(sem))
    try:
        assert sem.acquire_nowait()
        assert copy.statistics().holders == (os.getpid(),)
    finally:
        sem.close()
        copy.close()
        sem.unlink()


@pytest.mark.parametrize(
    ("name", "value", "error", "message"),
    [
        ("ok", 0, ValueError, "value must be >= 1"),
        ("ok", -1, ValueError, "value must be >= 1"),
        ("ok", 1.5, TypeError, "value must be an int"),
        ("ok", True, TypeError, "value must be an int"),
        ("", 1, ValueError, "limit name must be 1-200 characters"),
        ("a/b", 1, ValueError, "limit name must be 1-200 characters"),
        (".hidden", 1, ValueError, "starting with a letter or digit"),
        ("x" * 201, 1, ValueError, "limit name must be 1-200 characters"),
        (3, 1, TypeError, "limit name must be a str"),
    ],
)
def test_semaphore_validation(name: object, value: object, error: type[Exception],
                              message: str) -> None:
    with pytest.raises(error, match=message):
        Semaphore(name, value)  # type: ignore[arg-type]


def test_acquire_rejects_a_negative_timeout(shm_name: str) -> None:
    sem = Semaphore(shm_name, 1)
    try:
        with pytest.raises(ValueError, match="timeout must be >= 0"):
            sem.acquire(timeout=-1)
    finally:
        sem.close()
        sem.unlink()


# -- RateGate shared by name ---------------------------------------------------------------

_RATE_CLIENT = r"""
import sys, time
from procqueue.limits import RateGate
name, limit, period_s, starts, out = sys.argv[1:6]
reading = [0.0]
def clock():
    # The gate reads its clock exactly once per try_acquire(), under the machine-wide
    # lock, and records that reading as the start: keep it to report the exact grant time.
    reading[0] = time.monotonic()
    return reading[0]
gate = RateGate(int(limit), float(period_s), name=name, clock=clock)
print("ready", flush=True)
sys.stdin.readline()
grants = []
while len(grants) < int(starts):
    wait_s = gate.try_acquire()
    if wait_s == 0.0:
        grants.append(reading[0])
    else:
        time.sleep(wait_s)
gate.close()
with open(out, "w") as f:
    f.writelines(f"{g!r}\n" for g in grants)
"""


def test_shared_rate_gate_never_exceeds_limit_across_processes(shm_name: str,
                                                                tmp_path: Path) -> None:
    limit, period_s, starts_each = 5, 0.4, 10
    outs = [tmp_path / f"client{i}.txt" for i in range(2)]
    argvs = [[shm_name, str(limit), str(period_s), str(starts_each), str(out)] for out in outs]
    try:
        with children(_RATE_CLIENT, argvs) as procs:
            start_together(procs)
            finish(procs)
        grants = sorted(float(line) for out in outs for line in out.read_text().split())
        assert len(grants) == 2 * starts_each
        for i in range(len(grants) - limit):
            assert grants[i] + period_s <= grants[i + limit], (i, grants)  # as the gate adds
        # No under-use: 20 starts at 5 per 0.4 s need 3 periods after the first start.
        assert grants[-1] - grants[0] < 3 * period_s + 0.5
    finally:
        RateGate.unlink_name(shm_name)


def test_shared_rate_gate_mismatch_names_both_values(shm_name: str) -> None:
    gate = RateGate(5, 1.0, name=shm_name)
    try:
        with pytest.raises(ValueError, match=r"limit=5, period_s=1.0.*limit=5, period_s=2.0"):
            RateGate(5, 2.0, name=shm_name)
    finally:
        gate.close()
        gate.unlink()


def test_shared_rate_gate_window_is_shared_by_openers(shm_name: str) -> None:
    first = RateGate(2, 10.0, name=shm_name)
    second: RateGate = pickle.loads(pickle.dumps(first))
    try:
        assert first.try_acquire(now=100.0) == 0.0
        assert second.try_acquire(now=101.0) == 0.0
        assert first.try_acquire(now=102.0) == pytest.approx(8.0)
        assert second.statistics(now=102.0).starts_in_window == 2
        assert second.try_acquire(now=110.0) == 0.0
    finally:
        first.close()
        second.close()
        first.unlink()


# -- Limit.open(): the live handle ------------------------------------------------------------


def test_limit_handle_takes_permit_and_start_together(shm_name: str) -> None:
    limit = Limit(shm_name, concurrency=1, rate=Rate(2, per=60))
    with limit.open() as handle:
        try:
            t0 = time.monotonic()  # statistics() below reads the real clock
            assert handle.try_acquire(now=t0) == 0.0
            assert handle.try_acquire(now=t0) == Semaphore.retry_interval_s  # permit busy
            handle.release()
            assert handle.try_acquire(now=t0 + 1.0) == 0.0
            handle.release()
            # The rate refuses the third start: the permit taken for it is given back.
            # Limit gates widen their window by START_SKEW_MARGIN_S (dispatch-to-start skew).
            assert handle.try_acquire(now=t0 + 2.0) == pytest.approx(58.0 + START_SKEW_MARGIN_S)
            stats = handle.statistics()
            assert stats.semaphore is not None and stats.semaphore.held == 0
            assert stats.rate_gate is not None and stats.rate_gate.starts_in_window == 2
        finally:
            handle.unlink()


def test_limit_handle_acquire_blocks_for_the_permit(shm_name: str) -> None:
    with Limit(shm_name, concurrency=1).open() as handle:
        try:
            assert handle.rate_gate is None
            assert handle.acquire(timeout=0.1)
            assert handle.acquire(timeout=0.02) is False
            handle.release()
            assert handle.acquire(timeout=0)
            handle.release()
        finally:
            handle.unlink()
