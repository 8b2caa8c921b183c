"""The durable run journal: a SQLite file that lets a crashed or interrupted batch resume.

Each input is keyed by the content of its argument (``Journal.key_of``: sha256 of its
protocol-5 pickle), so a resumed run finds what an earlier run finished whatever order the
inputs come in.  The journal belongs to ONE function: its identity (a hash of the code it
runs, comments and layout left out, plus its name, computed by the caller; see
``function_identity`` and procqueue.code_identity) is stored when the file is created, and a
run whose identity differs is refused with JournalMismatchError unless it passes
``force=True``.

    supervisor thread                 journal writer thread (one per Journal)       caller
    -----------------                 ---------------------------------------       ------
    sink.deliver(task, ok, value) ─►  buffer ─► FLUSH_INTERVAL_S after its first outcome, or
                                        when one worker's outcomes took FLUSH_COMPUTE_S to
                                        run, or at FLUSH_MAX_OUTCOMES:
                                        build rows (key, pickles, error text)
                                        BEGIN; INSERT ... ON CONFLICT ...; COMMIT
                                        then, for each outcome of that transaction:
                                          inner_sink.deliver(task, ok, value)  ──────►  result
    feeder (lookup hit) ─► sink.replay(index, item, stored) ─► forwarded in the same order,
                                        never written again

"A result is committed before it is reported": the inner sink sees an outcome only after the
transaction holding it committed, so a SIGKILL at any instant loses only outcomes nobody was
told about.  Every outcome of a sink is forwarded from the writer thread, in delivery order,
so the inner sink still sees one thread (callbacks of map_async run there).

What a SIGKILL of the run loses (then computed again by the next run): at most the running
tasks plus about 15 ms of finished compute per worker.  Finished work waits in two places:
- in the worker, until its batch ends: Pool(journal=...) gives a call batches of about
  BATCH_WORK_S (10 ms) of work (ChunkSizer.with_target; an explicit chunksize is kept, and
  then a worker holds up to a chunk, at most its 50 ms send interval, of finished tasks);
- in the journal's buffer, until its commit: one is due as soon as one worker's buffered
  outcomes took FLUSH_COMPUTE_S (5 ms) to run, and at the latest FLUSH_INTERVAL_S after the
  first one arrived (tiny tasks: many outcomes per commit).
Outcomes that arrive while a commit is under way wait for the next one (a commit takes well
under a millisecond without fsync), and a starved writer thread (a machine with no CPU to
spare) stretches "about".  Measured (300 tasks of 5 ms on 2 workers, SIGKILLed mid-run): 0 to
4 computed again, where batches of 25 ms and a commit every 50 ms lost 7 to 22.  Commits stay
about one per FLUSH_COMPUTE_S of wall time whatever the number of workers: a commit empties
every worker's account.

Public API (what Pool(journal=...) and the CLI use):

    journal = Journal.open("run.db", function_identity=function_identity(fn),
                           former_identities=(format_1_function_identity(fn),),
                           force=False, retry_failed=False, durable=False,
                           flush_interval_s=FLUSH_INTERVAL_S, flush_max=FLUSH_MAX_OUTCOMES,
                           flush_compute_s=FLUSH_COMPUTE_S)
        JournalBusyError      another run (process or Journal object) holds the file
        JournalMismatchError  the file was written by a different function (force=True: keep
                              its results anyway and adopt the new identity)
        JournalFormatError    the file is not a procqueue journal (or a newer one); also a
                              procqueue.errors.StoreFormatError
        JournalUnsafeError    other users may write the file (also a StoreUnsafeError)
    Journal.read("run.db")           read-only, takes no lock: summary/export while a run goes on
    Journal.key_of(item) -> str      the input's key (of its first occurrence in a call)
    Journal.keys_of(items) -> list   the keys of a call's inputs in order: the k-th repetition
                                     of an input has a key of its own (InputKeys, one per call)
    journal.lookup(key) -> StoredOutcome | None
                                     None: run it.  A stored failure comes back as a failure
                                     (with its original exception type when it unpickles, else
                                     RemoteError) unless retry_failed=True, then None.  A result
                                     that could not be pickled was journaled as its repr only,
                                     so lookup returns None and it runs again.
    sink = JournalingSink(inner_sink, journal, key_of_task)    one per call (map, imap ...)
        sink.starting(task) / sink.deliver(task, ok, value)    the OutcomeSink protocol
        sink.replay(index, item, stored)                       report a journaled outcome
        sink.flush() / sink.close()                            wait until all are reported
    journal.set_total(n)             the run's number of inputs (summary's "pending")
    journal.summary(slowest=10) -> JournalSummary              str() of it is a report
    journal.outcomes() -> Iterator[TaskOutcome]                every outcome, in index order,
                                     with the input as given (`procqueue journal --export`)
    journal.export_jsonl(file) -> int                          one JSON object per input
    journal.statistics() -> JournalStatistics
    journal.write_error              a JournalWriteError if a commit failed (outcomes were still
                                     reported, but are not in the journal), else None
    journal.close()                  flush, stop the writer, release the lock (idempotent)

Storage choices:
- The file is a procqueue store of kind "journal", opened by procqueue.store.sqlite_file as
  the durable queues' files are (one storage layer): created with mode 0600 and refused when
  other users may write it (its pickles are code we would run), stamped with its kind and
  schema version in the meta table (journals of before the kind stamp open as journals), a
  file of another kind or a newer version refused.  Outcomes are kept as that layer keeps them
  (procqueue.store.codec: a pickle plus type name, message and traceback text for errors).
- WAL with synchronous=NORMAL: a commit is one append to the WAL file with no fsync, so it is
  durable against the death of the process (SIGKILL, OOM, Ctrl-C: the data is in the kernel's
  page cache), and a power loss or OS crash can roll back only the last transactions, never
  corrupt the file.  Those outcomes then run again.  ``durable=True`` selects synchronous=FULL
  (an fsync per commit) for the paranoid.
- Readers never block the writer (WAL): ``procqueue journal run.db`` works during a run.
- One run at a time: an flock on ``path + ".lock"`` held from open() to close().  The kernel
  drops it when the holder dies, so a SIGKILLed run never blocks the next one; forked children
  close their copy at fork (os.register_at_fork), so a forked worker cannot hold it either.
- Rows are appended in commit order and found through an in-memory index of their keys
  (loaded at open, ~100 bytes per input): an SQLite index on random hashes would make every
  commit rewrite pages all over it, at a cost growing with the journal.
- Only outcomes of the inputs are journaled: a task cancelled before it could finish (Ctrl-C,
  a halt, terminate, a cancelled imap) or that the pool could not run (it broke; the script
  failed to load in the workers: a missing module) is reported so but leaves its input
  pending, so the same command run again runs it.  (Journals of format 1 kept those as
  failures; opening one for a run forgets them.)
- A repeated input is a task of its own each time: its k-th occurrence in a call has its own
  key (the content key's hash with k; the first keeps the content key), hence its own row and
  outcome.  A failure never overwrites a success.
- The key is the pickle's hash: equal inputs whose pickles differ (a set of strings under a
  different PYTHONHASHSEED, a dict built in another order) are different inputs to the journal
  and run again.  Unpicklable inputs are keyed by their repr.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pickle
import sqlite3
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import IO, Any, Callable, Iterable, Iterator, NamedTuple, Protocol

from . import code_identity
from .errors import (PoolBrokenError, PoolClosedError, ProcqueueError, StoreFormatError,
                     StoreUnsafeError, TaskCancelledError, is_retry_stopped,
                     remote_traceback_text)
from .protocol import PICKLE_PROTOCOL, dumps_function
from .results import TaskOutcome
from .store.codec import error_columns, json_or_repr, rebuild_error, short_repr
from .store.sqlite_file import open_store_file, read_meta
from .tasks import OutcomeSink

KIND = "journal"  # the store kind stamped in the file's meta table (procqueue.store)
SCHEMA_VERSION = 2  # bumped on any change of the tables below (2: outcomes.input)
FLUSH_INTERVAL_S = 0.05  # an outcome waits at most this long (seconds) for its commit...
FLUSH_MAX_OUTCOMES = 2000  # ...or until this many outcomes are buffered...
FLUSH_COMPUTE_S = 0.005  # ...or until one worker's uncommitted outcomes took this long to run
BATCH_WORK_S = 0.010  # a journaled call's batches hold about this much work (Pool)
SLOWEST_DEFAULT = 10  # inputs listed by summary() by default
LOCK_SUFFIX = ".lock"
INPUT_PICKLE_MAX_BYTES = 64 * 1024  # a bigger input is kept as its repr only (export, outcomes)
# Failures that are no outcome of the input: the task was stopped (Ctrl-C, a halt, terminate)
# or the pool could not run it (it broke, the script did not load in the workers).  They are
# reported but not journaled, so the input stays pending.
NOT_OUTCOMES: tuple[type[BaseException], ...] = (TaskCancelledError, PoolBrokenError,
                                                 PoolClosedError)

# The meta table (name, value rows: kind, schema_version, created_at, function_identity,
# total ...) is created by procqueue.store.sqlite_file, as for every procqueue store.
_TABLES = {"meta", "outcomes"}
_SCHEMA = """
CREATE TABLE IF NOT EXISTS outcomes (
    id              INTEGER PRIMARY KEY,  -- assigned in commit order: inserts are appends
    key             TEXT NOT NULL,     -- Journal.key_of(input); unique (one writer keeps it so)
    khash           INTEGER NOT NULL,  -- the key's first 60 bits (the in-memory index)
    idx             INTEGER NOT NULL,  -- position in the run's input (the latest run's)
    input_repr      TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('done', 'failed')),
    attempts        INTEGER NOT NULL,
    result          BLOB,              -- pickled result; NULL if it failed or did not pickle
    result_repr     TEXT,              -- set only when the result could not be pickled
    error_type      TEXT,              -- qualified type name of the exception
    error_message   TEXT,
    error_traceback TEXT,              -- the remote traceback text
    error           BLOB,              -- the pickled exception, NULL if it did not pickle
    seconds         REAL NOT NULL,     -- run time of the last attempt
    pid             INTEGER,           -- worker pid of the last attempt
    finished_at     REAL NOT NULL,     -- time.time() when the outcome reached the journal
    committed_at    REAL NOT NULL,
    runs            INTEGER NOT NULL,  -- times an outcome was written (re-run failures: > 1)
    input           BLOB               -- the input's pickle (format 2); NULL if it was bigger
                                       -- than INPUT_PICKLE_MAX_BYTES or did not pickle
);
CREATE INDEX IF NOT EXISTS outcomes_by_idx ON outcomes (idx);
"""

_INSERT = """
INSERT INTO outcomes (id, key, khash, idx, input_repr, state, attempts, result, result_repr,
                      error_type, error_message, error_traceback, error, seconds, pid,
                      finished_at, committed_at, input, runs)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1)
"""

_REPLACE = """
UPDATE outcomes SET key = ?, khash = ?, idx = ?, input_repr = ?, state = ?, attempts = ?,
    result = ?, result_repr = ?, error_type = ?, error_message = ?, error_traceback = ?,
    error = ?, seconds = ?, pid = ?, finished_at = ?, committed_at = ?, input = ?,
    runs = runs + 1
WHERE id = ?
"""

_LOOKUP = """
SELECT idx, state, attempts, result, error_type, error_message, error_traceback, error,
       seconds, pid, finished_at
FROM outcomes WHERE id = ? AND key = ?
"""


# ---- errors ---------------------------------------------------------------------------------

class JournalError(ProcqueueError):
    """A problem with a run journal file."""


class JournalBusyError(JournalError):
    """Another run (another process, or another Journal object) has the journal open."""

    def __init__(self, path: str, holder_pid: int | None) -> None:
        self.path = path
        self.holder_pid = holder_pid
        if holder_pid is None:
            holder = "another run"
        elif holder_pid == os.getpid():
            holder = f"another Journal in this process (pid {holder_pid})"
        else:
            holder = f"another run (pid {holder_pid})"
        super().__init__(f"journal {path} is in use by {holder}; wait for that run to end, "
                         "or use another journal file")


class JournalMismatchError(JournalError):
    """The journal was written by a different function (or script) than this run's."""

    def __init__(self, path: str, stored_identity: str, identity: str) -> None:
        self.path = path
        self.stored_identity = stored_identity
        self.identity = identity
        super().__init__(
            f"journal {path} was written by a different function: stored {stored_identity!r}, "
            f"this run {identity!r}.  The script or function changed since; pass force=True "
            "(--force) to keep its results anyway, or start a new journal file")


class JournalFormatError(JournalError, StoreFormatError):
    """The file is not a procqueue journal, or one written by a newer procqueue.  Also a
    procqueue.errors.StoreFormatError: the journal is one of procqueue's stores."""


class JournalUnsafeError(JournalError, StoreUnsafeError):
    """The journal file is writable by other users: its pickles are code procqueue would run
    (see procqueue.store.sqlite_file)."""


class JournalWriteError(JournalError):
    """A commit failed (disk full, I/O error): the outcomes were reported but not journaled."""


# ---- values -------------------------------------------------------------------------------

@dataclass(frozen=True)
class StoredOutcome:
    """One input's journaled outcome, as lookup() rebuilds it."""

    key: str
    index: int  # position in the input of the run that wrote it
    ok: bool
    value: Any  # the result if ok, else None
    error: BaseException | None  # the exception if not ok (remote traceback as __cause__)
    attempts: int
    seconds: float
    pid: int | None
    finished_at: float  # time.time()


@dataclass(frozen=True)
class StoredTask:
    """What a sink needs of a task, for an outcome replayed from the journal (it never ran in
    this run: pid and seconds are those of the run that computed it)."""

    index: int
    input: Any
    attempts: int
    seconds: float
    pid: int | None


@dataclass(frozen=True)
class SlowInput:
    index: int
    input_repr: str
    seconds: float


@dataclass(frozen=True)
class JournalSummary:
    path: str
    function_identity: str
    done: int
    failed: int
    total: int | None  # inputs of the latest run, when it told us (set_total)
    unstored: int  # done, but the result did not pickle: it will run again
    slowest: tuple[SlowInput, ...]

    @property
    def pending(self) -> int | None:
        """Inputs of the latest run without an outcome, when the total is known."""
        if self.total is None:
            return None
        return max(0, self.total - self.done - self.failed)

    def __str__(self) -> str:
        pending = "unknown" if self.pending is None else str(self.pending)
        lines = [f"journal {self.path}", f"  function: {self.function_identity}",
                 f"  done: {self.done}  failed: {self.failed}  pending: {pending}"]
        if self.unstored:
            lines.append(f"  ({self.unstored} done results could not be pickled; they will run "
                         "again)")
        if self.slowest:
            lines.append("  slowest inputs:")
            lines += [f"    {s.seconds:10.3f} s  #{s.index}  {s.input_repr}"
                      for s in self.slowest]
        return "\n".join(lines)


@dataclass(frozen=True)
class JournalStatistics:
    path: str
    outcomes_committed: int  # by this Journal object
    commits: int  # transactions
    buffered: int  # outcomes delivered, not committed yet
    unrecorded: int  # outcomes reported without being journaled (write error, after close)
    write_error: str | None


class TaskLike(Protocol):
    """What the journal reads of a task (procqueue.tasks.Task, TaskOutcome, StoredTask)."""

    @property
    def index(self) -> int: ...
    @property
    def input(self) -> Any: ...
    @property
    def attempts(self) -> int: ...
    @property
    def seconds(self) -> float: ...
    @property
    def pid(self) -> int | None: ...


class Sink(Protocol):
    def starting(self, task: Any) -> bool: ...
    def deliver(self, task: Any, ok: bool, value: Any) -> None: ...


# ---- keys and identities ------------------------------------------------------------------

def key_of(item: Any) -> str:
    """sha256 of the item's protocol-5 pickle, big buffers (numpy arrays) hashed in place
    rather than copied into the pickle; the repr for an unpicklable item."""
    buffers: list[pickle.PickleBuffer] = []
    try:
        inband = pickle.dumps(item, PICKLE_PROTOCOL, buffer_callback=buffers.append)
    except Exception:
        return hashlib.sha256(b"repr:" + repr(item).encode("utf-8", "backslashreplace")
                              ).hexdigest()
    digest = hashlib.sha256(inband)
    try:
        for buffer in buffers:
            digest.update(buffer.raw())
    except BufferError:  # a non-contiguous buffer: hash the plain, in-band pickle instead
        return hashlib.sha256(pickle.dumps(item, PICKLE_PROTOCOL)).hexdigest()
    return digest.hexdigest()


def occurrence_key(content_key: str, occurrence: int) -> str:
    """The key of the `occurrence`-th repetition (0: the first time) of the input whose
    content key (key_of) is `content_key`: a repeated input is a task of its own each time.
    The first occurrence keeps the content key itself, as journals of before had it."""
    if occurrence == 0:
        return content_key
    return hashlib.sha256(f"{content_key}#{occurrence}".encode("ascii")).hexdigest()


class InputKeys:
    """The keys of one call's inputs, given them in input order: `::: 1 1 1 1` is four tasks
    with four keys, and a rerun of the same inputs pairs each occurrence with its own
    outcome (the k-th 1 with the k-th 1's)."""

    def __init__(self) -> None:
        # _khash of a content key -> its occurrences so far.  Ints, not the keys: ~100 bytes
        # per distinct input.  Two inputs whose keys share 60 bits (odds 1e-6 in a million)
        # only number their occurrences together: each keeps its own content, so a changed
        # number costs a re-run, never another input's result.
        self._seen: dict[int, int] = {}

    def next_key(self, item: Any) -> str:
        """The key of `item`, the next input of the call."""
        content = key_of(item)
        khash = _khash(content)
        occurrence = self._seen.get(khash, 0)
        self._seen[khash] = occurrence + 1
        return occurrence_key(content, occurrence)


def keys_of(items: Iterable[Any]) -> list[str]:
    """The keys of a call's inputs, in order (InputKeys)."""
    keys = InputKeys()
    return [keys.next_key(item) for item in items]


def function_identity(fn: Any) -> str:
    """``module.qualname:hash`` of a function for Journal.open, the hash of the code it runs
    (procqueue.code_identity): a comment, a blank line or a moved function is no change, an
    edited expression, constant or helper is (then force=True)."""
    digest = hashlib.sha256(code_identity.fingerprint(fn))
    return f"{_function_name(fn)}:{digest.hexdigest()[:32]}"


def format_1_function_identity(fn: Any) -> str:
    """The identity procqueue gave `fn` before function_identity hashed its code (the hash of
    its cloudpickle and its module's file bytes): pass it as Journal.open's
    former_identities, so that journals written then still open for the same function."""
    digest = hashlib.sha256(dumps_function(fn))
    module = sys.modules.get(getattr(fn, "__module__", "") or "")
    source = getattr(module, "__file__", None)
    if source and source.endswith(".py"):
        try:
            with open(source, "rb") as f:
                digest.update(f.read())
        except OSError:
            pass
    return f"{_function_name(fn)}:{digest.hexdigest()[:32]}"


def _function_name(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


# ---- the lock ----------------------------------------------------------------------------

# Lock descriptors open in this process; a forked child closes its copies (not LOCK_UN, which
# would release the parent's lock too), so only the process that opened the journal holds it.
_LOCK_FDS: set[int] = set()


def _close_inherited_lock_fds() -> None:
    for fd in _LOCK_FDS:
        try:
            os.close(fd)
        except OSError:
            pass
    _LOCK_FDS.clear()


os.register_at_fork(after_in_child=_close_inherited_lock_fds)


def _acquire_lock(path: str) -> int:
    lock_path = path + LOCK_SUFFIX
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_pid(fd)
        os.close(fd)
        raise JournalBusyError(path, holder) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _LOCK_FDS.add(fd)
    return fd


def _release_lock(fd: int) -> None:
    if fd not in _LOCK_FDS:
        # Closed already, by the fork hook above in a child: the number may name one of the
        # child's own files by now, which must not be truncated or closed from here.
        return
    _LOCK_FDS.discard(fd)
    try:
        os.ftruncate(fd, 0)  # no stale pid for the next reader (released on close below)
    finally:
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


# ---- the journal ---------------------------------------------------------------------------

class Journal:
    """A run journal file; see the module docstring.  Thread-safe."""

    def __init__(self, path: str, connection: sqlite3.Connection, lock_fd: int | None,
                 function_identity: str, *, retry_failed: bool, readonly: bool,
                 flush_interval_s: float, flush_max: int, flush_compute_s: float) -> None:
        # Use Journal.open() or Journal.read().
        self.path = path
        self.function_identity = function_identity
        self.retry_failed = retry_failed
        self.readonly = readonly
        self._db = connection
        self._db_lock = threading.Lock()  # one connection, used by callers and the writer
        self._lock_fd = lock_fd
        self._closed = False
        # The key index lives in memory: khash -> id << 1 | replaceable (failed, or its
        # result did not pickle).  An SQLite index on random hashes would make every commit
        # rewrite pages all over it (measured: 10-16 us per outcome at 100k rows, growing
        # with the journal); with this, a commit only appends.  ~100 bytes per input.
        self._index: dict[int, int] = {}
        self._next_id = 1
        self._load_index()
        self._has_input_column = "input" in _outcome_columns(connection)
        self.write_error: JournalWriteError | None = None
        self._writer = _Writer(self, flush_interval_s, flush_max, flush_compute_s)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, function_identity: str,
             former_identities: Iterable[str] = (), force: bool = False,
             retry_failed: bool = False, durable: bool = False,
             flush_interval_s: float = FLUSH_INTERVAL_S,
             flush_max: int = FLUSH_MAX_OUTCOMES,
             flush_compute_s: float = FLUSH_COMPUTE_S) -> "Journal":
        """Open (or create) the journal of a run of the function `function_identity`, for
        writing, holding its lock until close()."""
        if not isinstance(function_identity, str) or not function_identity:
            raise ValueError("function_identity must be a non-empty string")
        if not flush_interval_s > 0:
            raise ValueError(f"flush_interval_s must be > 0, not {flush_interval_s!r}")
        if not flush_compute_s > 0:
            raise ValueError(f"flush_compute_s must be > 0, not {flush_compute_s!r}")
        if isinstance(flush_max, bool) or not isinstance(flush_max, int) or flush_max < 1:
            raise ValueError(f"flush_max must be an int >= 1, not {flush_max!r}")
        path = os.fspath(path)
        lock_fd = _acquire_lock(path)
        db: sqlite3.Connection | None = None
        try:
            db = _open_file(path, readonly=False, durable=durable)
            _upgrade(db, path)
            _check_identity(db, path, function_identity, frozenset(former_identities), force)
            return cls(path, db, lock_fd, function_identity, retry_failed=retry_failed,
                       readonly=False, flush_interval_s=flush_interval_s, flush_max=flush_max,
                       flush_compute_s=flush_compute_s)
        except BaseException:
            if db is not None:
                db.close()
            _release_lock(lock_fd)
            raise

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> "Journal":
        """Open an existing journal read-only, without its lock: summary(), export_jsonl()
        and lookup() work while a run is writing it."""
        path = os.fspath(path)
        if not os.path.exists(path):
            raise JournalFormatError(f"no journal at {path}")
        db = _open_file(path, readonly=True)
        try:
            identity = _read_meta(db, path).get("function_identity", "")
            return cls(path, db, None, identity, retry_failed=False, readonly=True,
                       flush_interval_s=FLUSH_INTERVAL_S, flush_max=FLUSH_MAX_OUTCOMES,
                       flush_compute_s=FLUSH_COMPUTE_S)
        except BaseException:
            db.close()
            raise

    key_of = staticmethod(key_of)
    keys_of = staticmethod(keys_of)

    # ---- reading ----

    def lookup(self, key: str) -> StoredOutcome | None:
        """The journaled outcome of the input with this key, or None if it must run."""
        with self._db_lock:
            self._check_open()
            entry = self._index.get(_khash(key))
            if entry is None:
                return None
            row = self._db.execute(_LOOKUP, (entry >> 1, key)).fetchone()
        if row is None:
            return None
        (index, state, attempts, result, error_type, message, tb_text, error_blob, seconds,
         pid, finished_at) = row
        if state == "done":
            if result is None:
                return None  # only its repr was kept: run it again
            try:
                value = pickle.loads(result)
            except Exception:
                return None  # e.g. its class is gone: run it again
            return StoredOutcome(key, index, True, value, None, attempts, seconds, pid,
                                 finished_at)
        if self.retry_failed:
            return None
        error = _stored_error(error_type, message, tb_text, error_blob)
        return StoredOutcome(key, index, False, None, error, attempts, seconds, pid,
                             finished_at)

    def summary(self, slowest: int = SLOWEST_DEFAULT) -> JournalSummary:
        if isinstance(slowest, bool) or not isinstance(slowest, int) or slowest < 0:
            raise ValueError(f"slowest must be an int >= 0, not {slowest!r}")
        with self._db_lock:
            self._check_open()
            counts = dict(self._db.execute(
                "SELECT state, COUNT(*) FROM outcomes GROUP BY state").fetchall())
            unstored = self._db.execute(
                "SELECT COUNT(*) FROM outcomes WHERE state = 'done' AND result IS NULL"
            ).fetchone()[0]
            slow = self._db.execute(
                "SELECT idx, input_repr, seconds FROM outcomes ORDER BY seconds DESC, idx "
                "LIMIT ?", (slowest,)).fetchall()
            meta = _read_meta(self._db, self.path)
        total = meta.get("total")
        return JournalSummary(self.path, meta.get("function_identity", ""),
                              counts.get("done", 0), counts.get("failed", 0),
                              int(total) if total is not None else None, unstored,
                              tuple(SlowInput(i, r, s) for i, r, s in slow))

    def outcomes(self) -> Iterator[TaskOutcome]:
        """Every journaled outcome, in index order (the input positions of the run that
        wrote it), as the TaskOutcome that run reported: the input as given (its repr when
        it was not kept: a pickle over INPUT_PICKLE_MAX_BYTES, or a journal of format 1),
        the result or the exception as lookup() rebuilds them, attempts, seconds and pid.
        `procqueue journal --export` writes them as `procqueue map` writes its records."""
        for row in self._rows_by_index():
            yield _outcome_of(row)

    def export_jsonl(self, file: IO[str]) -> int:
        """Write one JSON object per input, in index order: index, input (as given if JSON
        can hold it, else its repr), ok, result (likewise), error (type, message, traceback),
        attempts, seconds, pid.  Returns the number of lines written.  (procqueue map's
        record format: format outcomes() as the CLI does.)"""
        count = 0
        for row in self._rows_by_index():
            file.write(json.dumps(_export_record(row)) + "\n")
            count += 1
        return count

    def statistics(self) -> JournalStatistics:
        return self._writer.statistics(self.path, self.write_error)

    # ---- writing ----

    def set_total(self, total: int) -> None:
        """The number of inputs of this run, for summary()'s pending count."""
        if isinstance(total, bool) or not isinstance(total, int) or total < 0:
            raise ValueError(f"total must be an int >= 0, not {total!r}")
        with self._db_lock:
            self._check_writable()
            with self._db:
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('total', ?)",
                                 (str(total),))

    def close(self) -> None:
        """Commit and report every buffered outcome, stop the writer, release the lock."""
        if self._closed:
            return
        self._writer.stop()
        with self._db_lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._db.close()  # the last connection checkpoints and removes the WAL
            finally:
                if self._lock_fd is not None:
                    _release_lock(self._lock_fd)
                    self._lock_fd = None

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "closed" if self._closed else "read-only" if self.readonly else "open"
        return f"<procqueue.Journal {self.path} {mode}>"

    # ---- internals ----

    def _write(self, rows: list[tuple[Any, ...]]) -> None:
        """Commit rows (key, idx, ... as _row makes them) in one transaction (writer thread):
        a new key is appended; a known one replaces its row only if that one failed or kept
        no result, so a failure never overwrites a success."""
        with self._db_lock:
            self._check_writable()
            inserts: list[tuple[Any, ...]] = []
            replaces: list[tuple[Any, ...]] = []
            changed: dict[int, int] = {}
            next_id = self._next_id
            for row in rows:
                khash = _khash(row[0])
                entry = changed.get(khash, self._index.get(khash))
                replaceable = row[3] == "failed" or (row[3] == "done" and row[5] is None)
                if entry is None:
                    inserts.append((next_id, row[0], khash) + row[1:])
                    changed[khash] = next_id << 1 | replaceable
                    next_id += 1
                elif entry & 1:
                    replaces.append((row[0], khash) + row[1:] + (entry >> 1,))
                    changed[khash] = (entry >> 1) << 1 | replaceable
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany(_INSERT, inserts)
                self._db.executemany(_REPLACE, replaces)
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            self._index.update(changed)
            self._next_id = next_id

    def _load_index(self) -> None:
        with self._db_lock:
            rows = self._db.execute(
                "SELECT khash, id, state = 'failed' OR result IS NULL FROM outcomes")
            self._index = {khash: row_id << 1 | replaceable
                           for khash, row_id, replaceable in rows}
            last = self._db.execute("SELECT MAX(id) FROM outcomes").fetchone()[0]
            self._next_id = (last or 0) + 1

    def _rows_by_index(self) -> Iterator["_Row"]:
        # Pages of rows, so a big journal is not read into memory at once.  A journal of
        # format 1 opened read-only has no input column (a run's open adds it).
        input_column = "input" if self._has_input_column else "NULL"
        query = (f"SELECT idx, key, {input_column}, input_repr, state, attempts, result, "
                 "result_repr, error_type, error_message, error_traceback, error, seconds, "
                 "pid FROM outcomes WHERE (idx, key) > (?, ?) ORDER BY idx, key LIMIT 1000")
        last: tuple[int, str] = (-1, "")
        while True:
            with self._db_lock:
                self._check_open()
                page = self._db.execute(query, last).fetchall()
            if not page:
                return
            yield from (_Row(*row) for row in page)
            last = (page[-1][0], page[-1][1])

    def _check_open(self) -> None:
        if self._closed:
            raise JournalError(f"journal {self.path} is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self.readonly:
            raise JournalError(f"journal {self.path} was opened read-only (Journal.read)")


def _open_file(path: str, *, readonly: bool, durable: bool = False) -> sqlite3.Connection:
    """The journal's SQLite file, opened as every procqueue store is (procqueue.store:
    created 0600, refused when others may write it, kind and version checked, WAL), its
    errors raised as the journal's own."""
    try:
        return open_store_file(path, kind=KIND, version=SCHEMA_VERSION, schema=_SCHEMA,
                               tables=_TABLES, readonly=readonly, durable=durable)
    except StoreFormatError as exc:
        raise JournalFormatError(str(exc)) from exc
    except StoreUnsafeError as exc:
        raise JournalUnsafeError(str(exc)) from exc


def _read_meta(db: sqlite3.Connection, path: str) -> dict[str, str]:
    try:
        return read_meta(db, path)
    except StoreFormatError as exc:
        raise JournalFormatError(str(exc)) from exc


def _check_identity(db: sqlite3.Connection, path: str, identity: str,
                    former_identities: frozenset[str], force: bool) -> None:
    """Stamp a new journal with the function's identity; refuse another function's journal
    unless forced (then adopt the new identity, noting the one it replaced).  A journal
    stamped with one of the function's former identities (an older procqueue's way of
    computing them) is the function's: it takes the new one."""
    stored = _read_meta(db, path).get("function_identity")
    now = repr(time.time())
    with db:
        db.execute("BEGIN IMMEDIATE")
        if stored is None or stored in former_identities:
            db.execute("INSERT OR REPLACE INTO meta VALUES ('function_identity', ?)",
                       (identity,))
        elif stored != identity:
            if not force:
                raise JournalMismatchError(path, stored, identity)
            db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", [
                ("function_identity", identity), ("forced_over", stored),
                ("forced_at", now)])
        db.execute("INSERT OR REPLACE INTO meta VALUES ('opened_at', ?)", (now,))


def _upgrade(db: sqlite3.Connection, path: str) -> None:
    """Bring a journal of format 1 to SCHEMA_VERSION, in place, when a run opens it: it gets
    the input column (its rows keep only their inputs' repr), and forgets the failures that
    were no outcome of their input (NOT_OUTCOMES: cancelled tasks, mostly attempts 0, a
    script that did not load), so their inputs are pending and run."""
    if int(_read_meta(db, path).get("schema_version", "1")) >= SCHEMA_VERSION:
        return
    with db:
        db.execute("BEGIN IMMEDIATE")
        if "input" not in _outcome_columns(db):
            db.execute("ALTER TABLE outcomes ADD COLUMN input BLOB")
        db.executemany("DELETE FROM outcomes WHERE state = 'failed' AND error_type = ?",
                       [(name,) for name in _type_names(NOT_OUTCOMES)])
        db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)",
                   (str(SCHEMA_VERSION),))


def _type_names(classes: tuple[type[BaseException], ...]) -> set[str]:
    """The error_type names (as procqueue.store.codec writes them) of these classes and of
    their subclasses (InitializerError is a PoolBrokenError)."""
    names: set[str] = set()
    pending = list(classes)
    while pending:
        cls = pending.pop()
        names.add(f"{cls.__module__}.{cls.__qualname__}")
        pending += cls.__subclasses__()
    return names


def _outcome_columns(db: sqlite3.Connection) -> set[str]:
    return {row[1] for row in db.execute("PRAGMA table_info(outcomes)")}


def _khash(key: str) -> int:
    """The key's first 60 bits: a collision among a million inputs has odds of 1e-6 and only
    costs a re-run (lookup checks the full key)."""
    return int(key[:15], 16)


class _Row(NamedTuple):
    """An outcomes row, as export and outcomes() read it."""

    idx: int  # (not "index": a tuple has that method)
    key: str
    input: bytes | None
    input_repr: str
    state: str
    attempts: int
    result: bytes | None
    result_repr: str | None
    error_type: str | None
    error_message: str | None
    error_traceback: str | None
    error: bytes | None
    seconds: float
    pid: int | None


def _export_record(row: _Row) -> dict[str, Any]:
    record: dict[str, Any] = {"index": row.idx, "input": json_or_repr(row.input, row.input_repr),
                              "ok": row.state == "done"}
    if row.state == "done":
        record["result"] = json_or_repr(row.result, row.result_repr)
        record["error"] = None
    else:
        record["result"] = None
        record["error"] = {"type": row.error_type, "message": row.error_message,
                           "traceback": row.error_traceback}
    record.update(attempts=row.attempts, seconds=row.seconds, pid=row.pid)
    return record


def _outcome_of(row: _Row) -> TaskOutcome:
    ok = row.state == "done"
    value = _unpickled_or(row.result, row.result_repr) if ok else None
    error = None if ok else _stored_error(row.error_type or "", row.error_message or "",
                                          row.error_traceback or "", row.error)
    return TaskOutcome(row.idx, _unpickled_or(row.input, row.input_repr), ok, value, error,
                       row.attempts, row.seconds, row.pid)


def _stored_error(type_name: str, message: str, tb_text: str, blob: bytes | None
                  ) -> BaseException:
    """The journaled exception as the run reported it: one that carried no remote traceback
    (a crash, a timeout: no code of the task's raised it) was kept with none (_row), and
    comes back with no __cause__, so a resumed run's record is the first run's."""
    error = rebuild_error(type_name, message, tb_text, blob)
    if not tb_text:
        error.__cause__ = None
    return error


def _unpickled_or(blob: bytes | None, fallback: str | None) -> Any:
    """A stored value, or the text kept for it (its repr) when it was not stored or does not
    unpickle here (its class is gone)."""
    if blob is None:
        return fallback
    try:
        return pickle.loads(blob)
    except Exception as exc:
        return fallback if fallback is not None else f"<value that does not unpickle here: {exc!r}>"


# ---- the sink and its writer ------------------------------------------------------------

class JournalingSink(OutcomeSink):
    """Wraps a call's sink: an outcome is committed to the journal before the inner sink
    sees it (see the module docstring).  One per call; all of a journal's sinks share its
    writer thread, so outcomes of concurrent calls share transactions."""

    def __init__(self, inner: Sink, journal: Journal,
                 key_of_task: Callable[[TaskLike], str] | None = None) -> None:
        self.inner = inner
        self.journal = journal
        # Runs on the writer thread.  Default: hash the task's input again; a caller that
        # already computed keys (for lookup) passes e.g. ``lambda t: keys.pop(t.index)``.
        self.key_of_task = key_of_task or (lambda task: key_of(task.input))
        self._last_seq = 0  # sequence number of the latest outcome handed to the writer

    def starting(self, task: Any) -> bool:
        return self.inner.starting(task)

    def deliver(self, task: TaskLike, ok: bool, value: Any) -> None:
        """Buffer the outcome; it is reported once committed (supervisor thread: cheap).  A
        task stopped or never run (NOT_OUTCOMES: Ctrl-C, a halt, terminate, a broken pool, a
        script that does not load), or stopped while it waited for a retry (errors.
        retry_stopped), is reported but not journaled: its input stays pending, and the next
        run runs it."""
        record = ok or not (isinstance(value, NOT_OUTCOMES) or is_retry_stopped(value))
        seq = self.journal._writer.put(self, task, ok, value, record=record)
        if seq is not None:
            self._last_seq = seq

    def replay(self, index: int, item: Any, stored: StoredOutcome) -> None:
        """Report an outcome found by lookup(), in order with this sink's other outcomes,
        without writing it again."""
        task = StoredTask(index, item, stored.attempts, stored.seconds, stored.pid)
        value = stored.value if stored.ok else stored.error
        seq = self.journal._writer.put(self, task, stored.ok, value, record=False)
        if seq is not None:
            self._last_seq = seq

    def flush(self) -> None:
        """Return once every outcome delivered so far is committed and reported."""
        self.journal._writer.wait_forwarded(self._last_seq)

    close = flush  # idempotent: a sink holds no resource of its own

    def _forward(self, task: Any, ok: bool, value: Any) -> None:
        try:
            self.inner.deliver(task, ok, value)
        except Exception:
            print(f"procqueue: journal: error reporting the outcome of task {task.index} "
                  "(ignored):", file=sys.stderr)
            traceback.print_exc()


# (sink, task, ok, value, finished_at, record)
_Pending = tuple[JournalingSink, Any, bool, Any, float, bool]


class _Writer:
    """The journal's flusher thread: commits buffered outcomes in one transaction every
    flush_interval_s, or as soon as flush_max outcomes wait or one worker's waiting outcomes
    took flush_compute_s to run; then forwards them.  Started on first use."""

    def __init__(self, journal: Journal, flush_interval_s: float, flush_max: int,
                 flush_compute_s: float) -> None:
        self._journal = journal
        self._interval_s = flush_interval_s
        self._max = flush_max
        self._compute_s = flush_compute_s
        self._cond = threading.Condition(threading.Lock())
        self._buffer: list[_Pending] = []
        self._first_at = 0.0  # time.monotonic() when the oldest buffered outcome arrived
        # Run time of the buffered outcomes, by worker pid: what a SIGKILL would lose.  Per
        # worker, so that the commit rate stays about one per flush_compute_s of wall time
        # whatever the number of workers.
        self._compute_by_worker: dict[int | None, float] = {}
        self._due = False  # one worker's buffered compute reached flush_compute_s
        self._put_seq = 0
        self._forwarded_seq = 0
        self._urgent = False  # a flush() is waiting: commit now
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._committed = 0
        self._commits = 0
        self._unrecorded = 0

    def put(self, sink: JournalingSink, task: Any, ok: bool, value: Any, *,
            record: bool) -> int | None:
        """Buffer one outcome; its sequence number, or None if it was reported at once
        because the journal is closed (then it is not journaled: counted as unrecorded)."""
        with self._cond:
            if not self._stopping:
                if self._thread is None:
                    self._start()
                if not self._buffer:
                    self._first_at = time.monotonic()
                    self._cond.notify()
                self._buffer.append((sink, task, ok, value, time.time(), record))
                if record:
                    self._count_compute(task)
                if len(self._buffer) >= self._max or self._due:
                    self._cond.notify()
                self._put_seq += 1
                return self._put_seq
            self._unrecorded += record
        sink._forward(task, ok, value)  # rather reported unjournaled than lost
        return None

    def _count_compute(self, task: Any) -> None:
        """Add the outcome's run time to its worker's uncommitted compute (with _cond held)."""
        worker = task.pid
        compute = self._compute_by_worker.get(worker, 0.0) + (task.seconds or 0.0)
        self._compute_by_worker[worker] = compute
        if compute >= self._compute_s:
            self._due = True

    def wait_forwarded(self, seq: int) -> None:
        with self._cond:
            if self._forwarded_seq < seq:
                self._urgent = True
                self._cond.notify_all()
            while self._forwarded_seq < seq and self._thread is not None:
                self._cond.wait()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._urgent = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def statistics(self, path: str, error: JournalWriteError | None) -> JournalStatistics:
        with self._cond:
            return JournalStatistics(path, self._committed, self._commits, len(self._buffer),
                                     self._unrecorded, None if error is None else str(error))

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="procqueue-journal",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                self._commit(batch)
                for sink, task, ok, value, _, _ in batch:
                    sink._forward(task, ok, value)
                with self._cond:
                    self._forwarded_seq += len(batch)
                    self._cond.notify_all()
        finally:
            with self._cond:
                self._thread = None  # wakes flush() waiters even if this thread crashed
                self._cond.notify_all()

    def _next_batch(self) -> list[_Pending] | None:
        """Wait for a batch worth committing: FLUSH_INTERVAL_S after its first outcome, a
        full buffer, FLUSH_COMPUTE_S of one worker's compute, a flush() or close(); None
        when stopped and drained."""
        with self._cond:
            while not self._buffer:
                if self._stopping:
                    return None
                self._cond.wait()
            deadline = self._first_at + self._interval_s
            while len(self._buffer) < self._max and not self._urgent and not self._due:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch, self._buffer = self._buffer, []
            self._urgent = self._stopping
            self._due = False
            self._compute_by_worker.clear()
            return batch

    def _commit(self, batch: list[_Pending]) -> None:
        rows: list[tuple[Any, ...]] = []
        now = time.time()
        for sink, task, ok, value, finished_at, record in batch:
            if record:
                row = _row(sink, task, ok, value, finished_at, now)
                if row is not None:
                    rows.append(row)
        if not rows:
            return
        try:
            self._journal._write(rows)
        except Exception as exc:
            self._write_failed(exc, len(rows))
            return
        with self._cond:
            self._committed += len(rows)
            self._commits += 1

    def _write_failed(self, exc: Exception, count: int) -> None:
        with self._cond:
            self._unrecorded += count
        if self._journal.write_error is None:
            error = JournalWriteError(f"journal {self._journal.path}: a commit failed ({exc!r}); "
                                      "outcomes are still reported but not journaled")
            error.__cause__ = exc
            self._journal.write_error = error
            print(f"procqueue: {error}", file=sys.stderr)


def _row(sink: JournalingSink, task: Any, ok: bool, value: Any, finished_at: float,
         committed_at: float) -> tuple[Any, ...] | None:
    """The outcomes row of one outcome; None (and a warning) if its key cannot be made."""
    try:
        key = sink.key_of_task(task)
    except Exception:
        print(f"procqueue: journal: no key for task {task.index}; not journaled:",
              file=sys.stderr)
        traceback.print_exc()
        return None
    result: bytes | None = None
    result_repr: str | None = None
    error_type = message = tb_text = None
    error_blob: bytes | None = None
    if ok:
        try:
            result = pickle.dumps(value, PICKLE_PROTOCOL)
        except Exception:
            result_repr = short_repr(value)  # flagged by result IS NULL: it runs again
    else:
        error_type, message, tb_text, error_blob = error_columns(value)
        if remote_traceback_text(value.__cause__) is None:
            tb_text = ""  # a crash, a timeout: no remote traceback to keep (_stored_error)
    return (key, task.index, short_repr(task.input), "done" if ok else "failed",
            task.attempts, result, result_repr, error_type, message, tb_text, error_blob,
            task.seconds, task.pid, finished_at, committed_at, _input_pickle(task.input))


def _input_pickle(item: Any) -> bytes | None:
    """The input's pickle, kept so that an export gives the input as given; None for one
    holding big buffers (numpy arrays) or whose pickle is over INPUT_PICKLE_MAX_BYTES (the
    journal is no copy of a batch's data: its repr is kept), or that does not pickle."""
    buffers: list[pickle.PickleBuffer] = []
    try:  # buffers out of band: an array's data is never copied only to be thrown away
        blob = pickle.dumps(item, PICKLE_PROTOCOL, buffer_callback=buffers.append)
    except Exception:
        return None
    return None if buffers or len(blob) > INPUT_PICKLE_MAX_BYTES else blob


__all__ = [
    "Journal", "JournalingSink", "StoredOutcome", "StoredTask", "JournalSummary", "SlowInput",
    "JournalStatistics", "JournalError", "JournalBusyError", "JournalMismatchError",
    "JournalFormatError", "JournalUnsafeError", "JournalWriteError", "InputKeys", "key_of",
    "keys_of", "occurrence_key", "function_identity", "format_1_function_identity",
    "INPUT_PICKLE_MAX_BYTES",
]
