"""How well procqueue's limits are used (issue #4): achieved concurrency vs K and achieved
start rate vs L per P, from the start/end times the tasks record themselves.

    python bench/limits_utilisation.py
"""
from __future__ import annotations

import time

from procqueue import Pool, Rate

TASK_S = 0.05


def hold(_):
    start = time.time()
    time.sleep(TASK_S)
    return start, time.time()


def overlap_profile(spans):
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    running = peak = 0
    weighted = 0.0
    last_t = events[0][0]
    for t, delta in events:
        weighted += running * (t - last_t)
        last_t = t
        running += delta
        peak = max(peak, running)
    return peak, weighted / (events[-1][0] - events[0][0])


def max_in_window(starts, period_s):
    starts = sorted(starts)
    return max(sum(1 for t in starts if a <= t < a + period_s) for a in starts)


def main() -> None:
    print("| limit | tasks | achieved | what was measured |\n|---|---|---|---|")
    for k in (1, 2, 3):
        with Pool(4, concurrency=k) as pool:
            spans = pool.map(hold, range(60))
        peak, mean = overlap_profile(spans)
        print(f"| concurrency={k} (4 workers) | 60 x {TASK_S * 1000:.0f} ms | peak {peak}, "
              f"mean {mean:.2f} ({mean / k:.0%} of K) | time-weighted running tasks |")
    for limit, per in ((20, 1.0), (50, 2.0)):
        n = limit * 3
        with Pool(4, rate=Rate(limit, per=per)) as pool:
            started = time.time()
            spans = pool.map(hold, range(n))
            wall = time.time() - started
        starts = [s for s, _ in spans]
        ideal = (n / limit - 1) * per  # the last window's starts may begin right away
        print(f"| rate={limit}/{per:g}s | {n} | max {max_in_window(starts, per)} starts in any "
              f"{per:g} s window; {wall:.2f} s for {n} (ideal >= {ideal:.2f} s) | "
              f"sliding window, no under-use |")


if __name__ == "__main__":
    main()
