"""Task functions for the durable queue tests, stored by reference as 'this/file.py:name'
(a stored task names its function; the workers import this file)."""

import os
import signal
import time


def square(x):
    return x * x


def fail(x):
    raise ValueError(f"bad input {x}")


def crash(x):
    os._exit(3)


def span(x, seconds=0.05):
    """(x, start, end, pid): when and where it ran, for the limits' invariants."""
    start = time.time()
    time.sleep(seconds)
    return x, start, time.time(), os.getpid()


def sleep_forever(x):
    time.sleep(600)


def crash_until(counter_path, crashes):
    """Crash the first `crashes` runs (counted in a file), then succeed with the run count."""
    with open(counter_path, "a") as f:
        f.write("x")
    runs = os.path.getsize(counter_path)
    if runs <= crashes:
        os.kill(os.getpid(), signal.SIGKILL)
    return runs


def unpicklable_result(x):
    return lambda: x


not_a_function = 42


def write_pid_then_sleep(pid_path):
    with open(pid_path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(600)


def beat_deaf_to_sigterm(path):
    """Ignore SIGTERM and append "pid time" to `path` every 10 ms, for 30 s."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for _ in range(3000):
        with open(path, "a") as beats:
            beats.write(f"{os.getpid()} {time.time()}\n")
        time.sleep(0.01)
