"""Big arguments travel out of band (a memfd per argument, mapped by the worker); big results
come back through the pipe.  Checked: values, isolation of the caller's data, no descriptor
leak, retries after a crash, and no /dev/shm entry left behind."""
from __future__ import annotations

import hashlib
import os
import signal

import pytest

from procqueue import Pool, WorkerCrashedError

MIB = 2**20


def digest(data):
    return len(data), hashlib.sha256(data).hexdigest()


def scribble(data):
    data[0:4] = b"XXXX"  # the worker's copy is private: the caller must not see this
    return bytes(data[0:4])


def crash_once(args):
    marker, data = args
    if not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return digest(data)


def big_result(mib):
    return b"r" * (mib * MIB)


def _open_fds():
    return len(os.listdir("/proc/self/fd"))


def _shm_entries():
    return set(os.listdir("/dev/shm"))


@pytest.mark.timeout(60)
def test_big_arguments_arrive_intact_and_leak_nothing():
    blobs = [bytearray(os.urandom(1024)) * 1024 for _ in range(24)]  # 1 MiB each
    shm_before = _shm_entries()
    with Pool(2) as pool:
        fds_before = _open_fds()
        assert pool.map(digest, blobs) == [digest(b) for b in blobs]
        assert list(pool.imap(digest, iter(blobs))) == [digest(b) for b in blobs]
        assert pool.submit(digest, blobs[0]).result() == digest(blobs[0])
        assert _open_fds() <= fds_before  # every argument's memfd was closed
    assert _shm_entries() <= shm_before


@pytest.mark.timeout(60)
def test_worker_cannot_change_the_callers_argument():
    data = bytearray(b"a" * (2 * MIB))
    with Pool(1) as pool:
        assert pool.apply(scribble, (data,)) == b"XXXX"
    assert data[0:4] == b"aaaa"


@pytest.mark.timeout(60)
def test_big_argument_is_sent_again_on_retry(tmp_path):
    data = bytearray(os.urandom(MIB))
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
