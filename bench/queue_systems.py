"""The queues bench/queue_bench.py compares, each behind one small client interface.

A driver is the *client* side, in the bench's cell process: it creates the store, enqueues
`queue_tasks.now` tasks, counts the finished ones in the store and reads their values.  The
*service* (the workers) is always a child process of the cell, in the cell's process group:

    procqueue   python bench/queue_services.py procqueue TARGET -j 2   Pool(2).serve(TaskQueue)
    huey        python -m huey.bin.huey_consumer queue_huey.huey -w 2 -k process -d 0.001
    dbos        python bench/queue_services.py dbos DB -j 2     worker_concurrency=2, 10 ms poll

so every system pays the same: a separate client and service talking only through the store.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SERVICES = str(HERE / "queue_services.py")
QUEUE = "bench"
STOP_GRACE_S = 10.0  # a service gets this long to exit after SIGTERM before SIGKILL
RESULT_POLL_S = 0.002  # how often a client looks for one task's result (latency loop)


class Service:
    """One service child process.  It stays in the caller's process group (the cell's), so
    whatever it starts is swept by the cell's group kill even if stop() never runs."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.argv, self.log = argv, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def start(self) -> None:
        """Its output goes to a file (huey logs every task at INFO: a pipe nobody reads
        would fill and block it)."""
        self.started_at = time.time()
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace")[-400:]
            raise RuntimeError(f"service exited with {self.proc.returncode}: {tail}")

    def stop(self) -> None:
        """SIGTERM (every service here shuts down on it, its workers with it), then SIGKILL."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Driver:
    """The client side of one queue system (see the module docstring)."""

    name = ""

    def __init__(self, workdir: Path, jobs: int, target: str | None = None) -> None:
        self.workdir, self.jobs, self.target = workdir, jobs, target
        self.service: Service | None = None

    # the five things a system provides
    def prepare(self) -> None: ...
    def enqueue_all(self, items: list[int]) -> None: raise NotImplementedError
    def done_count(self) -> int: raise NotImplementedError
    def values(self) -> list[float]: raise NotImplementedError
    def run_one(self, x: int, timeout_s: float) -> float: raise NotImplementedError
    def service_argv(self) -> list[str]: raise NotImplementedError

    def start_service(self) -> None:
        self.service = Service(self.service_argv(), self.workdir / f"{self.name}-service.log")
        self.service.start()

    def stop_service(self) -> None:
        if self.service is not None:
            self.service.stop()

    def close(self) -> None:
        self.stop_service()


def wait_result(poll: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Poll until poll() gives a value that is not None."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = poll()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"no result for {what} after {timeout_s} s")
        time.sleep(RESULT_POLL_S)


# ---- procqueue ------------------------------------------------------------------------------

class ProcqueueDriver(Driver):
    name = "procqueue"
    durable = False  # TaskQueue(durable=True): fsync every commit

    def prepare(self) -> None:
        from procqueue import TaskQueue

        import queue_tasks

        self.tasks = queue_tasks
        self.tq = TaskQueue(self.store_target(), durable=self.durable)
        self.tq.define(QUEUE)

    def store_target(self) -> str:
        return self.target or str(self.workdir / "procqueue.db")

    def enqueue_all(self, items: list[int]) -> None:
        self.handles = self.tq.enqueue_many(self.tasks.now, items, queue=QUEUE)

    def done_count(self) -> int:
        return sum(c.succeeded for c in self.tq.counts() if c.spec.name == QUEUE)

    def values(self) -> list[float]:
        return [h.get_result(timeout=0) for h in self.handles]

    def run_one(self, x: int, timeout_s: float) -> float:
        return float(self.tq.enqueue(self.tasks.now, x, queue=QUEUE).get_result(timeout_s))

    def service_argv(self) -> list[str]:
        argv = [sys.executable, SERVICES, "procqueue", self.store_target(), "-j", str(self.jobs)]
        return argv + (["--durable"] if self.durable else [])

    def close(self) -> None:
        super().close()
        if hasattr(self, "tq"):
            self.tq.close()


class ProcqueueFsyncDriver(ProcqueueDriver):
    name = "procqueue-fsync"
    durable = True


# ---- huey -----------------------------------------------------------------------------------

class HueyDriver(Driver):
    name = "huey"

    def prepare(self) -> None:
        os.environ["QBENCH_HUEY_DB"] = str(self.workdir / "huey.db")  # read on import
        import queue_huey

        self.module = queue_huey
        self.huey = queue_huey.huey
        self.huey.flush()  # creates the tables

    def enqueue_all(self, items: list[int]) -> None:
        self.results = [self.module.now(x) for x in items]

    def done_count(self) -> int:
        return int(self.huey.result_count())

    def values(self) -> list[float]:
        return [r.get() for r in self.results]

    def run_one(self, x: int, timeout_s: float) -> float:
        result = self.module.now(x)
        return float(wait_result(result.get, timeout_s, "a huey task"))

    def service_argv(self) -> list[str]:
        return [sys.executable, "-m", "huey.bin.huey_consumer", "queue_huey.huey",
                "-w", str(self.jobs), "-k", "process", "-d", "0.001"]


# ---- DBOS -----------------------------------------------------------------------------------

class DbosDriver(Driver):
    name = "dbos"

    def prepare(self) -> None:
        from dbos import DBOSClient

        import queue_services

        self.db = str(self.workdir / "dbos.sqlite")
        subprocess.run([sys.executable, SERVICES, "dbos-init", self.db, "-j", str(self.jobs)],
                       check=True, stdin=subprocess.DEVNULL)
        self.client = DBOSClient(system_database_url=f"sqlite:///{self.db}",
                                 application_name=queue_services.DBOS_APP)
        self.options = {"workflow_name": "now", "queue_name": QUEUE}
        self.reader = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30)

    def enqueue_all(self, items: list[int]) -> None:
        self.handles = [self.client.enqueue(self.options, x) for x in items]  # type: ignore

    def done_count(self) -> int:
        row = self.reader.execute("SELECT COUNT(*) FROM workflow_status WHERE queue_name = ? "
                                  "AND status = 'SUCCESS'", (QUEUE,)).fetchone()
        return int(row[0])

    def values(self) -> list[float]:
        return [h.get_result() for h in self.handles]

    def run_one(self, x: int, timeout_s: float) -> float:
        handle: Any = self.client.enqueue(self.options, x)  # type: ignore[arg-type]
        return float(handle.get_result(polling_interval_sec=RESULT_POLL_S))

    def service_argv(self) -> list[str]:
        return [sys.executable, SERVICES, "dbos", self.db, "-j", str(self.jobs)]

    def close(self) -> None:
        super().close()
        if hasattr(self, "client"):
            self.reader.close()
            self.client.destroy()


DRIVERS: dict[str, type[Driver]] = {
    "procqueue-sqlite": ProcqueueDriver,
    "procqueue-sqlite-fsync": ProcqueueFsyncDriver,
    "procqueue-pg": ProcqueueDriver,
    "huey": HueyDriver,
    "dbos": DbosDriver,
}
LABELS = {
    "procqueue-sqlite": "procqueue, SQLite",
    "procqueue-sqlite-fsync": "procqueue, SQLite, durable=True (fsync per commit)",
    "procqueue-pg": "procqueue, PostgreSQL",
    "huey": "huey SqliteHuey (`-w 2 -k process -d 0.001`)",
    "dbos": "DBOS queue, SQLite (worker_concurrency=2, 10 ms poll)",
}
