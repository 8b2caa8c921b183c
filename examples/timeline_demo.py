"""Make an example trace and report: 60 tasks of varied length on 2 workers, one that raises
and one that crashes its worker once (then succeeds on the retry).

    python3 examples/timeline_demo.py run.json && procqueue report run.json -o report.html
"""
from __future__ import annotations

import os
import random
import sys
import tempfile
import time

from procqueue import Pool


def work(args):
    i, seconds, marker = args
    if i == 17:
        raise ValueError(f"input {i} is malformed")
    if i == 33 and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(3)  # a crash: the task is retried on a fresh worker
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return i


if __name__ == "__main__":
    trace = sys.argv[1] if len(sys.argv) > 1 else "run.json"
    rng = random.Random(3)
    marker = os.path.join(tempfile.mkdtemp(), "crashed-once")
    inputs = [(i, rng.choice([0.01, 0.02, 0.05, 0.1]) * rng.choice([1, 1, 1, 4]), marker)
              for i in range(60)]
    with Pool(2, trace=trace, retries=1) as pool:
        pool.map(work, inputs, return_exceptions=True)
    print(f"wrote {trace}")
