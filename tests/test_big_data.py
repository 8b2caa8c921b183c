"""Big arguments travel out of band (a memfd per argument, mapped by the worker); big results
come back through the pipe.  Checked: values, isolation of the caller's data, no descriptor
leak, retries after a crash, and no /dev/shm entry left behind."""
from __future__ import annotations

import hashlib
import os
import pickle
import signal
import time

import pytest

from procqueue import Pool, WorkerCrashedError
from procqueue.protocol import OutOfBand, dumps_argument

MIB = 2**20


class Buffer:
    """Bytes that pickle protocol 5 hands over out of band, as it does a numpy array's (a
    bytearray is pickled in band: it would not reach the memfd path at all)."""

    def __init__(self, data):
        self.data = data

    def __reduce_ex__(self, protocol):
        return Buffer, (pickle.PickleBuffer(self.data),)


def big(nbytes):
    return Buffer(bytearray(os.urandom(4096)) * (nbytes // 4096))


def digest(data):
    if isinstance(data, Buffer):
        data = data.data
    return len(data), hashlib.sha256(data).hexdigest()


def scribble(buffer):
    buffer.data[0:4] = b"XXXX"  # the worker's copy is private: the caller must not see this
    return bytes(buffer.data[0:4])


def crash_once(args):
    marker, data = args
    if not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return digest(data)


def test_the_test_buffers_travel_out_of_band():
    for argument in (big(MIB), ("marker", big(MIB))):
        payload = dumps_argument(argument)
        assert isinstance(payload, OutOfBand)
        payload.close()


def big_result(mib):
    return b"r" * (mib * MIB)


def _open_fds():
    return len(os.listdir("/proc/self/fd"))


def _open_memfds():
    """Argument memfds this process holds open."""
    found = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            found += "procqueue-argument" in os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass  # closed meanwhile
    return found


def _shm_entries():
    return set(os.listdir("/dev/shm"))


@pytest.mark.timeout(60)
def test_big_arguments_arrive_intact_and_leak_nothing():
    blobs = [big(MIB) for _ in range(24)]
    shm_before = _shm_entries()
    with Pool(2) as pool:
        assert pool.map(digest, blobs) == [digest(b) for b in blobs]
        assert list(pool.imap(digest, iter(blobs))) == [digest(b) for b in blobs]
        assert pool.submit(digest, blobs[0]).result() == digest(blobs[0])
        assert pool._supervisor.memfds.reused > 0  # finished arguments' memfds served again
        assert _open_memfds() <= 64  # only those kept for reuse (64 MiB of 1 MiB ones)
    pool.join()
    assert _open_memfds() == 0  # every argument's memfd was closed with the pool
    assert _shm_entries() <= shm_before


KEPT = []  # in the worker: arguments a task kept, with their digest when they arrived


def keep(buffer):
    KEPT.append((buffer, digest(buffer)))


def kept_unchanged(_):
    return len(KEPT), all(digest(b) == d for b, d in KEPT)


@pytest.mark.timeout(60)
def test_an_argument_a_task_keeps_is_never_overwritten_by_a_reused_memfd():
    # Memfds are reused for later arguments of the same size, but only once every worker
    # they went to has unmapped them: a task that keeps its argument must see it unchanged
    # while later calls' arguments of the same size come and go.
    kept = [big(MIB) for _ in range(10)]
    later = [big(MIB) for _ in range(30)]
    with Pool(1) as pool:
        pool.map(keep, kept)
        for _ in range(2):  # the second time, the first time's memfds are reused
            assert pool.map(digest, later) == [digest(b) for b in later]
        assert pool._supervisor.memfds.reused > 0
        assert pool.apply(kept_unchanged, (0,)) == (10, True)


@pytest.mark.timeout(60)
def test_worker_cannot_change_the_callers_argument():
    data = Buffer(bytearray(b"a" * (2 * MIB)))
    with Pool(1) as pool:
        assert pool.apply(scribble, (data,)) == b"XXXX"
    assert data.data[0:4] == b"aaaa"


@pytest.mark.timeout(60)
def test_big_argument_is_sent_again_on_retry(tmp_path):
    data = big(MIB)
    with Pool(1, retries=1) as pool:
        assert pool.apply(crash_once, ((str(tmp_path / "crashed"), data),)) == digest(data)
    with Pool(1, retries=0) as pool:
        marker = str(tmp_path / "again")
        with pytest.raises(WorkerCrashedError):
            pool.apply(crash_once, ((marker, data),))


@pytest.mark.timeout(60)
def test_big_results_come_back():
    with Pool(2) as pool:
        sizes = [len(r) for r in pool.imap_unordered(big_result, [64, 1, 64])]
    assert sorted(sizes) == [MIB, 64 * MIB, 64 * MIB]


def slow_digest(data):
    time.sleep(0.03)  # slower than the feeder copies: it would run far ahead unbounded
    return digest(data)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("api", ["imap", "imap_unordered"])
def test_imap_of_big_arguments_copies_a_bounded_amount_ahead(monkeypatch, api):
    # Without a bound the feeder would copy its whole window (2,048 inputs) into memfds
    # ahead of the workers: 60 x 4 MiB here.  With a 8 MiB bound and 2 workers, at most
    # max(8 MiB, 2 tasks per worker) plus the input being copied is held at once.
    import procqueue.pool

    monkeypatch.setattr(procqueue.pool, "ARGUMENT_MEMORY_AHEAD", 8 * MIB)
    blobs = (big(4 * MIB) for _ in range(60))  # lazily
    expected = []

    def recorded():
        for blob in blobs:
            expected.append(digest(blob))
            yield blob

    with Pool(2) as pool:
        got = list(getattr(pool, api)(slow_digest, recorded()))
        peak = pool._argument_memory.peak_bytes
        assert pool._argument_memory.bytes == 0  # every argument released at its outcome
    assert sorted(got) == sorted(expected) and len(got) == 60
    if api == "imap":
        assert got == expected
    assert peak <= max(8 * MIB, 4 * 4 * MIB) + 4 * MIB + 4096, peak


def digest_or_crash(args):
    marker, buffer = args
    if marker and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(3)  # the first attempt dies, with the argument mapped
    return digest(buffer)


@pytest.mark.timeout(90)
def test_reused_memfds_stay_correct_through_crashes_and_retries(tmp_path):
    # Crashes return a dead worker's memfds without a report from it; retries send the
    # same memfd again; meanwhile finished ones are reused.  Every input must still be
    # computed on its own bytes.
    buffers = [big(512 * 1024) for _ in range(80)]
    items = [(str(tmp_path / f"crash-{i}") if i % 9 == 4 else "", b)
             for i, b in enumerate(buffers)]
    with Pool(2, retries=2) as pool:
        expected = sorted(digest(b) for b in buffers)
        for _ in range(2):  # the second round reuses the first round's memfds
            assert sorted(pool.imap_unordered(digest_or_crash, items)) == expected
        got = pool.map(digest_or_crash, items)
        stats = pool.stats()
        assert pool._supervisor.memfds.reused > 0
    assert got == [digest(b) for b in buffers]
    assert stats.worker_restarts >= 9


def test_a_memfd_is_reused_only_when_final_and_unmapped_everywhere():
    from procqueue.protocol import MemfdPool

    memfds = MemfdPool(max_bytes=8 * MIB, max_waiting=1)
    first = dumps_argument(big(MIB), memfds)
    assert isinstance(first, OutOfBand)
    fd = first.fd
    first.lent = 2  # sent to two workers (a retry)
    first.returned()  # one unmapped it
    assert memfds.take(MIB) is None  # not final yet: nothing to reuse
    first.finish()
    assert memfds.take(MIB) is None and first.fd == fd  # final, but one worker still maps it
    first.returned()
    assert first.fd == -1 and memfds.waiting == 0
    assert memfds.take(MIB) == fd  # now it serves the next argument of its size
    assert memfds.take(MIB) is None and memfds.reused == 1
    os.close(fd)

    kept = [dumps_argument(big(MIB), memfds) for _ in range(2)]
    for payload in kept:
        payload.lent = 1
        payload.finish()  # tasks that keep their argument: at most max_waiting stay open
    assert kept[0].fd >= 0 and kept[1].fd == -1
    kept[0].returned()
    other = dumps_argument(big(2 * MIB), memfds)
    other.close()  # closed, never reused
    assert memfds.take(2 * MIB) is None
    memfds.close()
    assert _open_memfds() == 0
