"""The workloads of issue #6.  Task functions are module-level so every pool can pickle them."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any, Callable


def trivial(x: Any) -> Any:
    return x


def spin(ms: float) -> float:
    """Pure-Python CPU work for `ms` milliseconds (a busy loop, not a sleep)."""
    end = time.perf_counter() + ms / 1000
    n = 0
    while time.perf_counter() < end:
        n += 1
    return ms


def array_sum(a: Any) -> float:
    return float(a.sum())


@dataclass
class Workload:
    name: str
    fn: Callable[[Any], Any]
    make: Callable[[], list[Any]]
    repeat_inside: int = 1  # startup: runs averaged inside one cell

    def inputs(self) -> list[Any]:
        return self.make()

    def check(self, inputs: list[Any], results: list[Any]) -> None:
        if len(results) != len(inputs):
            raise AssertionError(f"{self.name}: {len(results)} results for {len(inputs)} inputs")


def _tiny(scale: float) -> Workload:
    return Workload("tiny", trivial, lambda: list(range(int(100_000 * scale))))


def _cpu(ms: int, count: int) -> Callable[[float], Workload]:
    return lambda scale: Workload(f"cpu_{ms}ms", spin, lambda: [ms] * int(count * scale))


def _uneven(scale: float) -> Workload:
    def make() -> list[float]:
        items = [1.0] * int(2000 * scale) + [200.0] * max(int(10 * scale), 1)
        random.Random(1).shuffle(items)
        return items
    return Workload("uneven", spin, make)


def _big_args(scale: float) -> Workload:
    def make() -> list[Any]:
        import numpy as np

        rng = np.random.default_rng(0)
        return [rng.random(131_072) for _ in range(int(2000 * scale))]  # 1 MiB each
    return Workload("big_args", array_sum, make)


def _startup(scale: float) -> Workload:
    return Workload("startup", trivial, lambda: [1], repeat_inside=3)


WORKLOADS: dict[str, Callable[[float], Workload]] = {
    "tiny": _tiny,
    "cpu_1ms": _cpu(1, 2000),
    "cpu_10ms": _cpu(10, 300),
    "uneven": _uneven,
    "big_args": _big_args,
    "startup": _startup,
}
