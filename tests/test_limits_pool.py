"""Issue #4 end to end: limits enforced on a real pool, checked from timestamps every task
records itself (start, end, pid) — never from sleeps and hope."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from procqueue import Pool, Queue, Rate
from procqueue.limits import RateGate, Semaphore

HOLD_S = 0.05  # how long each recorded task runs


def record(x):
    start = time.time()
    time.sleep(HOLD_S)
    return x, start, time.time()


def max_overlap(spans):
    """The most spans running at one instant (ends before starts at equal times)."""
    events = sorted([(s, 1) for s, e in spans] + [(e, -1) for s, e in spans],
                    key=lambda ev: (ev[0], ev[1]))
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


def max_starts_in_window(starts, period_s):
    starts = sorted(starts)
    return max(sum(1 for t in starts if a <= t < a + period_s) for a in starts)


def spans_of(results):
    return [(s, e) for _, s, e in results]


@pytest.fixture
def limit_name():
    name = f"pq-test-{uuid.uuid4().hex[:10]}"
    yield name
    Semaphore.unlink_name(name)
    RateGate.unlink_name(name)


@pytest.mark.timeout(30)
def test_pool_concurrency_never_exceeds_k():
    with Pool(4, concurrency=2) as pool:
        results = pool.map(record, range(16))
    assert max_overlap(spans_of(results)) == 2
    assert [x for x, _, _ in results] == list(range(16))


@pytest.mark.timeout(30)
def test_call_concurrency_and_pool_keep_serving_other_calls():
    with Pool(3) as pool:
        limited = pool.map_async(record, range(8), concurrency=1)
        free = pool.map(record, range(6))
        limited_results = limited.get(timeout=20)
    assert max_overlap(spans_of(limited_results)) == 1
    assert len(free) == 6  # the limited call did not hold workers it could not use


@pytest.mark.timeout(30)
def test_concurrency_one_starts_in_input_order():
    with Pool(3, concurrency=1) as pool:
        results = pool.map(record, range(10))
    starts = [s for _, s, _ in results]
    assert starts == sorted(starts)
    assert max_overlap(spans_of(results)) == 1


@pytest.mark.timeout(30)
def test_rate_gate_never_more_than_l_starts_per_window_and_no_underuse():
    with Pool(4, rate=Rate(10, per=0.5)) as pool:
        t0 = time.time()
        results = pool.map(record, range(30))
        elapsed = time.time() - t0
    starts = [s for _, s, _ in results]
    assert max_starts_in_window(starts, 0.5) <= 10
    # 30 starts at 10 per 0.5 s: the third ten can start at ~1.0 s; a fixed-bucket or
    # one-at-a-time gate would take far longer
    assert elapsed < 3.0


@pytest.mark.timeout(30)
def test_named_queue_has_its_own_limits():
    with Pool(4, queues={"io": Queue(concurrency=1), "fast": Queue(rate="20/s")}) as pool:
        io = pool.map_async(record, range(6), queue="io")
        fast = pool.map(record, range(10), queue="fast")
        assert max_overlap(spans_of(io.get(timeout=20))) == 1
        assert max_starts_in_window([s for _, s, _ in fast], 1.0) <= 20
        with pytest.raises(ValueError, match="unknown queue"):
            pool.map(record, [1], queue="nope")


@pytest.mark.timeout(30)
def test_key_concurrency_and_fairness_between_keys():
    items = [("big", i) for i in range(30)] + [("small", i) for i in range(3)]
    with Pool(2) as pool:
        results = pool.map(record, items, key=lambda item: item[0], key_concurrency=1)
    by_key = {"big": [], "small": []}
    for (key, _), start, end in results:
        by_key[key].append((start, end))
    assert max_overlap(by_key["big"]) == 1 and max_overlap(by_key["small"]) == 1
    # round-robin between keys: the 3 small tasks do not wait behind 30 big ones
    last_small = max(s for s, _ in by_key["small"])
    big_before = sum(1 for s, _ in by_key["big"] if s < last_small)
    assert big_before <= 6


def meet_another(spec):
    """A task that waits (at most 5 s) until another task is running too: True if it met one.
    (folder, x) with x < 0 returns at once (teaches the pool that the function is short)."""
    folder, x = spec
    if x < 0:
        return True
    open(os.path.join(folder, f"started-{x}"), "w").close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if len(os.listdir(folder)) >= 2:
            return True
        time.sleep(0.002)
    return False


@pytest.mark.timeout(60)
def test_short_tasks_of_few_keys_still_spread_over_the_workers(tmp_path):
    """A batch holds its tasks' places under their keys until each ends, while they run one
    after another in its worker: batches sized for short tasks took every key's place into
    one worker and ran a keyed call on one worker at a time (4 keys of 1 on 4 workers ran
    at a quarter of the speed).  Each worker gets its share: the first tasks meet."""
    folder = str(tmp_path)
    with Pool(4) as pool:
        assert all(pool.map(meet_another, [(folder, -1)] * 2000))  # short: big batches
        met = pool.map(meet_another, [(folder, x) for x in range(4)],
                       key=lambda spec: spec[1] % 4, key_concurrency=1)
    assert met == [True] * 4


def record_short(item):
    start = time.time()
    time.sleep(0.001)
    return item, start, time.time()


@pytest.mark.timeout(60)
def test_batches_of_short_keyed_tasks_keep_each_key_under_its_cap():
    """A batch holds one place per key it has tasks of, shared by them (they run one after
    another in its worker): however batches are filled, no key ever runs more than its cap
    at once, and every task has exactly one outcome."""
    items = [(key, i) for i in range(300) for key in ("a", "b")]
    with Pool(4) as pool:
        pool.map(record_short, [("warm", i) for i in range(2000)])  # short: big batches
        results = pool.map(record_short, items, key=lambda item: item[0], key_concurrency=2)
    assert [item for item, _, _ in results] == items
    for key in ("a", "b"):
        spans = [(start, end) for (k, _), start, end in results if k == key]
        assert max_overlap(spans) <= 2
    assert max_overlap([(start, end) for _, start, end in results]) >= 2  # not one at a time


@pytest.mark.timeout(60)
def test_workers_that_keep_their_keys_places_still_run_each_key_one_at_a_time():
    """As many keys of one as workers: every place is held, so a busy worker's next batch
    takes more tasks of its own keys in their places.  Each key still runs one task at a
    time (from each task's recorded start and end), every task has exactly one outcome, and
    the keys run side by side."""
    with Pool(4) as pool:
        pool.map(record_short, [("warm", i) for i in range(2000)])  # short: big batches
        items = [(key, i) for i in range(250) for key in range(4)]
        results = list(pool.imap(record_short, items, key=lambda item: item[0],
                                 key_concurrency=1))
    assert [item for item, _, _ in results] == items
    for key in range(4):
        assert max_overlap([(start, end) for (k, _), start, end in results if k == key]) == 1
    assert max_overlap([(start, end) for _, start, end in results]) >= 3


def echo(value):
    return value


MIXED_INPUTS = [1, "x" * 200_000, b"\x00\xff" * 10, None, 2.5, True, 3j, (1, "a"), -7,
                {"not": "primitive"}, [1, 2], 2**70]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("options", [{"key": lambda v: type(v).__name__, "key_concurrency": 1},
                                     {"timeout": 30}, {"halt": "soon,fail=5"}],
                         ids=["key", "timeout", "halt"])
def test_calls_that_make_a_task_per_input_carry_every_kind_of_input(options):
    """Such calls pickle a primitive input with its batch (or alone when it travels alone),
    any other input in the caller: runs of each, mixed in one batch, and under a rate gate
    one per batch, all arrive as given."""
    with Pool(2) as pool:
        assert pool.map(echo, MIXED_INPUTS, **options) == MIXED_INPUTS
        assert list(pool.imap(echo, MIXED_INPUTS * 50, **options)) == MIXED_INPUTS * 50
        assert pool.starmap(max, [(1, 2), (3.5, -1), ("a", "b")], **options) == [2, 3.5, "b"]
    with Pool(2, rate=Rate(1000, per=1.0)) as pool:
        assert pool.map(echo, MIXED_INPUTS, key=lambda v: 0, key_concurrency=2) == MIXED_INPUTS


@pytest.mark.timeout(30)
def test_a_failing_key_function_fails_its_input_alone_and_names_it():
    with Pool(2) as pool:
        values = pool.map(abs, [4, 0, -2], key=lambda x: 1 // x, errors="return")
        with pytest.raises(ZeroDivisionError) as raised:
            pool.map(abs, [4, 0, -2], key=lambda x: 1 // x)
    assert values[0] == 4 and values[2] == 2
    error = values[1]
    assert isinstance(error, ZeroDivisionError) and error.index == 1
    assert error.__notes__ == ["[procqueue] raised by the key function for input 1: 0"]
    assert str(error) == "integer division or modulo by zero"  # its message stays its own
    assert raised.value.__notes__ == error.__notes__


@pytest.mark.timeout(30)
def test_per_call_options_do_not_collide_with_task_kwargs():
    def kw(limit=None, timeout=None):
        return limit, timeout

    with Pool(2) as pool:
        assert pool.submit(kw, limit=1, timeout=2).result() == (1, 2)
        assert pool.options(concurrency=1, timeout=5).submit(kw, limit=3).result() == (3, None)
        with pytest.raises(TypeError):
            pool.map(record, [1], no_such_option=1)


_HOLDER = textwrap.dedent("""
    import sys, time
    from procqueue import Limit, Pool
    def hold(x):
        start = time.time()
        time.sleep({hold})
        return start, time.time()
    if __name__ == "__main__":
        with Pool(2) as pool:
            for start, end in pool.map(hold, range({n}), limit=Limit({name!r}, concurrency=1)):
                print(start, end, flush=True)
""")


def _spawn_holder(tmp_path, name, n, hold, tag):
    script = tmp_path / f"holder_{tag}.py"
    script.write_text(_HOLDER.format(name=name, n=n, hold=hold))
    return subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)


@pytest.mark.timeout(60)
def test_named_limit_is_shared_by_two_separate_programs(tmp_path, limit_name):
    first = _spawn_holder(tmp_path, limit_name, 6, 0.05, "a")
    second = _spawn_holder(tmp_path, limit_name, 6, 0.05, "b")
    spans = []
    for proc in (first, second):
        out, _ = proc.communicate(timeout=40)
        assert proc.returncode == 0
        spans += [tuple(map(float, line.split())) for line in out.splitlines()]
    assert len(spans) == 12
    assert max_overlap(spans) == 1  # never two at once, across both programs


@pytest.mark.timeout(60)
def test_permit_of_a_sigkilled_program_is_reclaimed(tmp_path, limit_name):
    holder = _spawn_holder(tmp_path, limit_name, 1, 30, "killed")
    sem = Semaphore(limit_name, 1)
    try:
        deadline = time.monotonic() + 20
        while sem.statistics().held == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sem.statistics().held == 1  # the other program's task holds the permit
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=10)
        killed_at = time.monotonic()
        assert sem.acquire(timeout=5)
        assert time.monotonic() - killed_at < 1.5
        sem.release()
    finally:
        sem.close()


def record_or_crash_once(spec):
    """spec: "directory|i" (a string: such inputs travel in blocks).  Input 5 kills its worker
    the first time it runs."""
    directory, i = spec.rsplit("|", 1)
    marker = os.path.join(directory, "crashed")
    if i == "5" and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(3)
    start = time.time()
    time.sleep(0.01)
    return int(i), start, time.time()


@pytest.mark.timeout(60)
def test_blocks_under_a_named_limit_hold_one_permit_each_and_give_it_back(
        tmp_path, limit_name, monkeypatch):
    # Calls under concurrency limits alone travel in blocks (issue #24): a block runs one input
    # at a time and holds one permit until its batch ends, whatever ends it (its results,
    # a crash of its worker, terminate).
    from procqueue import Limit
    from procqueue.dispatch import Dispatcher

    sent_blocks = []
    send_block = Dispatcher._send_block
    monkeypatch.setattr(Dispatcher, "_send_block",
                        lambda self, slot, block: (sent_blocks.append(len(block)),
                                                   send_block(self, slot, block)))
    specs = [f"{tmp_path}|{i}" for i in range(40)]
    limit = Limit(limit_name, concurrency=2)
    sem = Semaphore(limit_name, 2)
    try:
        with Pool(3, retries=1) as pool:
            results = pool.map(record_or_crash_once, specs, chunksize=10, limit=limit)
            assert [x for x, _, _ in results] == list(range(40))
            assert max_overlap(spans_of(results)) <= 2
            assert sent_blocks and max(sent_blocks) == 10
            assert sem.statistics().held == 0  # the crashed block's permit came back too
            running = pool.map_async(record, range(200), chunksize=20, limit=limit)
            deadline = time.monotonic() + 20
            while sem.statistics().held == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            pool.terminate()
        pool.join()
        with pytest.raises(Exception):
            running.get(timeout=10)
        assert sem.statistics().held == 0
    finally:
        sem.close()
