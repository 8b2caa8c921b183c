"""The code that runs inside a worker process.

Start-up, in this order: lead a new process group (so a timeout or terminate can kill the task's
own subprocesses too), die with the supervisor (PR_SET_PDEATHSIG plus a watchdog thread on a
pipe only the supervisor holds open), ignore SIGINT (Ctrl-C is the supervisor's to handle: one
traceback, not one per worker), on SIGTERM send what the batch has finished before dying (see
_send_unsent_then_die), cap BLAS threads, pin to the slot's CPU, run the initializer,
then say Ready.  After that: receive RunTasks (or RunBlock), run each item, send BatchResults
(BlockResults), until Stop or
EOF.  Kept light to import: the fork server or spawn imports this module for every worker.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from functools import partial
from multiprocessing import heap, parent_process
from multiprocessing import util as mp_util
from typing import Any, Callable

from .affinity import pin_current_process
from .errors import ArgumentSerializationError
from .fork_server import null_over
from .give_back import HeldWork
from .item_run import error_of, run_item, unpicklable_result
from .process_group import become_group_leader, kill_own_group
from .protocol import (UNMAPPED, BatchResults, BlockResults, CallKind,
                       CallsFunction, InitFailed, InitializerCall, LoadFunction, Ready, RunBlock,
                       RunTasks, Stop, apply_call, capture_exception, dumps, dumps_message,
                       dumps_plain_data, loads)

# Slot state shared with the supervisor (an int64 array): the task now running and when
# it started, written here before each item and read by the supervisor on a crash or a
# deadline; and up to two revoked batch ids, written by the supervisor when a call is cancelled
# without killing (the items of a revoked batch that have not started are skipped: a batch
# already sent to this worker's pipe cannot be taken back any other way).
CURRENT_TASK = 0
# time.monotonic_ns() at the start of CURRENT_TASK; negated while the worker is loading the
# task's function first (importing a module can take seconds on a loaded machine, and is not
# the task's run time: timeouts.py gives it a grace)
STARTED_NS = 1
REVOKED = (2, 3)  # batch ids whose remaining items must not start
BLOCK_POSITION = 4  # when CURRENT_TASK is a block: the position of the input running
SLOT_STATE_SIZE = 5
IDLE = -1  # CURRENT_TASK between batches; a REVOKED entry with nothing revoked
# CURRENT_TASK while the worker reads its next message from the pipe.  A worker that dies while
# IDLE had read none of the batches it was sent (killed from outside as it waited): they go
# back uncharged.  One that dies reading may have been killed by what it read (an argument
# too big for memory): the first task it held is charged, so that such a batch cannot kill
# worker after worker for ever.
RECEIVING = -2

INIT_FAILED_EXIT = 70  # exit code after a failed initializer (EX_SOFTWARE)
EXIT_GRACE_S = 1.0  # a worker's exit after its last batch waits this long for a task's threads
# A block's inputs look at the revoked batch ids (and whether to send what is done) this often
# at most.  A look costs a worker ~10 us right after a task (its caches went cold while the task
# ran): at 1 ms, one look per 1 ms input was 1% of the work.  A revoked call's inputs stop
# starting within this long.
REVOKE_CHECK_S = 0.01
UNTIMED_CHECK_MAX = 256  # an untimed block looks at the clock at least every this many inputs
# Functions a worker keeps unpickled, by fn_id, the oldest dropped first: the supervisor drops
# them from the worker's known functions in the same order (worker_slots.KnownFunctions)
FUNCTION_CACHE_SIZE = 64
FDS_PER_MESSAGE = 200  # descriptors per SCM_RIGHTS message (the kernel allows 253)

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
# What a worker forked by the supervisor process gets when it dies: a real-time signal, which
# no task is likely to use for itself (see _die_with_parent).
PARENT_DIED_SIGNAL = int(signal.SIGRTMIN) + 5 if hasattr(signal, "SIGRTMIN") else 0

_failed_functions: dict[int, bytes] = {}  # fn_id -> why it could not be unpickled here


def worker_main(conn: Any, slot_state: Any, cpus: tuple[int, ...], env: dict[str, str],
                initializer: InitializerCall | None, death_reader: Any,
                inherited_fds: tuple[int, ...]
                ) -> None:
    """Process entry point (multiprocessing Process target)."""
    for fd in inherited_fds:  # fork start method only: the supervisor's ends of other pipes
        _close_quietly(fd)
    # stdin on /dev/null: a task, or a program it runs without a stdin of its own, reads end
    # of file, as GNU parallel's jobs do.  It was the program's stdin: in `seq 20 | procqueue
    # map job.py`, a task running `cat` took input lines that then never ran.
    # (multiprocessing replaces sys.stdin alone, which leaves subprocesses the pipe.)
    null_over(0)
    _let_go_of_the_fork_server()
    become_group_leader()
    _die_with_parent()
    _watch_supervisor(death_reader)
    # A handler that does nothing, not SIG_IGN: an ignored signal stays ignored in the
    # programs a task runs (a `sleep` it sent SIGINT to went on), a handler is reset by exec
    signal.signal(signal.SIGINT, _ignore_signal)
    UNSENT.pid = os.getpid()
    signal.signal(signal.SIGTERM, _send_unsent_then_die)
    os.environ.update(env)
    if cpus:
        pin_current_process(cpus)
    if initializer is not None and not _run_initializer(conn, initializer):
        conn.close()
        os._exit(INIT_FAILED_EXIT)
    conn.send_bytes(dumps_message(Ready(os.getpid())))
    serve(conn, slot_state_view(slot_state))
    _exit_within(EXIT_GRACE_S)


def _ignore_signal(signum: int, frame: Any) -> None:
    """SIGINT in a worker: Ctrl-C is the supervisor's to handle (one traceback, not one per
    worker)."""


def new_slot_state() -> Any:
    """A slot's state (SLOT_STATE_SIZE int64 fields, zeroed) in shared memory: a block of
    multiprocessing's shared heap, which a worker maps by its arguments (the heap's file
    descriptor goes with them, as a RawArray's would).  Not a ctypes RawArray: the program
    would import ctypes for it (~2.5 ms of every pool's start, issue #24)."""
    memory = heap.BufferWrapper(SLOT_STATE_SIZE * 8)
    view = slot_state_view(memory)
    for field in range(SLOT_STATE_SIZE):  # the heap reuses freed blocks
        view[field] = 0
    return memory


def slot_state_view(memory: Any) -> Any:
    """The slot's state as a memoryview of int64s over the shared memory.  A block writes its
    running position into it before each input, right after the input before it ran (cold
    caches): a memoryview's store is a short C path, a ctypes array's goes through its type's
    lookups (N=64 `map`: ~1 us of a worker's CPU per input, perf)."""
    return memory.create_memoryview().cast("q")


def serve(conn: Any, slot_state: Any) -> None:
    functions: dict[int, Callable[..., Any]] = {}
    held = HeldWork(conn, _receive_fds, UNSENT, slot_state, BLOCK_POSITION)
    while True:
        _exit_if_forked()
        try:
            if not held.pending:
                conn.poll(None)  # idle until a message comes (or the supervisor goes)
                slot_state[CURRENT_TASK] = RECEIVING
            message, fds = held.next_message()
        except (EOFError, OSError):
            return  # the supervisor went away: nothing left to do
        match message:
            case RunTasks():
                if fds is None:
                    fds = _receive_fds(conn, message.oob_task_ids)
                run_batch(conn, slot_state, functions, message, fds, held)
            case RunBlock():
                run_block(conn, slot_state, functions, message, held)
            case LoadFunction():
                slot_state[STARTED_NS] = -time.monotonic_ns()  # loading: see STARTED_NS
                _load_function(functions, message)  # its error, if any, comes with its tasks
                slot_state[STARTED_NS] = 0
                slot_state[CURRENT_TASK] = IDLE
                conn.send_bytes(dumps_message(_Columns(message.batch_id).message(final=True)))
            case Stop():
                return
            case _:
                raise TypeError(f"worker got an unknown message {message!r}")


def _receive_fds(conn: Any, task_ids: tuple[int, ...]) -> dict[int, int]:
    """The memfds of out-of-band arguments follow their RunTasks on the pipe."""
    if not task_ids:
        return {}
    import socket
    from multiprocessing import reduction

    sock = socket.socket(fileno=conn.fileno())
    try:
        fds: list[int] = []
        for start in range(0, len(task_ids), FDS_PER_MESSAGE):
            fds += reduction.recvfds(sock, len(task_ids[start:start + FDS_PER_MESSAGE]))
    finally:
        sock.detach()  # the descriptor belongs to conn
    return dict(zip(task_ids, fds, strict=True))


def run_batch(conn: Any, slot_state: Any, functions: dict[int, Callable[..., Any]],
              batch: RunTasks, fds: dict[int, int] | None = None,
              held: HeldWork | None = None) -> None:
    """Run a batch's tasks in order.  Each starts under `held.lock`: a task that runs long
    has the tasks behind it given back (give_back.py), and those never start here."""
    fds = fds or {}
    held = held or HeldWork(conn, _receive_fds, UNSENT, slot_state, BLOCK_POSITION,
                          watch=False)
    batch_id = batch.batch_id
    if batch.items and not _revoked(slot_state, batch_id):
        # a crash while unpickling the function is charged to the first task; its clock
        # starts after the loading (negative: loading, see STARTED_NS)
        slot_state[STARTED_NS] = -time.monotonic_ns()
        slot_state[CURRENT_TASK] = batch.items[0][0]
    fn, fn_error = _load_function(functions, batch)
    held.begin_tasks(batch, _Columns(batch_id), partial(_Columns, batch_id), keep_all=bool(fds))
    UNSENT.send = lambda: conn.send_bytes(
        dumps_message(held.results.complete_rows().message(final=False)))
    last_flush = time.monotonic()
    for n, (task_id, payload) in enumerate(batch.items):
        with held.lock:
            if slot_state[REVOKED[0]] == batch_id or slot_state[REVOKED[1]] == batch_id:
                given = held.given_back_from
                held.results.skipped = [t for t, _ in batch.items[n:given]]
                break
            if not held.start(n):
                break  # the rest went back
            started_ns = time.monotonic_ns()
            slot_state[STARTED_NS] = started_ns  # time first: see module docstring
            slot_state[CURRENT_TASK] = task_id
        ok, data = run_item(fn, fn_error, batch.kind, payload, fds, task_id)
        _exit_if_forked()
        now = time.monotonic()
        started = started_ns / 1e9
        with held.lock:
            held.looked_at = None
            held.results.add(task_id, ok, data, now - started, started)
            if now - last_flush >= batch.report_s:
                UNSENT.sending = True
                conn.send_bytes(dumps_message(held.results.message(final=False)))
                held.results = _Columns(batch_id)
                UNSENT.sending = False
                last_flush = now
    for task_id, fd in fds.items():  # arguments never mapped (skipped, or no function)
        _close_quietly(fd)
        UNMAPPED.append(task_id)
    with held.lock:
        UNSENT.sending = True
        conn.send_bytes(dumps_message(held.results.message(final=True)))
        UNSENT.clear()
        held.end_locked()
    # Idle only once the results are out: a worker killed making their message (a result too
    # big for memory) is charged to its last task, not taken for one that died idle (which
    # charges none: a task that kills every worker sending its result would run for ever)
    slot_state[CURRENT_TASK] = IDLE


def run_block(conn: Any, slot_state: Any, functions: dict[int, Callable[..., Any]],
              batch: RunBlock, held: HeldWork | None = None) -> None:
    """Run a block's inputs in order; the slot's BLOCK_POSITION says which one is running.
    Its looks also go through `held` (give_back.py): the inputs behind one that runs long
    go back to the supervisor."""
    block_id, blob = batch.block_id, batch.inputs
    slot_state[BLOCK_POSITION] = 0
    slot_state[STARTED_NS] = -time.monotonic_ns()  # negative: loading (see STARTED_NS)
    slot_state[CURRENT_TASK] = block_id  # a crash while loading is charged to input 0
    fn, fn_error = _load_function(functions, batch)
    slot_state[STARTED_NS] = time.monotonic_ns()
    inputs = loads(blob)
    held = held or HeldWork(conn, _receive_fds, UNSENT, slot_state, BLOCK_POSITION,
                          watch=False)
    report = _BlockReport(conn, slot_state, batch.batch_id, batch.timed, batch.report_s,
                          0.0 if batch.each_revocable else REVOKE_CHECK_S, held)
    timed = batch.timed or batch.each_revocable
    held.begin_block(batch, len(inputs), timed, report.send_done_before)
    UNSENT.send = report.send_unsent
    if fn is None:  # each input fails with why the function could not be loaded
        assert fn_error is not None
        if _revoked(slot_state, batch.batch_id):
            report.skipped = 0
        else:
            for position in range(len(inputs)):
                report.errors[position] = fn_error  # before the placeholder: see send_unsent
                report.values.append(None)
                report.add_seconds(0.0)
    else:
        call = fn if batch.kind is CallKind.ONE else partial(apply_call, fn, batch.kind)
        # (the untimed loop looks at the slot between stretches of inputs, not before each)
        run = _run_timed if timed else _run_untimed
        run(report, call, inputs)
    with held.lock:
        UNSENT.sending = True
        report.send(time.monotonic(), final=True)
        UNSENT.clear()
        held.end_locked()
    slot_state[CURRENT_TASK] = IDLE  # once the results are out: see run_batch


# A tiny input takes a fraction of a microsecond: the two loops below are the whole cost of a
# block, so they read no global, and report.check (the revoked ids, sending what is done)
# runs about once per REVOKE_CHECK_S, not per input.

def _run_timed(report: "_BlockReport", call: Callable[..., Any], inputs: list[Any]) -> None:
    """Each input's own run time is reported (imap_outcomes: it is in each outcome), and its
    start is in the slot's STARTED_NS, where the supervisor times a call with a timeout."""
    append, errors, seconds = report.values.append, report.errors, report.seconds
    assert seconds is not None
    slot_state, clock = report.slot_state, time.monotonic_ns
    position_slot, started_slot = BLOCK_POSITION, STARTED_NS
    now = check_at = clock()
    for position, arg in enumerate(inputs):
        if now >= check_at:
            next_check = report.check(position, now / 1e9)
            if next_check is None:
                return
            check_at = int(next_check * 1e9)
        # The start before the position: Slot.current_task reads them the other way round,
        # so it never pairs an input with the start of the one before it (an early timeout).
        slot_state[started_slot] = now
        slot_state[position_slot] = position
        started = now
        try:
            append(call(arg))
        except BaseException as exc:  # noqa: BLE001 - one input's error, as run_item makes it
            errors[position] = error_of(exc)  # before its placeholder: see send_unsent
            append(None)
        now = clock()
        seconds.append((now - started) / 1e9)


def _run_untimed(report: "_BlockReport", call: Callable[..., Any], inputs: list[Any]) -> None:
    """Only the total run time is reported (map, imap): no clock per input (a clock read and
    a float per input were ~30% of a trivial input's cost).  The inputs run in stretches of
    about REVOKE_CHECK_S (as many as fitted in it last time), with a look at the clock and
    the slot between stretches.  A stretch grows at most twofold per look and stays under
    UNTIMED_CHECK_MAX inputs, so inputs that suddenly run slower are looked at soon."""
    append, errors = report.values.append, report.errors  # (the lists live on: see send)
    slot_state, position_slot, clock = report.slot_state, BLOCK_POSITION, time.monotonic
    n, start, stretch = len(inputs), 0, 1
    looked_at = clock()
    if report.check(0, looked_at, until=min(n, stretch)) is None:  # revoked before it started
        return
    while start < n:
        end = min(n, start + stretch)
        for position in range(start, end):
            slot_state[position_slot] = position
            try:
                append(call(inputs[position]))
            except BaseException as exc:  # noqa: BLE001 - one input's error, as in run_item
                errors[position] = error_of(exc)  # before its placeholder: see send_unsent
                append(None)
        if end == n:
            return
        now = clock()
        stretch = _inputs_per_look(stretch, end - start, now - looked_at)
        if report.check(end, now, until=min(n, end + stretch)) is None:
            return
        start, looked_at = end, now


def _inputs_per_look(last: int, ran: int, elapsed_s: float) -> int:
    if ran <= 0 or elapsed_s <= 0.0:
        return min(2 * last, UNTIMED_CHECK_MAX)
    fit = int(REVOKE_CHECK_S * ran / elapsed_s)
    return max(1, min(fit, 2 * last, UNTIMED_CHECK_MAX))


class _BlockReport:
    """What a block has run and not yet sent, and the look at the slot every `look_s` (0: before
    each input): a revoked batch stops the block; results are sent at least every `report_s`."""

    def __init__(self, conn: Any, slot_state: Any, batch_id: int, timed: bool,
                 report_s: float, look_s: float = REVOKE_CHECK_S,
                 held: HeldWork | None = None) -> None:
        self.held = held
        self.conn = conn
        self.slot_state = slot_state
        self.batch_id = batch_id
        self.first = 0  # position of values[0] in the block
        self.values: list[Any] = []
        self.errors: dict[int, bytes] = {}
        self.seconds: list[float] | None = [] if timed else None
        self.since = time.monotonic()  # untimed: values ran from then on
        self.skipped = -1
        self.revoke_check_at = self.since  # before the first input
        self.look_s = look_s
        self.report_s = report_s
        self.flush_at = self.since + report_s

    def add_seconds(self, seconds: float) -> None:
        if self.seconds is not None:
            self.seconds.append(seconds)

    def check(self, position: int, now: float, until: int | None = None) -> float | None:
        """Before input `position` (the next look before input `until`, if known): None if
        the batch was revoked, or its inputs from `position` on went back (give_back.py):
        the rest never starts here; else when to look again."""
        held = self.held
        if held is None:
            return self._check(position, now)
        # This look first, then whether the watching thread is deciding or has given inputs
        # back (give_back.py: it claims, then reads the look), so no lock in the common case
        held.looked_at, held.until = now, position if until is None else until
        if not held.claimed and held.given_back_from is None:
            return self._check(position, now)
        with held.lock:  # (its thread sends on the same pipe)
            given_back_from = held.given_back_from
            if given_back_from is not None and position >= given_back_from:
                self.skipped = position
                return None
            return self._check(position, now)

    def _check(self, position: int, now: float) -> float | None:
        _exit_if_forked()
        if now >= self.revoke_check_at:
            if _revoked(self.slot_state, self.batch_id):
                self.skipped = position
                return None
            self.revoke_check_at = now + self.look_s
        if now >= self.flush_at:
            UNSENT.sending = True
            self.send(now, final=False)
            self.first = position
            UNSENT.sending = False
            self.flush_at = now + self.report_s
        return min(self.revoke_check_at, self.flush_at)

    def send_done_before(self, position: int) -> None:
        """From give_back.py's thread, while input `position` runs long (the loop is inside
        that input's call): send the inputs done before it.  Trimmed in place, at the front:
        the loop appends that input's value and run time behind them when it returns."""
        n = min(position - self.first, len(self.values))
        if self.seconds is not None:
            n = min(n, len(self.seconds))
        if n <= 0:
            return
        end = self.first + n
        seconds = None if self.seconds is None else self.seconds[:n]
        now = time.monotonic()
        busy_s = sum(seconds) if seconds is not None else now - self.since
        # (list() copies the items at once: the loop may be adding an error meanwhile)
        errors = {p: e for p, e in list(self.errors.items()) if p < end}
        self.conn.send_bytes(dumps_message(_block_results(
            self.batch_id, self.first, self.values[:n], errors, seconds, busy_s, False, -1)))
        del self.values[:n]
        if self.seconds is not None:
            del self.seconds[:n]
        for p in errors:
            del self.errors[p]
        self.first, self.since = end, now

    def send_unsent(self) -> None:
        """From the SIGTERM handler, between any two bytecodes of the loops above: the inputs
        whose value (and, timed, run time) is in, with their errors (an error is set before
        its input's placeholder value, so none is sent as a success)."""
        n = len(self.values) if self.seconds is None else min(len(self.values),
                                                             len(self.seconds))
        if n == 0:
            return
        end = self.first + n
        seconds = None if self.seconds is None else self.seconds[:n]
        busy_s = sum(seconds) if seconds is not None else time.monotonic() - self.since
        errors = {p: e for p, e in self.errors.items() if p < end}
        self.conn.send_bytes(dumps_message(_block_results(
            self.batch_id, self.first, self.values[:n], errors, seconds, busy_s, False, -1)))

    def send(self, now: float, final: bool) -> None:
        """What ran since the last send; the lists are emptied in place (the loops hold them)."""
        _exit_if_forked()
        seconds = self.seconds
        busy_s = sum(seconds) if seconds is not None else now - self.since
        self.since = now
        self.conn.send_bytes(dumps_message(_block_results(
            self.batch_id, self.first, self.values, self.errors, seconds, busy_s, final,
            self.skipped if final else -1)))
        self.values.clear()
        self.errors.clear()
        if seconds is not None:
            seconds.clear()


def _block_results(batch_id: int, first: int, values: list[Any], errors: dict[int, bytes],
                   seconds: list[float] | None, busy_s: float, final: bool, skipped: int
                   ) -> BlockResults:
    """Values in one pickle when they are plain data; else one pickle each, and a value that
    cannot be pickled becomes its input's error."""
    packed: bytes | list[bytes | None] | None = dumps_plain_data(values)
    if packed is None:
        packed = []
        for i, value in enumerate(values):
            if first + i in errors:
                packed.append(None)
                continue
            try:
                packed.append(dumps(value))
            except BaseException as exc:  # noqa: BLE001 - fails only this input
                packed.append(None)
                errors[first + i] = unpicklable_result(value, exc)
    return BlockResults(batch_id, first, packed, errors, len(values), seconds, busy_s, final,
                        current_rss_bytes(), skipped)


class _Columns:
    """Accumulates a BatchResults message column by column."""

    __slots__ = ("batch_id", "task_ids", "ok", "payloads", "seconds", "started", "skipped")

    def __init__(self, batch_id: int) -> None:
        self.batch_id = batch_id
        self.task_ids: list[int] = []
        self.ok: list[bool] = []
        self.payloads: list[bytes] = []
        self.seconds: list[float] = []
        self.started: list[float] = []
        self.skipped: list[int] = []

    def add(self, task_id: int, ok: bool, payload: bytes, seconds: float, started: float
            ) -> None:
        self.task_ids.append(task_id)
        self.ok.append(ok)
        self.payloads.append(payload)
        self.seconds.append(seconds)
        self.started.append(started)

    def complete_rows(self) -> "_Columns":
        """A copy without the row `add` may be half-way through (see _send_unsent_then_die)."""
        n = min(len(self.task_ids), len(self.ok), len(self.payloads), len(self.seconds),
                len(self.started))
        rows = _Columns(self.batch_id)
        rows.task_ids, rows.ok, rows.payloads = self.task_ids[:n], self.ok[:n], self.payloads[:n]
        rows.seconds, rows.started = self.seconds[:n], self.started[:n]
        return rows

    def message(self, final: bool) -> BatchResults:
        return BatchResults(self.batch_id, self.task_ids, self.ok, self.payloads, self.seconds,
                            self.started, final, current_rss_bytes(), self.skipped,
                            _take_unmapped())


def _take_unmapped() -> list[int]:
    """The tasks whose argument this worker stopped mapping since the last message."""
    if not UNMAPPED:
        return []
    taken = UNMAPPED[:]
    del UNMAPPED[:len(taken)]  # a finalizer may append meanwhile (the GC runs anywhere)
    return taken


def _revoked(slot_state: Any, batch_id: int) -> bool:
    return bool(slot_state[REVOKED[0]] == batch_id or slot_state[REVOKED[1]] == batch_id)


class _Unsent:
    """How the batch now running sends the results it has and has not sent yet; `sending`
    while the loop itself sends (a second message then would interleave with it on the pipe,
    or repeat what it is sending)."""

    def __init__(self) -> None:
        self.send: Callable[[], None] | None = None
        self.sending = False
        self.dying = False  # the SIGTERM handler runs
        self.pid = os.getpid()  # the worker's: a process a task forks inherits the handler

    def clear(self) -> None:
        self.send = None
        self.sending = False


UNSENT = _Unsent()


def _send_unsent_then_die(signum: int, frame: Any) -> None:
    """SIGTERM (a timeout, a cancel, a halt, or a kill from outside): send what the batch has
    finished first, then die of the signal as before.  Without this, the inputs it ran before
    the one being killed (up to its batch's report_s of work) would be run again elsewhere."""
    # Another SIGTERM may come while this runs (a timeout, then the halt it causes), and
    # Python then runs this handler again inside this one: that run must not end us half-way
    # through the message.  (If it comes before the flag is set, that run does it all.)
    if UNSENT.dying:
        return
    UNSENT.dying = True
    send = UNSENT.send
    if send is not None and not UNSENT.sending and os.getpid() == UNSENT.pid:
        try:
            send()
        except BaseException:  # noqa: BLE001 - dying anyway; they run again, as before
            pass
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    os._exit(128 + signum)  # not reached: the default action ends the process


_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


_statm: tuple[int, int] | None = None  # (pid, fd): /proc/self is the process that opened it


def current_rss_bytes() -> int:
    """Resident memory of this process now (not the peak), read after every batch: one
    pread of /proc/self/statm kept open (~1 us; opening it each time cost ~13 us)."""
    global _statm
    try:
        pid = os.getpid()
        if _statm is None or _statm[0] != pid:
            _statm = (pid, os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC))
        return int(os.pread(_statm[1], 128, 0).split()[1]) * _PAGE_BYTES
    except (OSError, ValueError, IndexError):
        return 0


def _load_function(functions: dict[int, Callable[..., Any]], batch: CallsFunction
                   ) -> tuple[Callable[..., Any] | None, bytes | None]:
    fn = functions.get(batch.fn_id)
    if fn is not None:
        if batch.fn_payload is not None:
            # Sent again: the supervisor counts it as the newest (KnownFunctions), so must we,
            # or we would drop it while it believes we have it.
            functions[batch.fn_id] = functions.pop(batch.fn_id)
        return fn, None
    failed = _failed_functions.get(batch.fn_id)
    if failed is not None:
        return None, failed
    if batch.fn_payload is None:
        missing = RuntimeError(f"procqueue bug: worker has no function {batch.fn_id}")
        return None, capture_exception(missing)
    try:
        fn = loads(batch.fn_payload)
    except BaseException as exc:  # noqa: BLE001 - e.g. the function's module is not importable here
        error = ArgumentSerializationError(f"could not unpickle the task's function: {exc!r}")
        error.__cause__ = exc
        # Remembered: the supervisor sends a function's bytes once, so later batches of it
        # must report this error, not a missing function.
        _failed_functions[batch.fn_id] = capture_exception(error)
        return None, _failed_functions[batch.fn_id]
    if len(functions) >= FUNCTION_CACHE_SIZE:
        functions.pop(next(iter(functions)))
    functions[batch.fn_id] = fn
    return fn, None


def _run_initializer(conn: Any, initializer: InitializerCall) -> bool:
    try:
        initializer()
    except BaseException as exc:  # noqa: BLE001 - reported once, to the caller
        conn.send_bytes(dumps_message(InitFailed(capture_exception(exc))))
        return False
    return True


def _exit_if_forked() -> None:
    """A task that forked, and whose child returned from it instead of ending (no os._exit),
    comes back here in that child: it must not go on with the worker's loop (running the
    worker's batch again, sending on the worker's pipe, reading its next batch)."""
    if os.getpid() != UNSENT.pid:
        os._exit(0)


def _exit_within(seconds: float) -> None:
    """After the last batch (Stop, or the supervisor gone): the interpreter's exit waits for
    the threads a task left running (not daemon threads), which would keep a recycled or
    closed worker, and the pool waiting for it, there for ever.  So the exit has `seconds`,
    then the process ends anyway; what was printed is flushed first."""
    try:
        mp_util._flush_std_streams()  # type: ignore[attr-defined]
    except OSError:  # a closed pipe: nothing to do about it now
        pass

    def leave() -> None:
        time.sleep(seconds)
        os._exit(0)

    threading.Thread(target=leave, name="procqueue-exit", daemon=True).start()


def _let_go_of_the_fork_server() -> None:
    """multiprocessing hands each process its fork server forks the server's "alive"
    descriptor (for children of its own), and the server runs until every holder has closed
    it.  Held by the workers, it kept the server up after the supervisor died, and with it
    the workers' parent-death signal unsent: a worker stuck in C code (the GIL held, so its
    watchdog thread cannot run) then outlived the program.  A pool made in a worker starts
    a server of its own."""
    forkserver = sys.modules.get("multiprocessing.forkserver")  # None: not forked by one
    server: Any = getattr(forkserver, "_forkserver", None)
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is not None and getattr(server, "_forkserver_pid", None) is None:
        server._forkserver_alive_fd = server._forkserver_address = None
        _close_quietly(fd)


def _die_with_parent() -> None:
    """Ask the kernel to signal us when our parent dies (Linux only).

    Forked by the fork server, SIGKILL: the server outlives the supervisor, and by the time it
    is gone the watchdog thread has killed our process group.  Forked by the supervisor itself
    (the fork and spawn start methods), a signal we catch, whose handler kills our process
    group (a task's own subprocesses) and us: SIGKILL would kill us first and leave them."""
    if not sys.platform.startswith("linux"):
        return
    parent = parent_process()
    death_signal: int = signal.SIGKILL
    if parent is not None and parent.pid == os.getppid():
        death_signal = PARENT_DIED_SIGNAL
        signal.signal(death_signal, _on_parent_death)
    try:
        import ctypes  # here: the pool's program never needs it (the fork server preloads it)

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, death_signal, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        kill_own_group()


def _on_parent_death(signum: int, frame: Any) -> None:
    kill_own_group()


def _watch_supervisor(death_reader: Any) -> None:
    """Kill our whole process group when the supervisor's end of `death_reader` closes, i.e.
    when the supervisor process is gone (its parent may be the fork server, so PDEATHSIG alone
    does not cover a SIGKILLed supervisor, nor a task's own subprocesses)."""
    fd = death_reader.fileno()

    def wait_for_eof() -> None:
        while True:
            try:
                if not os.read(fd, 1):
                    break
            except InterruptedError:
                continue
            except OSError:
                break
        kill_own_group()

    threading.Thread(target=wait_for_eof, name="procqueue-watchdog", daemon=True).start()


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
