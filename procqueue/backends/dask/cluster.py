"""What a DaskPool holds on the cluster, and how it gets and gives it back.

_Resources opens the client (or a LocalCluster of our own) and closes, at the end, what the
pool put there: its semaphores, the workers' rate windows, the worker setup plugin, the client
and cluster it started (a named Limit's semaphores are the cluster's: only let go of).
_WorkerSetup is that plugin (worker_env, then the initializer, in every worker present and
future; in a LocalCluster of ours, each worker process leads a process group of its own, which
dies with it, so that no task's subprocess outlives the pool or the program).  cluster_config
holds the scheduler settings the procqueue semantics need; require_distributed tells whether
the dask extra is installed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import time
from typing import Any, Callable

from ...affinity import usable_cpu_count
from ...process_group import start_group_reaper
from ...protocol import dumps_function
from .worker_side import _distributed, close_rate_window, seal_rate_window

CLOSE_TIMEOUT_S = 10.0  # closing the client and a LocalCluster we started
WORKER_STOP_GRACE_S = 0.6  # a LocalCluster we started: its workers' time to stop, then SIGKILL
LOCAL_DASHBOARD = "127.0.0.1:0"  # a LocalCluster's HTTP server: loopback, any free port
# A pool with a rate ends by giving its leases back; it waits at most this long (seconds) for
# the ones in flight to arrive, polling every RATE_DRAIN_POLL_S, before closing the semaphore.
RATE_DRAIN_WAIT_S = 0.5
RATE_DRAIN_POLL_S = 0.01


def cluster_config(retries: int) -> dict[str, Any]:
    """Scheduler settings for the procqueue semantics on a cluster we start: Dask re-runs a
    chunk lost with its worker `retries` times; each 1-thread worker holds only the chunk it
    runs, so a worker death marks only that chunk as suspicious (saturation 1.1 would also
    charge the chunk queued behind it)."""
    return {"distributed.scheduler.allowed-failures": retries,
            "distributed.scheduler.worker-saturation": 1.0}


class _WorkerSetup:
    """The pool's setup of every Dask worker, present and future (a distributed WorkerPlugin:
    setup(worker) and teardown(worker) are the whole protocol): `env` first, then the
    initializer, as a local worker has its environment before its initializer runs.
    teardown (the pool ends on a cluster it does not own) restores the environment.
    `own_processes` (a LocalCluster the pool started): each worker process leads a process
    group of its own, which its tasks' subprocesses join and which is killed when the worker
    ends, however it ends: at the pool's end, or at once when the program is gone (Dask's
    worker exits when its nanny's process does, even SIGKILLed), as a local worker's group."""

    def __init__(self, env: dict[str, str], initializer: Callable[..., object] | None,
                 initargs: tuple[Any, ...], own_processes: bool = False) -> None:
        self.env = env
        self.own_processes = own_processes
        # Pickled as the tasks' functions are (protocol.dumps_function), so that a script's
        # initializer and its tasks share the worker's globals, as in the local pool.
        self.init_payload = (None if initializer is None
                             else dumps_function((initializer, tuple(initargs))))
        self.saved: dict[str, str | None] = {}  # in each worker: the values env replaced

    def setup(self, worker: Any) -> None:
        if self.own_processes:
            start_group_reaper()
        self.saved = {name: os.environ.get(name) for name in self.env}
        os.environ.update(self.env)
        if self.init_payload is not None:
            initializer, initargs = pickle.loads(self.init_payload)
            initializer(*initargs)

    def teardown(self, worker: Any) -> None:
        for name, value in self.saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class _Resources:
    """What a DaskPool holds on the cluster and must give back: the client (closed only if
    we opened it), the LocalCluster we started, the worker setup plugin, the semaphores and
    the workers' rate windows; and what it only uses, the named Limits' semaphores."""

    def __init__(self, client: Any, cluster: Any, owns_client: bool) -> None:
        self.client = client
        self.cluster = cluster
        self.owns_client = owns_client
        self.plugin_name: str | None = None
        self.limits: tuple[Any, ...] = ()  # distributed.Semaphore objects, closed at the end
        self.shared: tuple[Any, ...] = ()  # named Limits' semaphores: left open, let go of
        self.rate_names: list[str] = []  # rate semaphores whose worker windows close first
        self.closed = False

    @classmethod
    def open(cls, processes: int | None, address: str | None, client: Any,
             retries: int, env: dict[str, str]) -> "_Resources":
        import dask

        Client, LocalCluster = _distributed().Client, _distributed().LocalCluster
        if client is not None:
            return cls(client, None, owns_client=False)
        if address is not None:
            return cls(Client(address, set_as_default=False), None, owns_client=True)
        with dask.config.set(cluster_config(retries)):
            # env= reaches the worker processes as they start (what a library reads at import
            # sees it); the worker setup plugin sets it again, as on any cluster.
            # silence_logs: Dask's own lines about a worker it restarts, keys it lost or a
            # task it gave up on are what procqueue reports itself, per item (its
            # WorkerCrashedError names the input and the worker); the levels come back when
            # the cluster closes
            cluster = LocalCluster(n_workers=processes or usable_cpu_count(), threads_per_worker=1,
                                   processes=True, dashboard_address=LOCAL_DASHBOARD,
                                   env=dict(env), silence_logs=logging.CRITICAL)
            try:
                return cls(Client(cluster, set_as_default=False), cluster, owns_client=True)
            except BaseException:
                cluster.close()
                raise

    def allowed_failures(self) -> int:
        """How many times the scheduler re-runs a task whose worker died."""
        try:
            value = self.client.run_on_scheduler(_scheduler_allowed_failures)
            return int(value)
        except Exception:
            import dask

            return int(dask.config.get("distributed.scheduler.allowed-failures"))

    def scheduler_address(self) -> str | None:
        try:
            return str(self.client.scheduler.address)
        except Exception:
            return None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._give_back_rate_leases()
        for limit in self.limits:
            _close_quietly(limit)
        for shared in self.shared:
            _stop_refreshing(shared)
        if self.plugin_name is not None and not self.owns_client:
            with contextlib.suppress(Exception):  # a shared cluster outlives us: unregister
                self.client.unregister_worker_plugin(self.plugin_name)
        if self.owns_client:
            with contextlib.suppress(Exception):
                self.client.close(timeout=CLOSE_TIMEOUT_S)
        if self.cluster is not None:
            self._close_cluster()

    def _give_back_rate_leases(self) -> None:
        """The rate leases still count starts of the last `per` seconds: give them back, so
        that the semaphores close empty.  Every worker is sealed before any gives back, and
        a wait woken by a give-back returns its lease at once (no start follows)."""
        if not self.rate_names:
            return
        with contextlib.suppress(Exception):
            for name in self.rate_names:
                self.client.run(seal_rate_window, name, on_error="ignore")
            for name in self.rate_names:
                self.client.run(close_rate_window, name, on_error="ignore")
            deadline = time.monotonic() + RATE_DRAIN_WAIT_S
            for limit in self.limits:
                if limit.name in self.rate_names:
                    while limit.get_value() and time.monotonic() < deadline:
                        time.sleep(RATE_DRAIN_POLL_S)

    def _close_cluster(self) -> None:
        """Our own LocalCluster: its worker processes get WORKER_STOP_GRACE_S to stop, then
        are killed, as the local pool's terminate kills its workers (their process groups
        go with them: _WorkerSetup).  (A plain close lets a worker busy in a task Dask cannot
        interrupt hold the close for the nanny's 4 s.)"""
        nannies = list(getattr(self.cluster, "workers", {}).values())
        with contextlib.suppress(Exception):
            self.cluster.sync(_close_nannies, nannies, WORKER_STOP_GRACE_S)
        with contextlib.suppress(Exception):
            self.cluster.close(timeout=CLOSE_TIMEOUT_S)


async def _close_nannies(nannies: list[Any], grace_s: float) -> None:
    """Close each nanny and its worker process: the worker has 0.8 * grace_s to stop, then
    it is killed (distributed's Nanny.close(timeout=) contract)."""
    import asyncio

    await asyncio.gather(*(nanny.close(timeout=grace_s) for nanny in nannies),
                         return_exceptions=True)


def _stop_refreshing(semaphore: Any) -> None:
    """Let go of a semaphore the pool does not close: its lease refresher (a callback on the
    client's loop, holding it) stops, as Semaphore.close() stops it."""
    refresh = getattr(semaphore, "refresh_callback", None)  # none if no lease timeout
    if refresh is not None:
        refresh.stop()


def _close_quietly(limit: Any) -> None:
    try:
        limit.close()
    except Exception:
        pass


def require_distributed() -> None:
    """Raises ImportError when Dask distributed (the dask extra) is not installed."""
    _distributed()


def _scheduler_allowed_failures(dask_scheduler: Any) -> int:
    return int(dask_scheduler.allowed_failures)
