"""`procqueue limits` (issue #22): the named limits a user's programs left on the machine,
with their capacity, usage and holders, and `--remove NAME`; run as the command, in a separate
process from the one holding the permits, as a user would run it.  Every test uses a unique
name and removes its files in the fixture, whatever happens."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

import procqueue
from procqueue import Limit, Rate, Semaphore

SHM = Path("/dev/shm")
COMMAND_TIMEOUT_S = 30
# The child holds a permit until its stdin closes: it then exits, or is killed first.
HOLDER = """
import sys
import procqueue
handle = procqueue.Limit(sys.argv[1], concurrency=2).open()
assert handle.try_acquire() == 0.0
print("held", flush=True)
sys.stdin.read()
"""

pytestmark = pytest.mark.skipif(not SHM.is_dir(), reason="named limits live in /dev/shm")


def limits(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "procqueue.cli.main", "limits", *args],
                          capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)


def files_of(name: str) -> list[str]:
    return sorted(path.name for path in SHM.glob(f"procqueue.*.{name}"))


def listed(name: str) -> list[dict]:
    run = limits("--json")
    assert run.returncode == 0, run.stderr
    return [row for row in json.loads(run.stdout) if row["name"] == name]


@pytest.fixture
def name() -> Iterator[str]:
    name = f"test-{uuid.uuid4().hex[:12]}"
    try:
        yield name
    finally:
        Limit.unlink_name(name)


def test_lists_capacity_usage_and_holder_pid(name):
    with Limit(name, concurrency=2, rate=Rate(5, per=1)).open() as handle:
        assert handle.try_acquire() == 0.0
        run = limits()
        handle.release()
    assert run.returncode == 0, run.stderr
    rows = [line.split() for line in run.stdout.splitlines() if line.startswith(name + " ")]
    assert rows == [[name, "concurrency", "2", "1", str(os.getpid())],
                    [name, "rate", "5/1.02s", "1", "-"]]  # a Limit's window has 20 ms more
    assert run.stdout.splitlines()[0].split() == ["NAME", "KIND", "CAPACITY", "IN", "USE",
                                                  "HOLDERS"]


def test_json_gives_every_holder_and_whether_it_is_alive(name):
    with Limit(name, concurrency=2).open() as handle:
        assert handle.try_acquire() == 0.0 and handle.try_acquire() == 0.0
        rows = listed(name)
        handle.release()
        handle.release()
    me = {"pid": os.getpid(), "alive": True}
    assert rows == [{"name": name, "kind": "concurrency", "capacity": 2, "in_use": 2,
                     "holders": [me, me]}]


def test_a_killed_holder_is_shown_exited_and_its_permit_freed(name):
    child = subprocess.Popen([sys.executable, "-c", HOLDER, name], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "held\n"
        assert [row["holders"] for row in listed(name)] == [[{"pid": child.pid, "alive": True}]]
    finally:
        child.kill()
        child.communicate(timeout=COMMAND_TIMEOUT_S)  # reaps: the pid names no process now
    (row,) = listed(name)
    assert row["in_use"] == 0 and row["holders"] == [{"pid": child.pid, "alive": False}]
    assert listed(name)[0]["holders"] == []  # freed: reported once


def test_remove_deletes_the_limit_files(name):
    Limit(name, concurrency=2, rate=Rate(5, per=1)).open().close()
    assert files_of(name) == [f"procqueue.rate.{name}", f"procqueue.sem.{name}"]
    run = limits("--remove", name)
    assert run.returncode == 0, run.stderr
    assert files_of(name) == []
    assert listed(name) == [] and files_of(name) == []  # listing creates nothing


def test_remove_is_refused_while_a_live_process_holds_a_permit_unless_forced(name):
    with Limit(name, concurrency=2).open() as handle:
        assert handle.try_acquire() == 0.0
        refused = limits("--remove", name)
        assert refused.returncode == 1
        assert str(os.getpid()) in refused.stderr and "--force" in refused.stderr
        assert files_of(name) == [f"procqueue.sem.{name}"]
        forced = limits("--remove", name, "--force")
        assert forced.returncode == 0, forced.stderr
        assert files_of(name) == []


def test_listing_attaches_only_to_finished_limits_and_creates_nothing(name):
    with pytest.raises(FileNotFoundError):
        Semaphore.attach(name)
    assert files_of(name) == []
    half_made = SHM / f"procqueue.sem.{name}"  # a creator that died before its header
    half_made.write_bytes(b"")
    assert [limit for limit in procqueue.named_limits() if limit.name == name] == []
    assert half_made.stat().st_size == 0  # left as it was: the next opener initialises it


def test_removing_an_unknown_limit_exits_2_with_one_line(name):
    run = limits("--remove", name)
    assert run.returncode == 2
    assert len(run.stderr.strip().splitlines()) == 1 and repr(name) in run.stderr
    assert files_of(name) == []


def test_semaphore_is_public_as_the_readme_uses_it(name):
    assert "Semaphore" in procqueue.__all__ and "named_limits" in procqueue.__all__
    Semaphore(name, 3).close()
    assert [limit.semaphore.value for limit in procqueue.named_limits()
            if limit.name == name] == [3]
    assert Semaphore.unlink_name(name) and files_of(name) == []


def test_every_option_of_limits_says_its_default():
    from procqueue.cli.limits import limits_command

    options = [p for p in limits_command.params if isinstance(p, click.Option)]
    assert {o.name for o in options} == {"remove", "force", "as_json"}
    for option in options:
        assert "[default:" in (option.help or ""), option.name
