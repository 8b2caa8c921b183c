"""procqueue: a multiprocessing job runner for CPU-bound batches.

`procqueue.Pool` is a drop-in for `multiprocessing.Pool` with pinned workers, crash
recovery, timeouts, retries, `submit()` futures and lazy, bounded-memory `imap`.
"""

from .errors import ArgumentSerializationError as ArgumentSerializationError
from .errors import InitializerError as InitializerError
from .errors import PoolBrokenError as PoolBrokenError
from .errors import PoolClosedError as PoolClosedError
from .errors import ProcqueueError as ProcqueueError
from .errors import RemoteError as RemoteError
from .errors import RemoteTraceback as RemoteTraceback
from .errors import ResultSerializationError as ResultSerializationError
from .errors import TaskCancelledError as TaskCancelledError
from .errors import ServiceLostError as ServiceLostError
from .errors import TaskFailed as TaskFailed
from .errors import TaskTimeoutError as TaskTimeoutError
from .errors import WorkerCrashedError as WorkerCrashedError
from .errors import WorkerExitedError as WorkerExitedError
from .errors import is_retry_stopped as is_retry_stopped

from typing import TYPE_CHECKING

# Light (multiprocessing only); installs the hook that tells a start method the program chose
# with multiprocessing.set_start_method() from one multiprocessing fixed by itself.
from . import fork_server as fork_server
from .lazy import lazy_getattr

if TYPE_CHECKING:  # explicit re-exports for type checkers; loaded lazily at run time
    from .journal import Journal as Journal
    from .journal import JournalBusyError as JournalBusyError
    from .journal import JournalError as JournalError
    from .journal import JournalFormatError as JournalFormatError
    from .journal import JournalMismatchError as JournalMismatchError
    from .limits import Limit as Limit
    from .limits import Semaphore as Semaphore
    from .limits import named_limits as named_limits
    from .report import render_report as render_report
    from .stats import TaskEvent as TaskEvent
    from .stats import Utilisation as Utilisation
    from .stats import utilisation as utilisation
    from .trace import TraceWriter as TraceWriter
    from .fork_server import start_fork_server as start_fork_server
    from .trace import load_trace as load_trace
    from .limits import Rate as Rate
    from .pool import CallOptions as CallOptions
    from .scheduler import HaltPolicy as HaltPolicy
    from .pool import Pool as Pool
    from .pool import PoolView as PoolView
    from .pool import Queue as Queue
    from .pool import PoolStats as PoolStats
    from .pool import WorkerStats as WorkerStats
    from .results import AsyncResult as AsyncResult
    from .results import IMapIterator as IMapIterator
    from .results import MapResult as MapResult
    from .results import OutcomeIterator as OutcomeIterator
    from .results import TaskOutcome as TaskOutcome
    from .taskqueue import TaskQueue as TaskQueue
    from .taskqueue import TaskHandle as TaskHandle
    from .stored_call import FunctionRef as FunctionRef
    from .store import TaskStatus as TaskStatus
    from .store import TaskRecord as TaskRecord
    from .service import ServiceSummary as ServiceSummary
    from .dashboard import Dashboard as Dashboard
    from .errors import StoreError as StoreError
    from .errors import StoreFormatError as StoreFormatError
    from .errors import StoreUnsafeError as StoreUnsafeError

__version__ = "0.1.0"

# name -> module, imported on first access (PEP 562): `import procqueue.worker`, which every
# worker process does, then costs a few milliseconds instead of the whole pool machinery.
_LAZY = {
    "start_fork_server": "fork_server",
    "render_report": "report",
    "TaskEvent": "stats",
    "Utilisation": "stats",
    "utilisation": "stats",
    "TraceWriter": "trace",
    "load_trace": "trace",
    "Journal": "journal",
    "JournalError": "journal",
    "JournalBusyError": "journal",
    "JournalMismatchError": "journal",
    "JournalFormatError": "journal",
    "Limit": "limits",
    "Semaphore": "limits",
    "named_limits": "limits",
    "Rate": "limits",
    "CallOptions": "pool",
    "HaltPolicy": "scheduler",
    "Pool": "pool",
    "PoolView": "pool",
    "Queue": "pool",
    "PoolStats": "pool",
    "WorkerStats": "pool",
    "AsyncResult": "results",
    "IMapIterator": "results",
    "MapResult": "results",
    "OutcomeIterator": "results",
    "TaskOutcome": "results",
    "TaskQueue": "taskqueue",
    "TaskHandle": "taskqueue",
    "FunctionRef": "stored_call",
    "TaskStatus": "store",
    "TaskRecord": "store",
    "ServiceSummary": "service",
    "Dashboard": "dashboard",
    "StoreError": "errors",
    "StoreFormatError": "errors",
    "StoreUnsafeError": "errors",
}


__getattr__ = lazy_getattr(globals(), _LAZY)


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "Pool", "PoolView", "Journal", "JournalError", "JournalBusyError", "JournalMismatchError",
    "JournalFormatError", "TraceWriter", "load_trace", "render_report", "TaskEvent",
    "Utilisation", "utilisation",
    "CallOptions", "HaltPolicy", "Queue", "Limit", "Semaphore", "named_limits", "Rate",
    "PoolStats", "WorkerStats",
    "AsyncResult", "MapResult", "IMapIterator",
    "OutcomeIterator", "TaskOutcome", "ProcqueueError", "TaskFailed", "WorkerCrashedError",
    "WorkerExitedError", "TaskTimeoutError", "TaskCancelledError", "ServiceLostError",
    "ArgumentSerializationError", "ResultSerializationError", "RemoteError",
    "RemoteTraceback", "PoolBrokenError", "InitializerError", "PoolClosedError",
    "is_retry_stopped",
    "start_fork_server", "__version__",
    "TaskQueue", "TaskHandle", "FunctionRef", "TaskStatus", "TaskRecord", "ServiceSummary",
    "StoreError", "StoreFormatError", "StoreUnsafeError", "Dashboard",
]
