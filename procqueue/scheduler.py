"""Decisions: which queued tasks form the next batch (and a call's halt policy).  No
processes, pipes or files: admission asks the gates (admission.py), which may touch
shared-memory semaphores and, for a memory gate, read psutil's figures.

Calls are served FIFO (the oldest call with queued tasks first, tasks FIFO inside a call);
a task coming back from its retry backoff goes to the front of its call's queue, so a retry
does not wait behind the whole remaining batch.  Time is passed in (`now`), never read here.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from typing import Any, Sequence

from .admission import (BatchHold, ConcurrencyGate, FreeMemoryGate, Gate, KeyHold,
                        RateGateAdapter, admit, batch_share, earliest, rate_gate_for)
from .chunking import ChunkSizer
from .config import PoolConfig
from .limits.keyed import KeyedFifo
from .records import FrozenRecord
from .tasks import Block, Job, Task, TaskState, new_id


# Batches a worker holds at once: the one it runs and one sent ahead (Dispatcher.dispatch);
# a keyed batch holds its keys' places all along (JobQueue.batch_share).
BATCHES_HELD_PER_WORKER = 2

# GNU parallel's older --halt values: 1 and 2 halt on a failure, -1 and -2 on a success
HALT_LEGACY = {"1": "soon,fail=1", "2": "now,fail=1", "-1": "soon,success=1",
               "-2": "now,success=1"}


class HaltPolicy(FrozenRecord):
    """GNU parallel's --halt for one call: once `count` of its inputs (or `percent` % of
    them) have failed (kind "fail"), succeeded ("success") or ended either way ("done"),
    start no more of its tasks; `now` also kills the running ones."""

    # __match_args__ as Record sets it, spelled out for mypy (a caller's `case HaltPolicy(...)`)
    _fields = __match_args__ = ("now", "kind", "count", "percent")

    now: bool
    kind: str
    count: int | None
    percent: float | None

    FORMS = "never, soon|now,fail|success|done=N or =N%, or GNU parallel's 0, 1, 2, -1, -2, N%"

    def __init__(self, now: bool, kind: str = "fail", count: int | None = None,
                 percent: float | None = None) -> None:
        set_ = object.__setattr__
        set_(self, "now", now)
        set_(self, "kind", kind)
        set_(self, "count", count)
        set_(self, "percent", percent)

    @classmethod
    def parse(cls, text: str) -> "HaltPolicy | None":
        """'soon,fail=3', 'now,fail=10%', 'now,success=1', 'soon,done=50%'; 'never' or '0'
        is None; '1' and '2' are parallel's soon,fail=1 and now,fail=1, '-1' and '-2' its
        soon,success=1 and now,success=1, and a bare 'N%' its soon,fail=N%."""
        if text in ("never", "0"):
            return None
        text = HALT_LEGACY.get(text, text)
        if text.endswith("%") and "," not in text:
            text = f"soon,fail={text}"
        when, _, rule = text.partition(",")
        kind, equals, value = rule.partition("=")
        if when not in ("soon", "now") or kind not in ("fail", "success", "done") \
                or not equals:
            raise ValueError(f"halt {text!r}: use {cls.FORMS}")
        try:
            if value.endswith("%"):
                percent = float(value[:-1])
                if not 0 < percent <= 100:
                    raise ValueError(value)
                return cls(when == "now", kind, percent=percent)
            count = int(value)
            if count < 1:
                raise ValueError(value)
            return cls(when == "now", kind, count=count)
        except ValueError:
            raise ValueError(f"halt {text!r}: {kind}= takes a number >= 1 or a percentage "
                             "in (0, 100]") from None

    def reached(self, failed: int, succeeded: int, total: int) -> bool:
        """`total`: the inputs of the call (or submitted so far, for a lazy one)."""
        n = {"fail": failed, "success": succeeded, "done": failed + succeeded}[self.kind]
        if n == 0:
            return False
        if self.count is not None:
            return n >= self.count
        assert self.percent is not None
        return n * 100 >= self.percent * total

    def of_total(self, total: int) -> "HaltPolicy":
        """The same policy with a percentage turned into a count of `total` inputs."""
        if self.percent is None:
            return self
        return HaltPolicy(self.now, self.kind, count=max(1, math.ceil(self.percent * total / 100)))

    def __str__(self) -> str:
        value = f"{self.count}" if self.count is not None else f"{self.percent:g}%"
        return f"{'now' if self.now else 'soon'},{self.kind}={value}"


class JobQueue(KeyedFifo[Any, "Task | Block"]):
    """The queued tasks of one call: FIFO, or, for a keyed call, FIFO within each key and
    round-robin across keys (one key with 10,000 tasks cannot starve a key with 5).  The
    scheduler also appends groups and blocks to `fifo` directly, and counts a block as its
    number of inputs in `size` (see enqueue_all)."""

    def __init__(self, job: Job) -> None:
        super().__init__(keyed=job.keyed is not None, limit=job.keyed)
        self.job = job

    def pop(self) -> Task:
        """Next task (FIFO queue of a gated call: never holds blocks)."""
        self.size -= 1
        task = self.fifo.popleft()
        assert isinstance(task, Task)
        return task

    def pop_key(self, key: Any) -> Task | None:
        """Next task of `key`, at its cap or not (keyed queue only)."""
        task = self.pop_of(key)
        assert task is None or isinstance(task, Task)
        return task

    def may_prefetch(self, workers: int) -> bool:
        """Whether a batch for a busy worker may come from this queue.  A prefetched batch
        of a keyed call holds its keys' places while it waits behind the worker's running
        one, so only while there are places to spare: at least two per worker among the
        keys that may start.  With fewer (few keys, or most at their cap) a waiting batch
        would take the place a worker going idle needs.  (1,024 keys of 4 on 64 workers:
        a worker waited a round trip for each batch, 0.71 -> 0.77 of the ideal wall with
        a prefetch, 2 cores.)"""
        if self.job.keyed is None:
            return True
        return (self.batch_share(workers) or 0) >= 2

    def held_places(self, after: Sequence[Task]) -> dict[Any, BatchHold] | None:
        """The places of this call's keys that the tasks `after` hold (a worker's running
        batch), by key, where a batch for that worker may take more tasks of those keys in
        them: only while no other key of the call may start, so that a worker keeping its
        keys takes no turn from a key waiting for one (round robin across keys)."""
        keyed = self.job.keyed
        if keyed is None or not after or self.by_key is None \
                or self.by_key.has_startable(keyed.can_start):
            return None
        held: dict[Any, BatchHold] = {}
        for task in after:
            for hold in task.holds:
                if isinstance(hold, BatchHold) and hold.left > 0 and len(hold.gates) == 1:
                    place = hold.gates[0]
                    if isinstance(place, KeyHold) and place.keyed is keyed:
                        held[place.key] = hold
        return held

    def pop_startable_key(self) -> Task | None:
        """Next task whose key is under its cap (keyed queue only)."""
        assert self.by_key is not None and self.job.keyed is not None
        task = self.pop_startable(self.job.keyed.can_start)
        assert task is None or isinstance(task, Task)
        return task


def pool_gates(config: PoolConfig) -> tuple[Gate, ...]:
    """The gates every task of the pool passes: its concurrency and its rate."""
    gates: list[Gate] = []
    if config.concurrency is not None:
        gates.append(ConcurrencyGate(config.concurrency))
    if config.rate is not None:
        gates.append(RateGateAdapter(rate_gate_for(config.rate)))
    if config.min_free_memory is not None:
        gates.append(FreeMemoryGate(config.min_free_memory))
    return tuple(gates)


class Scheduler:
    """Queued tasks and the decision which may start now.  `pool_gates` apply to every task
    (the pool's concurrency and rate); each call adds its own (Job.gates, Job.keyed)."""

    def __init__(self, pool_gates: tuple[Gate, ...] = (), workers: int = 1) -> None:
        self.pool_gates = pool_gates
        self.workers = workers  # the pool's processes, among whom a gate's permits are shared
        self._queues: OrderedDict[int, JobQueue] = OrderedDict()
        self._retry_heap: list[tuple[float, int, Task]] = []
        self._queued_by_fn: dict[int, int] = {}  # fn_id -> queued tasks (guided chunk share)
        self.queued = 0  # tasks held in the queues (some may have been cancelled meanwhile)
        self.admission_wait_until: float | None = None  # a gate said: look again then

    def enqueue(self, task: Task, *, front: bool = False) -> None:
        job = task.job
        queue = self._queues.get(job.id)
        if queue is None:
            queue = self._queues[job.id] = JobQueue(job)
            if front:  # a retried task's call goes first, so the retry does not wait
                self._queues.move_to_end(job.id, last=False)
        queue.push(task, task.key, front)
        self.queued += 1
        self._queued_by_fn[job.fn_id] = self._queued_by_fn.get(job.fn_id, 0) + 1

    def enqueue_all(self, tasks: list[Task | Block]) -> None:
        """enqueue() for a group of new tasks and blocks, in order (a submitted group: one
        call each); a block counts as its number of inputs."""
        start = 0
        while start < len(tasks):
            job = tasks[start].job
            end = start + 1
            while end < len(tasks) and tasks[end].job is job:
                end += 1
            queue = self._queues.get(job.id) or self._tail_lane(job)
            if queue is None:
                queue = self._queues[job.id] = JobQueue(job)
            group = tasks[start:end]
            if queue.by_key is not None:  # a keyed call: tasks only
                push = queue.push
                for task in group:
                    assert isinstance(task, Task)
                    push(task, task.key)
                n = len(group)
            else:
                queue.fifo.extend(group)
                n = sum(len(t) if isinstance(t, Block) else 1 for t in group)
                queue.size += n
            self.queued += n
            self._queued_by_fn[job.fn_id] = self._queued_by_fn.get(job.fn_id, 0) + n
            start = end

    def _tail_lane(self, job: Job) -> JobQueue | None:
        """The last queue, if `job` may join it: consecutive submit()/apply_async() calls of
        one function share one queue (they travel in one batch anyway), so that thousands of
        them cost one queue, not one each.  Only the last queue, so calls stay FIFO; only
        calls that are never cancelled or halted as a whole (their queue is not theirs)."""
        if not self._queues or not _may_share_a_queue(job):
            return None
        last = self._queues[next(reversed(self._queues))]
        if _may_share_a_queue(last.job) and _same_batch(last.job, job, self.pool_gates):
            return last
        return None

    def next_gated_job(self) -> Job | None:
        """The call served next, if its tasks pass gates (see Dispatcher._warm_up)."""
        for queue in self._queues.values():
            job = queue.job
            if queue.size and (self.pool_gates or job.gates or job.keyed):
                return job
            if queue.size:
                return None
        return None

    def next_call_sizer(self) -> ChunkSizer | None:
        """The batch sizer of the call served next (whether its function is still probed,
        the chunksize its caller fixed), None when nothing is queued."""
        queue = next(iter(self._queues.values()), None)
        return None if queue is None else queue.job.sizer

    def next_batch(self, max_tasks: int, now: float = 0.0, *, prefetch: bool = False,
                   after: Sequence[Task] = ()) -> list[Task] | Block:
        """The next batch of at most `max_tasks` tasks that every gate admits, all of one
        function.  Calls are served FIFO; a call held back by its own limits does not hold
        back the calls behind it.  Ungated calls of one function share batches (many
        submit() calls travel together, like the items of one map).

        A prefetch (a batch for a worker that is still busy) is never taken from a gated
        call: it would hold permits while it waits, and a rate start would be recorded
        before the task really starts.  Nor from a call whose function is still being
        probed (batches of one task until one is measured): its first results are waiting by
        the time a pass over every worker has been made, and a second pass of one-task
        batches only put off the sized ones (N=64: each worker idled ~2 passes, not 1).
        From a keyed call: new places while its keys have places to spare
        (JobQueue.may_prefetch), else more tasks of the keys whose places the worker's
        running batch (`after`) holds, once no other key may start (JobQueue.held_places).
        A batch is either tasks or one Block (inputs of one call, split to the batch size or
        merged with the blocks that follow it)."""
        if prefetch and self.pool_gates:
            return []
        self.admission_wait_until = None
        emptied: list[int] = []
        batch: list[Task] = []
        block: Block | None = None
        first: Job | None = None
        size = 0  # fixed by the first call served: the batch size is the function's
        for job_id, queue in self._queues.items():
            job = queue.job
            if first is not None and not _same_batch(first, job, self.pool_gates):
                break
            held = None
            if prefetch and (job.gates or job.sizer.probing):
                continue
            if prefetch and not queue.may_prefetch(self.workers):
                held = queue.held_places(after)
                if not held:
                    continue
            if first is None:
                size = min(job.sizer.next_size(self._queued_by_fn.get(job.fn_id, 0)),
                           max_tasks)
            if held:
                batch = self._extend_held_places(queue, held, size)
                if queue.size == 0:
                    emptied.append(job_id)
                break
            if queue.fifo and isinstance(queue.fifo[0], Block):
                if not batch:  # a block travels alone
                    block = self._admit_block(queue, size, now)
                    if queue.size == 0:
                        emptied.append(job_id)
                break
            if batch and _alone_next(queue):
                break
            got = self._admit_from(queue, size - len(batch), now)
            if queue.size == 0:
                emptied.append(job_id)
            if got:
                batch.extend(got)
                first = first or job
                if len(batch) >= size or self.pool_gates or job.gates or job.keyed \
                        or got[-1].alone:
                    break
        for job_id in emptied:
            del self._queues[job_id]
        return batch if block is None else block

    def _admit_from(self, queue: JobQueue, size: int, now: float) -> list[Task]:
        gates = self.pool_gates + queue.job.gates
        if queue.by_key is None and not gates:
            return self._take_ungated(queue, size)
        if queue.by_key is None and all(gate.refundable for gate in gates):
            return self._admit_as_one(queue, gates, size, now)
        # Each task takes its own permits: a batch takes its share of them only
        size = min(size, batch_share(gates, self.workers) or size)
        if queue.by_key is not None:
            return self._admit_keyed(queue, size, now)
        tasks: list[Task] = []
        while queue.size and len(tasks) < size:
            wanted = min(size - len(tasks), queue.size)
            granted, wait, held = admit(gates, wanted, now)
            if not granted:
                self._note_wait(now, wait)
                break
            for _ in range(granted):
                task = self._next_live(queue)
                if task is None:  # the rest were cancelled while queued
                    for gate in held:
                        gate.put_back(1)
                    continue
                task.holds = held
                tasks.append(task)
        return tasks

    def _admit_as_one(self, queue: JobQueue, gates: tuple[Gate, ...], size: int, now: float
                      ) -> list[Task]:
        """A batch of up to `size` tasks that takes one permit of each gate (concurrency
        limits only: see BatchHold), released when the last of them ends."""
        granted, wait, held = admit(gates, 1, now)
        if not granted:
            self._note_wait(now, wait)
            return []
        tasks = self._take_ungated(queue, size)
        if not tasks:  # the rest were cancelled while queued
            for gate in held:
                gate.put_back(1)
            return []
        hold = (BatchHold(held, len(tasks)),)
        for task in tasks:
            task.holds = hold
        return tasks

    def _admit_keyed(self, queue: JobQueue, size: int, now: float) -> list[Task]:
        """Tasks of a keyed call, each under its key's cap.  A worker runs its batch's tasks
        one at a time, so a batch holds one place per key it has tasks of (shared by them,
        given back when the last of them ends), takes new places only up to its share
        (KeyedFifo.batch_share: a batch took every place of a few keys and the call ran on
        one worker), and fills the rest of its size with more tasks of the keys it holds."""
        job = queue.job
        keyed = job.keyed
        assert keyed is not None
        gates = self.pool_gates + job.gates
        places = queue.batch_share(self.workers, BATCHES_HELD_PER_WORKER) or size
        by_key: dict[Any, list[Task]] = {}
        tasks: list[Task] = []
        popped = 0  # counted out of the queue once, after the loop
        while queue.size and len(tasks) < size and len(by_key) < places:
            task = queue.pop_startable_key()
            if task is None:
                break  # every queued key is at its cap: a finishing task will wake us
            popped += 1
            if task.state is not TaskState.QUEUED:
                continue
            if gates:
                granted, wait, held = admit(gates, 1, now)
                if not granted:
                    queue.push(task, task.key, front=True)
                    popped -= 1
                    self._note_wait(now, wait)
                    break
                task.holds = held
            of_key = by_key.get(task.key)
            if of_key is None:
                keyed.started(task.key)
                of_key = by_key[task.key] = []
            of_key.append(task)
            tasks.append(task)
        if popped:
            self._count_out(job, popped)
        if not gates:  # under gates each task takes its own permits: no more than admitted
            self._add_tasks_of_held_keys(queue, by_key, tasks, size)
        for key, of_key in by_key.items():
            hold = BatchHold((KeyHold(keyed, key),), len(of_key))
            for task in of_key:
                task.holds += (hold,)
        return tasks

    def _extend_held_places(self, queue: JobQueue, held: dict[Any, BatchHold], size: int
                            ) -> list[Task]:
        """Up to `size` more tasks of the keys in `held`, each joining its key's place in the
        batch the worker is running (they run after that batch's, on the same worker, so the
        place is given back only when the last of them ends)."""
        by_key: dict[Any, list[Task]] = {key: [] for key in held}
        tasks: list[Task] = []
        self._add_tasks_of_held_keys(queue, by_key, tasks, size)
        for key, of_key in by_key.items():
            hold = held[key]
            hold.left += len(of_key)
            for task in of_key:
                task.holds = (hold,)
        return tasks

    def _add_tasks_of_held_keys(self, queue: JobQueue, by_key: dict[Any, list[Task]],
                                tasks: list[Task], size: int) -> None:
        """Up to `size` tasks in all: the next queued tasks of the keys in `by_key`, round
        robin, taking no new place (they run after the batch's others of their key)."""
        added = True
        while added and len(tasks) < size:
            added = False
            for key, of_key in by_key.items():
                task = queue.pop_key(key)
                if task is None:
                    continue
                added = True
                self._count_out(queue.job, 1)
                if task.state is TaskState.QUEUED:
                    of_key.append(task)
                    tasks.append(task)
                    if len(tasks) >= size:
                        return

    def _admit_block(self, queue: JobQueue, size: int, now: float) -> Block | None:
        """The next block of the queue, holding one permit of each of its concurrency gates
        (only calls under concurrency limits alone travel in blocks: Submitter.blocks_allowed),
        or None if a gate refuses."""
        gates = self.pool_gates + queue.job.gates
        if not gates:
            return self._take_block(queue, size)
        granted, wait, held = admit(gates, 1, now)
        if not granted:
            self._note_wait(now, wait)
            return None
        block = self._take_block(queue, size)
        block.hold = BatchHold(held, 1)
        return block

    def _take_block(self, queue: JobQueue, size: int) -> Block:
        """The block at the head of the queue, cut to `size` inputs, or joined with the
        blocks right behind it (consecutive inputs of the same call) up to `size`."""
        fifo = queue.fifo
        head = fifo[0]
        assert isinstance(head, Block)
        if len(head) > size:
            block = head.split(size, new_id())
        else:
            fifo.popleft()
            block = head
            while fifo and len(block) < size:
                after = fifo[0]
                if not isinstance(after, Block) or after.start != block.start + len(block):
                    break
                room = size - len(block)
                if len(after) <= room:
                    fifo.popleft()
                    part = after
                else:
                    part = after.split(room, new_id())
                block.inputs = block.inputs + part.inputs
        queue.size -= len(block)
        self._count_out(queue.job, len(block))
        return block

    def _take_ungated(self, queue: JobQueue, size: int) -> list[Task]:
        """Up to `size` live tasks of a FIFO queue no gate guards (the common case, so one
        count update per batch instead of per task); stops at a block."""
        fifo = queue.fifo
        tasks: list[Task] = []
        popped = 0
        while fifo and len(tasks) < size:
            task = fifo[0]
            if isinstance(task, Block) or task.alone and tasks:
                break
            fifo.popleft()
            popped += 1
            if task.state is TaskState.QUEUED:  # skip ones cancelled while queued
                tasks.append(task)
                if task.alone:
                    break  # (see Task.alone)
        if popped:
            queue.size -= popped
            self._count_out(queue.job, popped)
        return tasks

    def _next_live(self, queue: JobQueue) -> Task | None:
        while queue.size:
            task = queue.pop()
            self._count_out(queue.job, 1)
            if task.state is TaskState.QUEUED:  # skip ones cancelled while queued
                return task
        return None

    def _note_wait(self, now: float, wait: float | None) -> None:
        if wait is not None:
            self.admission_wait_until = earliest(self.admission_wait_until, now + wait)

    def _count_out(self, job: Job, n: int) -> None:
        self.queued -= n
        left = self._queued_by_fn[job.fn_id] - n
        if left:
            self._queued_by_fn[job.fn_id] = left
        else:
            del self._queued_by_fn[job.fn_id]

    def drop_cancelled(self, job: Job) -> list[Task | Block]:
        """Remove and return every queued task (and block) of `job`."""
        queue = self._queues.pop(job.id, None)
        if queue is None:
            return []
        n = queue.size
        tasks = queue.drain()
        if n:
            self._count_out(job, n)
        return [t for t in tasks if isinstance(t, Block) or t.state is TaskState.QUEUED]

    def queued_jobs(self) -> list[Job]:
        """The calls with tasks or blocks in the queue."""
        return [queue.job for queue in self._queues.values()]

    def all_queued(self) -> list[Task | Block]:
        tasks = [t for q in self._queues.values() for t in q.drain()
                 if isinstance(t, Block) or t.state is TaskState.QUEUED]
        self._queues.clear()
        self._queued_by_fn.clear()
        self.queued = 0
        return tasks

    def wait_for_retry(self, task: Task, not_before: float) -> None:
        task.not_before = not_before
        heapq.heappush(self._retry_heap, (not_before, task.id, task))

    def release_due_retries(self, now: float) -> list[Task]:
        due = []
        while self._retry_heap and self._retry_heap[0][0] <= now:
            _, _, task = heapq.heappop(self._retry_heap)
            if task.state is TaskState.RETRY_WAIT:
                due.append(task)
        return due

    def all_retry_waiting(self) -> list[Task]:
        tasks = [t for _, _, t in self._retry_heap if t.state is TaskState.RETRY_WAIT]
        self._retry_heap.clear()
        return tasks

    def next_retry_at(self) -> float | None:
        return self._retry_heap[0][0] if self._retry_heap else None


def _alone_next(queue: JobQueue) -> bool:
    """The queue's next task travels alone (Task.alone): no batch begun may take it."""
    head = queue.fifo[0] if queue.fifo else None
    return isinstance(head, Task) and head.alone


def _may_share_a_queue(job: Job) -> bool:
    return job.single_task and job.halt is None and not job.gates and job.keyed is None


def _same_batch(first: Job, other: Job, pool_gates: tuple[Gate, ...]) -> bool:
    """Tasks of two calls may share a batch: one function, called the same way, no gates."""
    return other is first or (
        other.fn_id == first.fn_id and other.kind == first.kind and other.sizer is first.sizer
        and not (pool_gates or first.gates or other.gates or first.keyed or other.keyed))
