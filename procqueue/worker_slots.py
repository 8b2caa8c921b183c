"""The parent side of the workers: N slots, each a CPU set + a process + its own pipe + the
batches it holds.  Mechanism only (spawn, send, signal, reap); the supervisor decides when.

A slot's life:

    STARTING ──Ready──► READY ──(Stop sent)──► RETIRING ──exit──► DEAD ──respawn──► STARTING
        │                 │                        │
        └──InitFailed─────┴──(kill: timeout, cancel, terminate)──► KILLING ──exit──► DEAD

DEAD is observed, never assumed: only the process sentinel (or EOF on the pipe followed by
the sentinel) moves a slot there, so a crash is attributed to the tasks the slot held at the
moment it died.
"""

from __future__ import annotations

import enum
import os
import signal
import sys
import time
from collections import deque
from typing import Any

from .errors import InitializerError, describe_exit
from .fork_server import null_over
from .procfs import stat_fields
from .program_fork import ProgramForkContext
from .protocol import InitializerCall, OutOfBand, Stop, ToWorker, dumps_message
from .records import FrozenRecord
from .tasks import Block, Job, Task
from .worker import (BLOCK_POSITION, CURRENT_TASK, FDS_PER_MESSAGE, FUNCTION_CACHE_SIZE, IDLE,
                     INIT_FAILED_EXIT, RECEIVING, REVOKED, STARTED_NS, new_slot_state,
                     slot_state_view, worker_main)

# A prefetched batch waits in the worker's socket buffer while it finishes the current one,
# so a worker is never idle waiting for the supervisor.  Only small batches are prefetched:
# writing a big one into a busy worker's full pipe would block the supervisor.
PREFETCH_MAX_BYTES = 32 * 1024
MAX_BATCHES_IN_FLIGHT = 2  # per slot: the running one + one prefetched
INIT_FAILURE_LIMIT = 3  # consecutive worker start failures before the pool is broken
RESPAWN_BACKOFF_S = 0.1  # delay before respawning after a failed start; doubles per failure


class SlotPhase(enum.Enum):
    STARTING = "starting"  # spawned, initializer running, not Ready yet
    READY = "ready"  # takes batches
    RETIRING = "retiring"  # asked to Stop (maxtasksperchild, close): finishes what it holds
    KILLING = "killing"  # signalled; waiting for the sentinel
    DEAD = "dead"  # reaped


_ALLOWED = {
    SlotPhase.STARTING: {SlotPhase.READY, SlotPhase.KILLING, SlotPhase.DEAD},
    SlotPhase.READY: {SlotPhase.RETIRING, SlotPhase.KILLING, SlotPhase.DEAD},
    SlotPhase.RETIRING: {SlotPhase.KILLING, SlotPhase.DEAD},
    SlotPhase.KILLING: {SlotPhase.KILLING, SlotPhase.DEAD},
    SlotPhase.DEAD: {SlotPhase.STARTING},
}


class Batch:
    """Tasks, or one Block, sent to one worker in one RunTasks or RunBlock message (or, empty,
    a LoadFunction)."""

    __slots__ = ("id", "job", "tasks", "pending", "sent_at", "payload_bytes", "block")

    def __init__(self, batch_id: int, job: Job, tasks: list[Task], block: Block | None = None,
                 block_bytes: int = 0) -> None:
        self.id = batch_id
        self.job = job
        self.tasks = tasks  # a block's: empty until it is exploded into tasks
        self.pending: dict[int, Task] = {t.id: t for t in tasks}  # no result yet
        self.sent_at = time.monotonic()
        # What went on the wire: the block's inputs, or the tasks' own pickled arguments
        self.payload_bytes = (block_bytes if block is not None
                              else sum(len(t.payload) for t in tasks))
        self.block = block

    def unexploded_block(self) -> Block | None:
        """The block whose inputs have no Tasks (see blocks.explode_dispatched)."""
        block = self.block
        return block if block is not None and block.tasks is None else None

    def inputs_held(self) -> int:
        block = self.unexploded_block()
        return len(self.pending) + (len(block) - block.reported if block is not None else 0)


def _give_back_permit(batch: Batch) -> None:
    """A block's batch has ended (or its worker is gone): the permit the block held."""
    block = batch.block
    if block is not None and block.hold is not None:
        hold, block.hold = block.hold, None
        hold.release()


class KnownFunctions(dict[int, None]):
    """The functions a worker holds loaded, which it is sent without their bytes.  The worker
    keeps the last FUNCTION_CACHE_SIZE it was sent, dropping the oldest first; this set
    drops the same ones, so a function the worker no longer has comes with its bytes again.
    (A function that failed to load is not in the worker's cache but stays known: the worker
    remembers the failure, and its cache then lags this set, which is the safe way round.)
    A dict in the order they were sent, whose `in` (asked at every batch) is the dict's own."""

    __slots__ = ()

    def add(self, fn_id: int) -> None:
        """`fn_id`'s bytes are on their way to the worker."""
        self[fn_id] = None
        if len(self) > FUNCTION_CACHE_SIZE:
            del self[next(iter(self))]


class SlotStatistics(FrozenRecord):
    _fields = ("slot", "pid", "cpus", "phase", "tasks_done", "busy_s", "idle_s", "restarts",
               "last_exit", "rss_bytes")

    slot: int
    pid: int | None
    cpus: tuple[int, ...]
    phase: str
    tasks_done: int
    busy_s: float
    idle_s: float  # alive but not running a task, since the slot was created
    restarts: int
    last_exit: str | None
    rss_bytes: int

    def __init__(self, slot: int, pid: int | None, cpus: tuple[int, ...], phase: str,
                 tasks_done: int, busy_s: float, idle_s: float, restarts: int,
                 last_exit: str | None, rss_bytes: int) -> None:
        set_ = object.__setattr__
        set_(self, "slot", slot)
        set_(self, "pid", pid)
        set_(self, "cpus", cpus)
        set_(self, "phase", phase)
        set_(self, "tasks_done", tasks_done)
        set_(self, "busy_s", busy_s)
        set_(self, "idle_s", idle_s)
        set_(self, "restarts", restarts)
        set_(self, "last_exit", last_exit)
        set_(self, "rss_bytes", rss_bytes)


_NAME_PREFIX = {"fork": "Fork", "forkserver": "ForkServer", "spawn": "Spawn"}


class Slot:
    def __init__(self, index: int, cpus: tuple[int, ...]) -> None:
        self.index = index
        self.cpus = cpus
        self.phase = SlotPhase.DEAD
        self.process: Any = None
        self.conn: Any = None
        self.pid: int | None = None
        self.shared_state = new_slot_state()  # goes to the worker process
        self.state = slot_state_view(self.shared_state)  # fields: see worker.py
        self.batches: deque[Batch] = deque()  # changed only through add_batch, end_batch...
        # ... and drop_batches, which count those of calls with a timeout: the supervisor asks
        # every slot for its deadlines at every turn, and most hold none
        self.timed_batches = 0
        self.batch_changes = 0  # counts every change of `batches` (see timeouts.TimedSlots)
        # The worker gave back what waited behind a task that runs long (give_back.py): it
        # takes no batch ahead until it has ended what it holds, or it would get them back
        self.gave_back = False
        self.known_functions = KnownFunctions()
        # out-of-band arguments sent to the current process that it may still map, by task
        self.lent: dict[int, list[Any]] = {}
        self.tasks_done = 0  # by the current process (maxtasksperchild)
        self.tasks_done_total = 0
        self.busy_s = 0.0
        self.restarts = 0
        self.kill_deadline: float | None = None  # KILLING: when to escalate to SIGKILL
        self.kill_reason: str | None = None
        # KILLING for a timeout: (task, its TaskTimeoutError, start, timeout instant), whose
        # outcome waits until the worker is dead or SIGKILLed (outcomes.on_timeout)
        self.timed_out: list[tuple[Task, BaseException, float, float]] = []
        self.last_exit: str | None = None
        # (pid, exit code) of the last processes of this slot that were reaped (Pool._pool)
        self.exits: deque[tuple[int | None, int | None]] = deque(maxlen=8)
        self.respawn_at = 0.0  # DEAD: not before this monotonic time (backoff)
        self.init_deadline: float | None = None  # STARTING: Ready by then (init_timeout)
        # KILLING: its tasks' processes out of its group, (pid, start time)
        self.strays: list[tuple[int, bytes]] = []
        self.rss_bytes = 0  # the worker's resident memory, as it last reported
        self.retire_reason: str | None = None
        self.created_at = time.monotonic()  # the slot (not its current process)

    def move(self, new: SlotPhase) -> None:
        if new not in _ALLOWED[self.phase]:
            raise RuntimeError(f"slot {self.index}: {self.phase.name} -> {new.name}")
        self.phase = new

    @property
    def accepts_work(self) -> bool:
        return self.phase is SlotPhase.READY

    def add_batch(self, batch: Batch) -> None:
        self.batches.append(batch)
        self.timed_batches += batch.job.may_time_out()
        self.batch_changes += 1

    def end_batch(self, batch: Batch) -> None:
        """`batch` has reported its last result."""
        self.batches.remove(batch)
        self.gave_back = self.gave_back and bool(self.batches)
        self.timed_batches -= batch.job.may_time_out()
        self.batch_changes += 1
        _give_back_permit(batch)

    def drop_batches(self) -> None:
        """The process is gone (or new): it holds nothing."""
        for batch in self.batches:
            _give_back_permit(batch)
        self.batches.clear()
        self.timed_batches = 0
        self.batch_changes += 1
        self.gave_back = False

    def tasks_held(self) -> int:
        return sum(b.inputs_held() for b in self.batches)

    def can_take_batch(self) -> bool:
        if not self.accepts_work or len(self.batches) >= MAX_BATCHES_IN_FLIGHT:
            return False
        if self.retire_reason is not None:  # due for recycling: drains what it holds
            return False
        if not self.batches:
            return True
        if self.gave_back:
            return False
        # Prefetch only small batches (see PREFETCH_MAX_BYTES).
        running = self.batches[-1]
        return running.payload_bytes <= PREFETCH_MAX_BYTES

    def is_running_a_task(self) -> bool:
        """A task of this slot has started and has no result yet (one waiting in the pipe
        behind it does not count; nor does a dead worker's last task)."""
        current = self.current_task()
        return current is not None and any(
            current[0] in b.pending or (b.block is not None and b.block.id == current[0])
            for b in tuple(self.batches))

    def revoke(self, batch: Batch) -> None:
        """The worker must not start the items of `batch` it has not started yet (it reports
        them as skipped).  A slot holds at most MAX_BATCHES_IN_FLIGHT batches, one per
        REVOKED entry, so an entry not naming another held batch is always free."""
        held = {b.id for b in self.batches if b is not batch}
        free = next(f for f in REVOKED if self.state[f] not in held)
        self.state[free] = batch.id

    # ---- big arguments lent to this worker (memfds it maps; protocol.MemfdPool) ----------

    def lend(self, task: Task) -> None:
        payload = task.payload
        assert isinstance(payload, OutOfBand)
        payload.lent += 1
        self.lent.setdefault(task.id, []).append(payload)

    def unlend(self, task_id: int) -> None:
        """The worker reports it no longer maps task_id's argument."""
        lent = self.lent.get(task_id)
        if not lent:
            return  # sent to this worker's previous process, already returned at its exit
        payload = lent.pop()
        if not lent:
            del self.lent[task_id]
        payload.returned()

    def unlend_all(self) -> None:
        """The process is gone: it maps nothing any more."""
        lent, self.lent = self.lent, {}
        for payloads in lent.values():
            for payload in payloads:
                payload.returned()

    def current_task(self) -> tuple[int, float] | None:
        """(task id, monotonic start time) of the task running now, or None if idle.  In a
        block, the id is the block's, or once it is exploded, the running input's task."""
        task_id = self.state[CURRENT_TASK]
        position = self.state[BLOCK_POSITION]  # before the start: see worker._run_timed
        started_ns = self.state[STARTED_NS]
        if task_id == IDLE or task_id == RECEIVING:
            return None
        for batch in tuple(self.batches):
            block = batch.block
            if block is not None and block.id == task_id:
                task = block.tasks[position] if block.tasks else None
                if task is not None:
                    task_id = task.id
                break
        return task_id, abs(started_ns) / 1e9

    def reading_message(self) -> bool:
        """Whether the worker is reading a message (worker.RECEIVING), not idle nor running."""
        return bool(self.state[CURRENT_TASK] == RECEIVING)

    def loading_function(self) -> bool:
        """Whether the worker is loading the function of the task it marked (worker.py)."""
        return bool(self.state[STARTED_NS] < 0)

    def running_input(self) -> tuple[Any, float] | None:
        """(the input, monotonic start time) of the task running now, or None if idle: for
        people watching (Pool.stats).  Read from any thread: the batches are copied first, and
        an input not found (its result just came) reads as idle."""
        current = self.current_task()
        if current is None:
            return None
        task_id, started = current
        for batch in tuple(self.batches):
            task = batch.pending.get(task_id)
            if task is not None:
                return task.input, started
            block = batch.block
            if block is not None and block.id == task_id:
                position = self.state[BLOCK_POSITION]
                if 0 <= position < len(block.inputs):
                    return block.inputs[position], started
        return None

    def statistics(self) -> SlotStatistics:
        idle_s = max(0.0, time.monotonic() - self.created_at - self.busy_s)
        return SlotStatistics(self.index, self.pid, self.cpus, self.phase.value,
                              self.tasks_done_total, self.busy_s, idle_s, self.restarts,
                              self.last_exit, self.rss_bytes)


class WorkerSlots:
    """Spawns, signals and reaps the worker processes of one pool."""

    def __init__(self, context: Any, cpu_plan: list[tuple[int, ...]], pin: bool,
                 env: dict[str, str], initializer: InitializerCall | None, *,
                 maxtasksperchild: int | None = None,
                 max_memory_per_child: int | None = None,
                 init_timeout_s: float | None = None) -> None:
        self.context = context
        self.init_timeout_s = init_timeout_s  # a worker not Ready by then is a failed start
        self.pin = pin
        self.env = env
        self.initializer = initializer
        self.maxtasksperchild = maxtasksperchild
        self.max_memory_per_child = max_memory_per_child  # bytes
        self.slots = [Slot(i, cpus) for i, cpus in enumerate(cpu_plan)]
        self.restarts = 0  # processes replaced, in every slot
        self.recycled_for_memory = 0
        self.start_failures = 0  # consecutive: a worker that gets Ready resets it
        self.last_init_error: BaseException | None = None  # what the initializer raised
        # Workers block reading this pipe; EOF means the supervisor process is gone.
        self._death_reader, self._death_writer = context.Pipe(duplex=False)

    def spawn(self, slot: Slot) -> None:
        parent_end, child_end = self.context.Pipe(duplex=True)
        slot.state[CURRENT_TASK] = IDLE
        slot.state[STARTED_NS] = 0
        slot.state[BLOCK_POSITION] = 0
        for field in REVOKED:
            slot.state[field] = IDLE
        process = self._start_process(slot, child_end, parent_end)
        child_end.close()
        slot.move(SlotPhase.STARTING)
        slot.init_deadline = (None if self.init_timeout_s is None
                              else time.monotonic() + self.init_timeout_s)
        slot.process, slot.conn, slot.pid = process, parent_end, process.pid
        slot.drop_batches()
        slot.known_functions.clear()
        slot.tasks_done = 0
        slot.kill_deadline = None
        slot.kill_reason = None
        slot.retire_reason = None
        slot.rss_bytes = 0

    def _start_process(self, slot: Slot, child_end: Any, parent_end: Any) -> Any:
        """Start the worker process of `slot` (a test may start something else that reads
        and writes `child_end` the same way: see tests/test_supervisor.py)."""
        process = self.context.Process(
            target=worker_main,
            args=(child_end, slot.shared_state, slot.cpus if self.pin else (), self.env,
                  self.initializer, self._death_reader, self._fds_to_close_in_child(parent_end)),
            daemon=False,  # daemonic processes may not have children; tasks may want some
        )
        # multiprocessing's name for it (ForkServerPoolWorker-3: its count among the program's
        # processes, as its _identity), which logs show and some programs read a number from
        method = self.context.get_start_method()
        process.name = (_NAME_PREFIX.get(method, method.capitalize()) + "PoolWorker-"
                        + ":".join(map(str, process._identity)))
        process.start()
        return process

    def respawned(self, slot: Slot) -> None:
        """Count a replacement process about to be spawned in `slot`."""
        slot.restarts += 1
        self.restarts += 1

    def started(self, slot: Slot) -> None:
        """The worker said Ready: it takes batches; start failures are behind us."""
        if slot.phase is SlotPhase.STARTING:
            slot.move(SlotPhase.READY)
            self.start_failures = 0

    def start_failed(self, slot: Slot, exitcode: int | None) -> bool:
        """A worker died before Ready: respawn it after a growing backoff; True once
        INIT_FAILURE_LIMIT starts in a row failed (the pool must not respawn in a loop), or
        at once where the initializer raised: as with concurrent.futures, a failing
        initializer (a script that does not import, for the command) is one error, and its
        side effects do not run three times."""
        if exitcode == INIT_FAILED_EXIT and self.last_init_error is not None:
            return True
        self.start_failures += 1
        slot.respawn_at = time.monotonic() + RESPAWN_BACKOFF_S * 2 ** (self.start_failures - 1)
        return self.start_failures >= INIT_FAILURE_LIMIT

    def start_failure_error(self, exitcode: int | None) -> InitializerError:
        """Why workers keep failing to start: the initializer's exception, else their exit."""
        cause = self.last_init_error
        if cause is not None:
            error = InitializerError(
                f"the worker initializer raised {type(cause).__name__}: {cause}")
            error.__cause__ = cause
            return error
        return InitializerError(f"worker process failed to start: {describe_exit(exitcode)}"
                                f"{_unimportable_main_hint(self.context)}")

    def due_for_recycling(self, slot: Slot) -> bool:
        """maxtasksperchild reached, or memory over max_memory_per_child (checked after a
        batch, as Celery does: the task that grew it has finished and reported)."""
        if self.maxtasksperchild is not None and slot.tasks_done >= self.maxtasksperchild:
            slot.retire_reason = "maxtasksperchild"
            return True
        limit = self.max_memory_per_child
        if limit is not None and slot.rss_bytes > limit:
            slot.retire_reason = f"memory {slot.rss_bytes // 2**20} MiB > {limit // 2**20} MiB"
            self.recycled_for_memory += 1
            return True
        return False

    def _fds_to_close_in_child(self, parent_end: Any) -> tuple[int, ...]:
        # Only a forked child inherits our fds; under forkserver/spawn these numbers would
        # name unrelated descriptors in the child, so send none.
        if self.context.get_start_method() != "fork":
            return ()
        fds = [self._death_writer.fileno(), parent_end.fileno()]
        fds += [s.conn.fileno() for s in self.slots if s.conn is not None and not s.conn.closed]
        return tuple(fds)

    def send(self, slot: Slot, message: ToWorker, fds: tuple[int, ...] = ()) -> bool:
        """Send a message, then the descriptors of its out-of-band arguments; False if the
        worker's pipe is broken (it died: the sentinel will tell the supervisor soon)."""
        try:
            slot.conn.send_bytes(dumps_message(message))
            if fds:
                self._send_fds(slot, fds)
        except (OSError, EOFError, ValueError):
            return False
        return True

    def _send_fds(self, slot: Slot, fds: tuple[int, ...]) -> None:
        import socket
        from multiprocessing import reduction

        sock = socket.socket(fileno=slot.conn.fileno())
        try:
            for start in range(0, len(fds), FDS_PER_MESSAGE):
                reduction.sendfds(sock, list(fds[start:start + FDS_PER_MESSAGE]))
        finally:
            sock.detach()  # the descriptor belongs to the connection

    def retire(self, slot: Slot) -> None:
        """Ask a worker to exit once it has finished what it holds."""
        slot.move(SlotPhase.RETIRING)
        self.send(slot, Stop())

    def kill(self, slot: Slot, reason: str, grace_s: float, now: float) -> None:
        """SIGTERM the worker's process group, SIGKILL after `grace_s` (see escalate)."""
        if slot.phase in (SlotPhase.DEAD,):
            return
        if slot.phase is SlotPhase.KILLING and grace_s > 0:
            return  # SIGTERMed already; its SIGKILL deadline stands
        if slot.phase is not SlotPhase.KILLING:
            slot.move(SlotPhase.KILLING)
            slot.kill_reason = reason
            _note_strays([slot])
        self._signal_group(slot, signal.SIGTERM if grace_s > 0 else signal.SIGKILL)
        slot.kill_deadline = now + grace_s if grace_s > 0 else None

    def escalate(self, slot: Slot) -> None:
        self._signal_group(slot, signal.SIGKILL)
        slot.kill_deadline = None

    def _signal_group(self, slot: Slot, sig: int) -> None:
        if slot.pid is None:
            return
        try:
            os.killpg(slot.pid, sig)  # the worker leads its own group (worker.py)
        except (ProcessLookupError, PermissionError):
            pass
        try:  # covers the instant before the worker called setpgid
            os.kill(slot.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def reap(self, slot: Slot) -> int | None:
        """Collect a dead worker; returns its exit code (negative: killed by that signal)."""
        slot.process.join(timeout=1.0)
        exitcode = slot.process.exitcode
        self._kill_leftover_group(slot)
        try:
            slot.conn.close()
        except OSError:
            pass
        try:
            slot.process.close()
        except ValueError:
            pass
        slot.move(SlotPhase.DEAD)
        slot.exits.append((slot.pid, exitcode))
        return exitcode  # type: ignore[no-any-return]

    def _kill_leftover_group(self, slot: Slot) -> None:
        # A task's subprocesses outlive the worker unless their group is killed too.
        if slot.pid is not None:
            try:
                os.killpg(slot.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        _kill_strays(slot)

    def kill_all_now(self) -> None:
        alive = [slot for slot in self.slots if slot.phase is not SlotPhase.DEAD]
        # a task cut short takes its family with it (an idle worker's past tasks ended, and
        # what they left running on purpose stays, as at close())
        _note_strays([slot for slot in alive if slot.is_running_a_task()])
        for slot in alive:
            self._signal_group(slot, signal.SIGKILL)
            _kill_strays(slot)

    def retire_ready(self) -> bool:
        """Retire every idle-able worker; False while one still runs its initializer (it is
        retired once Ready, as multiprocessing.Pool lets it finish: its side effects are the
        program's)."""
        for slot in self.slots:
            if slot.phase is SlotPhase.READY:
                self.retire(slot)
        return not any(slot.phase is SlotPhase.STARTING for slot in self.slots)

    def all_dead(self) -> bool:
        return all(slot.phase is SlotPhase.DEAD for slot in self.slots)

    def kill_and_reap_all(self, timeout_s: float) -> None:
        """Kill every live worker and wait up to `timeout_s` in all for them to be reaped."""
        self.kill_all_now()
        deadline = time.monotonic() + timeout_s
        for slot in self.slots:
            if slot.phase is not SlotPhase.DEAD and slot.process is not None:
                slot.process.join(max(0.0, deadline - time.monotonic()))
                try:
                    self.reap(slot)
                except Exception:
                    pass

    def let_go_after_fork(self) -> None:
        """In a child forked from the pool's process: its copies of the death pipe's writing
        end and of the fork server's "alive" pipe would keep the workers and the server up
        after the pool's process died, as long as this child lives (a helper process the
        program forked, or a fork worker of another pool).  Pointed at /dev/null, not closed:
        the numbers stay taken (a fork worker closes its inherited ones by number)."""
        try:
            null_over(self._death_writer.fileno())
        except (OSError, ValueError):  # closed already: the pool had stopped
            pass
        if isinstance(self.context, ProgramForkContext):
            self.context.server.let_go_after_fork()

    def open_fork_server(self) -> None:
        """Before the supervisor's thread starts: fork this pool's own fork server from the
        program while it may still have one thread (program_fork.py)."""
        if isinstance(self.context, ProgramForkContext):
            self.context.start_server()

    def close(self) -> None:
        """After every worker is reaped: release the death pipe and this pool's fork server."""
        for end in (self._death_reader, self._death_writer):
            try:
                end.close()
            except OSError:
                pass
        if isinstance(self.context, ProgramForkContext):
            self.context.stop_server()


def _note_strays(slots: list[Slot]) -> None:
    """Before workers are killed (a timeout, a cancel, terminate()): the processes their tasks
    started that left the worker's process group (start_new_session=True, setsid, setpgid),
    which killing the group does not reach and which, once the worker is gone, nothing links
    to it any more.  They are killed with it (_kill_strays), as GNU parallel kills a job's
    whole family at a timeout.  One read of /proc's process table for all of `slots`: a
    millisecond or two, paid only where a worker is killed."""
    pids = {slot.pid: slot for slot in slots if slot.pid is not None}
    if not pids:
        return
    children = _children_by_parent()
    for pid, slot in pids.items():
        known = {stray[0] for stray in slot.strays}  # noted at an earlier kill
        below = list(children.get(pid, ()))
        while below:
            child = below.pop()
            below.extend(children.get(child, ()))
            try:
                if child in known or os.getpgid(child) == pid:
                    continue  # noted already, or killed with the group
            except OSError:
                continue  # gone meanwhile
            started = _start_time(child)
            if started is not None:
                slot.strays.append((child, started))


def _children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return children
    for entry in entries:
        if entry.isdigit():
            try:
                fields = stat_fields(int(entry))
            except OSError:
                continue
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def _start_time(pid: int) -> bytes | None:
    """A process's start time, which tells it from a later one that got its pid."""
    try:
        fields = stat_fields(pid)
    except OSError:
        return None
    return fields[19] if fields is not None and len(fields) > 19 else None


def _kill_strays(slot: Slot) -> None:
    for pid, started in slot.strays:
        if _start_time(pid) == started:  # the same process, not another that took its pid
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    slot.strays = []


def _unimportable_main_hint(context: Any) -> str:
    """Why every worker of a script piped into Python (`python - < job.py`) dies at start:
    the forkserver and spawn start methods re-import the program's main module in each
    worker, from its __file__, which is then no file."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if (path is None or getattr(main, "__spec__", None) is not None or os.path.isfile(path)
            or context.get_start_method() == "fork"):
        return ""
    return (f"; the program's main module ({path!r}) is not a file the workers can import "
            "(the forkserver start method re-imports it in each worker): run the program from "
            "a .py file, or pass context='fork'")
