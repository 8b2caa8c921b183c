"""The worker services bench/queue_bench.py starts as child processes (huey's is its own
`huey_consumer`, see queue_huey.py):

    python bench/queue_services.py procqueue TARGET [-j 2] [--durable]   Pool(j).serve(TaskQueue)
    python bench/queue_services.py dbos DB [-j 2]          a DBOS app serving its queue
    python bench/queue_services.py dbos-init DB [-j 2]     create DBOS's system database, exit

TARGET is an SQLite file or a postgresql:// URL; DB an SQLite file.  Each serves the queue
QUEUE until SIGTERM or SIGINT, then shuts down cleanly (its workers with it).  Nothing here is
timed: the bench reads the tasks' own clocks and the stores.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import queue_tasks  # noqa: E402 - bench/ first on sys.path

QUEUE = "bench"
DBOS_APP = "qbench"
DBOS_POLL_S = 0.01  # issue #21: DBOS measured at a 10 ms queue polling interval (default 1 s)


def stop_on_signals(stop: threading.Event | None = None) -> None:
    """SIGTERM (and SIGINT) set `stop`, or without one end the service through SystemExit in
    the main thread, so every `finally` and context manager on the way out runs."""
    def leave(signum: int, frame: Any) -> None:
        if stop is None:
            raise SystemExit(0)
        stop.set()
    signal.signal(signal.SIGTERM, leave)
    signal.signal(signal.SIGINT, leave)


# ---- procqueue ------------------------------------------------------------------------------

def serve_procqueue(target: str, jobs: int, durable: bool) -> None:
    from procqueue import Pool, TaskQueue

    stop = threading.Event()  # serve() returns once it is set, its held tasks put back
    stop_on_signals(stop)
    with TaskQueue(target, durable=durable) as tq, Pool(jobs) as pool:
        tq.define(QUEUE)
        pool.serve(tq, queues=[QUEUE], stop=stop)


# ---- DBOS -----------------------------------------------------------------------------------

def dbos_config(db: str) -> dict[str, Any]:
    return {"name": DBOS_APP, "system_database_url": f"sqlite:///{db}", "log_level": "WARNING"}


def launch_dbos(db: str, jobs: int) -> Any:
    """Launch DBOS on its SQLite system database with the bench's functions as workflows and
    the queue registered at worker_concurrency=jobs, polled every DBOS_POLL_S."""
    from dbos import DBOS

    dbos = DBOS(config=dbos_config(db))  # type: ignore[arg-type]
    for fn in (queue_tasks.now, queue_tasks.spin):
        DBOS.workflow(name=fn.__name__)(fn)
    DBOS.launch()
    DBOS.register_queue(QUEUE, worker_concurrency=jobs, polling_interval_sec=DBOS_POLL_S)
    return dbos


def serve_dbos(db: str, jobs: int) -> None:
    from dbos import DBOS

    launch_dbos(db, jobs)
    try:
        threading.Event().wait()  # DBOS's queue thread dequeues and runs the workflows
    finally:
        DBOS.destroy()


def init_dbos(db: str, jobs: int) -> None:
    """DBOSClient never creates the system database: a launched app must have made it."""
    from dbos import DBOS

    launch_dbos(db, jobs)
    DBOS.destroy()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("system", choices=["procqueue", "dbos", "dbos-init"])
    parser.add_argument("target")
    parser.add_argument("-j", "--jobs", type=int, default=2)
    parser.add_argument("--durable", action="store_true", help="procqueue: fsync every commit")
    args = parser.parse_args(argv)
    if args.system == "procqueue":
        serve_procqueue(args.target, args.jobs, args.durable)
        return
    stop_on_signals()
    if args.system == "dbos":
        serve_dbos(args.target, args.jobs)
    else:
        init_dbos(args.target, args.jobs)


if __name__ == "__main__":
    main()
