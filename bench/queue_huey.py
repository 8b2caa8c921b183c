"""huey's side of bench/queue_bench.py: one SqliteHuey on the file named by $QBENCH_HUEY_DB and
the bench's task functions registered as its tasks.  The consumer is huey's own command:

    QBENCH_HUEY_DB=/tmp/x/huey.db python -m huey.bin.huey_consumer queue_huey.huey \
        -w 2 -k process -d 0.001

huey is used with its defaults (WAL journal, SQLite's default synchronous=FULL: one fsync per
commit; results stored unless None).
"""

from __future__ import annotations

import os

from huey import SqliteHuey

import queue_tasks

huey = SqliteHuey("qbench", filename=os.environ.get("QBENCH_HUEY_DB", "qbench-huey.db"))

now = huey.task(name="now")(queue_tasks.now)
spin = huey.task(name="spin")(queue_tasks.spin)
