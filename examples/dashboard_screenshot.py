"""Screenshots of the live dashboard, from a real run: a store with two queues (one with
limits), a worker service running their tasks, a few failures; the page opened in headless
Chromium while the tasks run, a failure's traceback opened, then photographed.  With --batch,
also the page of a batch (`procqueue map --dashboard`, Dashboard.for_batch) as it runs.

    python3 examples/dashboard_screenshot.py [docs/dashboard.png] [--phone docs/dashboard-phone.png]
                                             [--batch docs/dashboard-batch.png]

Needs Chromium (.ci/install-browser).  The browser is driven over the DevTools protocol by
tests/cdp_browser.py, as the dashboard's tests drive it.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from cdp_browser import Browser  # noqa: E402

from procqueue import Dashboard, Pool, TaskQueue  # noqa: E402

RENDERS = 120
PHONE = (390, 844)  # an iPhone 12-15's CSS pixels
SHOT_HEIGHT = 1500  # the desktop screenshot stops there (the task table goes on)


def render(scene: str) -> str:
    """A task of the `render` queue: 0.2 to 0.5 s of work."""
    time.sleep(0.2 + 0.1 * (int(scene.rsplit("-", 1)[1]) % 4))
    return f"{scene}.png"


def score(path: str) -> int:
    """A task of the `default` queue, failing on some inputs."""
    if path.endswith(".bad"):
        raise ValueError(f"cannot parse {path}: unexpected end of data at byte 812")
    if path.endswith(".huge"):
        raise MemoryError(f"{path} does not fit in the worker's 2 GiB")
    time.sleep(0.05)
    return len(path)


def crunch(i: int) -> int:
    """A batch task: 0.1 to 0.4 s of CPU, one input in 25 failing."""
    if i % 25 == 7:
        raise ArithmeticError(f"input {i} diverged after {i * 3} iterations")
    end = time.perf_counter() + 0.1 + 0.1 * (i % 4)
    while time.perf_counter() < end:
        pass
    return i


def fill(tq: TaskQueue) -> None:
    tq.define("render", concurrency=2, rate="40/10s", key_concurrency=1, retries=1)
    tq.enqueue_many(render, [f"scene-{i}" for i in range(RENDERS)], queue="render",
                    key=lambda scene: f"user-{int(scene.rsplit('-', 1)[1]) % 5}")
    tq.enqueue_many(score, [f"data/part-{i:03}.csv" for i in range(40)]
                    + ["data/part-007.bad", "data/part-019.bad", "data/all.huge"])


def serve(target: str, stop: threading.Event) -> None:
    with TaskQueue(target) as tq, Pool(2) as pool:
        pool.serve(tq, stop=stop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", type=Path, default=ROOT / "docs" / "dashboard.png")
    parser.add_argument("--phone", type=Path, default=None,
                        help="also a phone-sized screenshot, to this file")
    parser.add_argument("--batch", type=Path, default=None,
                        help="also a batch's page (Dashboard.for_batch), to this file")
    args = parser.parse_args()
    if args.batch is not None:
        shoot_batch(args.batch)
    with tempfile.TemporaryDirectory() as tmp:
        target = os.path.join(tmp, "jobs.db")
        with TaskQueue(target) as tq:
            fill(tq)
        stop = threading.Event()
        service = threading.Thread(target=serve, args=(target, stop))
        service.start()
        try:
            with Dashboard.for_store(target) as dash, \
                    Browser(os.path.join(tmp, "profile"), window=(1280, 900)) as browser:
                print(f"dashboard: {dash.url}", file=sys.stderr)
                page = browser.open(dash.url)
                shoot(page, args.out, args.phone)
        finally:
            stop.set()
            service.join()


def shoot(page, out: Path, phone: Path | None) -> None:
    # a few seconds of work: counts moving, bars in the throughput chart, failures listed
    page.wait_for("document.querySelectorAll('#failures tr.task').length === 3", timeout_s=60)
    page.wait_for("+document.querySelector('[data-total=\"succeeded\"] b').textContent"
                  ".replace(/,/g, '') >= 40", timeout_s=60)
    page.click("#failures tr.task")  # the newest failure, with its traceback
    page.wait_for("document.querySelector('#failures pre.traceback') !== null")
    time.sleep(1.5)
    page.evaluate("window.scrollTo(0, 0)")
    out.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(str(out), max_height=SHOT_HEIGHT)
    print(f"wrote {out}", file=sys.stderr)
    if phone is not None:
        page.send("Emulation.setDeviceMetricsOverride", {
            "width": PHONE[0], "height": PHONE[1], "deviceScaleFactor": 2, "mobile": True})
        time.sleep(1.5)
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(str(phone), full_page=False)
        print(f"wrote {phone}", file=sys.stderr)


def shoot_batch(out: Path) -> None:
    inputs = list(range(200))
    dash = Dashboard.for_batch(total=len(inputs), title="map crunch.py")
    with Pool(2, on_event=dash.on_event) as pool, dash.watching(pool), \
            tempfile.TemporaryDirectory() as tmp, \
            Browser(os.path.join(tmp, "profile"), window=(1280, 900)) as browser:
        result = pool.map_async(crunch, inputs, return_exceptions=True)
        page = browser.open(dash.url)
        page.wait_for("document.querySelectorAll('#failures tbody tr[data-outcome]').length >= 2",
                      timeout_s=90)
        # the throughput chart shows complete 5 s buckets: wait for its second bar
        page.wait_for("document.querySelectorAll('#throughput rect').length >= 2", timeout_s=30)
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(str(out), max_height=SHOT_HEIGHT)
        print(f"wrote {out}", file=sys.stderr)
        result.wait(0)  # the rest of the batch is not needed: leaving the block ends it


if __name__ == "__main__":
    main()
