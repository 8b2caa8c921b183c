"""The systems compared by bench/suite.py, each driven through the API calls issue #6 names.

Every system is used as a user would: default arguments (chunksize, batch size, start method),
one pool opened before the timed call and warmed up (workers started, the function loaded),
closed after it.  `startup` is the one workload that times opening and closing.

    system     APIs measured                        notes
    serial     loop                                 [fn(x) for x in xs], the baseline
    procqueue  map, imap, imap_unordered, submit    procqueue.Pool defaults (adaptive chunks)
    mp         map, imap                            multiprocessing.Pool, default context;
                                                    imap with its default chunksize=1
    ppe        map, submit                          concurrent.futures.ProcessPoolExecutor
    loky       map, submit                          loky.get_reusable_executor
    mpire      map, imap_unordered                  mpire.WorkerPool(keep_alive=True)
    joblib     parallel                             Parallel(n_jobs)(delayed(fn)(x) ...), loky

A system's `call` returns the results in input order (completion-order APIs are sorted after
the clock stops, outside the timed region; see suite.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# APIs that manage only a few thousand tiny tasks per second: on `tiny` they get this many
# tasks, not 100,000 (tasks/s is the figure, and it does not depend on the count at this size).
SLOW_TINY_TASKS = 20_000
SLOW_ON_TINY = {("ppe", "map"), ("ppe", "submit"), ("loky", "map"), ("loky", "submit"),
                ("procqueue", "submit")}  # procqueue.submit too, to compare like with like
UNORDERED_APIS = {"imap_unordered"}


class System:
    name = "?"
    apis: tuple[str, ...] = ()
    supervisor_thread: str | None = None  # name prefix of the thread that owns the pool

    def open(self, workers: int) -> None: ...

    def call(self, api: str, fn: Callable[[Any], Any], xs: list[Any]) -> list[Any]:
        raise NotImplementedError

    def close(self) -> None: ...

    def startup(self, workers: int, fn: Callable[[Any], Any]) -> None:
        """Create the pool, run one task, shut it down (workers gone)."""
        raise NotImplementedError

    def prepare(self, api: str, xs: list[Any]) -> list[Any]:
        """Reshape the inputs the way this API wants them (untimed)."""
        return xs


class Serial(System):
    name, apis = "serial", ("loop",)

    def call(self, api: str, fn: Callable[[Any], Any], xs: list[Any]) -> list[Any]:
        return [fn(x) for x in xs]

    def startup(self, workers: int, fn: Callable[[Any], Any]) -> None:
        fn(1)


class Procqueue(System):
    name, apis = "procqueue", ("map", "imap", "imap_unordered", "submit")
    supervisor_thread = "procqueue-supervisor"

    def open(self, workers: int, **options: Any) -> None:
        from procqueue import Pool

        self.pool = Pool(workers, **options)

    def call(self, api: str, fn: Callable[[Any], Any], xs: list[Any]) -> list[Any]:
        pool = self.pool
        if api == "map":
            return pool.map(fn, xs)  # type: ignore[no-any-return]
        if api == "imap":
            return list(pool.imap(fn, xs))
        if api == "imap_unordered":
            return list(pool.imap_unordered(fn, xs))
        if api == "submit":
            submit = pool.submit
            return [f.result() for f in [submit(fn, x) for x in xs]]
        raise ValueError(api)

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()

    def startup(self, workers: int, fn: Callable[[Any], Any]) -> None:
        from procqueue import Pool

        pool = Pool(workers)
        pool.apply(fn, (1,))
        pool.terminate()
        pool.join()


class MpPool(System):
    name, apis = "mp", ("map", "imap")

    def open(self, workers: int) -> None:
        import multiprocessing

        self.pool = multiprocessing.Pool(workers)

    def call(self, api: str, fn: Callable[[Any], Any], xs: list[Any]) -> list[Any]:
        if api == "map":
            return self.pool.map(fn, xs)
        if api == "imap":
            return list(self.pool.imap(fn, xs))
        raise ValueError(api)

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()

    def startup(self, workers: int, fn: Callable[[Any], Any]) -> None:
        import multiprocessing

        pool = multiprocessing.Pool(workers)
        pool.apply(fn, (1,))
        pool.terminate()
        pool.join()


class _Executor(System):
    apis = ("map", "submit")

    def call(self, api: str, fn: Callable[[Any], Any], xs: list[Any]) -> list[Any]:
        if api == "map":
            return list(self.pool.map(fn, xs))
        if api == "submit":
            submit = self.pool.submit
            return [f.result() for f in [submit(fn, x) for x in xs]]
        raise ValueError(api)


class Ppe(_Executor):
    name = "ppe"

    def open(self, workers: int) -> None:
        from concurrent.futures import ProcessPoolExecutor

        self.pool = ProcessPoolExecutor(workers)

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def startup(self, workers: int, fn: Callable[[Any], Any]) -> None:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as ex:
            ex.submit(fn, 1).result()


class Loky(_Executor):
    name = "loky"

    def open(self, workers: int) -> None:
        from loky import get_reusable_executor

        self.pool = get_reusable_executor(max_workers=workers)

    def close(self) -> None:
        self.pool.shutdown(wait=True, kill_workers=True)

    def startup(self, workers: int, fn: Callable[[Any], Any]) -> None:
        from loky import get_reusable_executor

        ex = get_reusable_executor(max_workers=workers)
        ex.submit(fn, 1).result()
        ex.shutdown(wait=True)


class Mpire(System):
    name, apis = "mpire", ("map", "imap_unordered")

    def open(self, workers: int) -> None:
        from mpire import WorkerPool

        self.pool = WorkerPool(n_jobs=workers, keep_alive=True)

    def prepare(self, api: str, xs: list[Any]) -> list[Any]:
        return [(x,) for x in xs]  # mpire unpacks tuples: wrap so arrays and tuples pass whole

    def call(self, api: str, fn: Callable[[Any], Any], xs: list[Any]) -> list[Any]:
        if api == "map":
            return self.pool.map(fn, xs)  # type: ignore[no-any-return]
        if api == "imap_unordered":
            return list(self.pool.imap_unordered(fn, xs))
        raise ValueError(api)

    def close(self) -> None:
        self.pool.terminate()

    def startup(self, workers: int, fn: Callable[[Any], Any]) -> None:
        from mpire import WorkerPool

        with WorkerPool(n_jobs=workers) as pool:
            pool.map(fn, [(1,)])


class Joblib(System):
    name, apis = "joblib", ("parallel",)

    def open(self, workers: int) -> None:
        from joblib import Parallel

        self.pool = Parallel(n_jobs=workers)
        self.pool.__enter__()  # keep the workers between the warm-up and the timed call

    def call(self, api: str, fn: Callable[[Any], Any], xs: list[Any]) -> list[Any]:
        from joblib import delayed

        task = delayed(fn)
        return list(self.pool(task(x) for x in xs))

    def close(self) -> None:
        self.pool.__exit__(None, None, None)
        from joblib.externals.loky import get_reusable_executor

        get_reusable_executor().shutdown(wait=True, kill_workers=True)

    def startup(self, workers: int, fn: Callable[[Any], Any]) -> None:
        from joblib import Parallel, delayed
        from joblib.externals.loky import get_reusable_executor

        Parallel(n_jobs=workers)(delayed(fn)(x) for x in [1])
        get_reusable_executor().shutdown(wait=True)


SYSTEMS: dict[str, type[System]] = {cls.name: cls for cls in
                                    (Serial, Procqueue, MpPool, Ppe, Loky, Mpire, Joblib)}
