"""Durability soak of the durable task queue (issue #21): nothing lost, nothing run twice.

    python bench/queue_soak.py [--store sqlite|postgres|PATH|URL] [--tasks 5000] [--kills 20]

Two enqueuing processes and two worker services (`procqueue worker -j 2` subprocesses) share
one store; the driver SIGKILLs a random service at random points of the run (each at a random
share of the tasks done) and starts it again at once.  Every run of a task appends to a
side-effect log (O_APPEND): a ``start`` line when it begins and a ``done`` line when it ends.
From the enqueuers' lists of ids, the store's records and that log it checks:

- no enqueue lost: every id an enqueuer got back is in the store, once, for its input;
- every task has exactly one final result, succeeded and correct, and it is the outcome of
  the run that started last (its pid and start time are in the result and in the log);
- no task that finished ran again: no run of a task started after the run whose result was
  kept (nor after the result was committed);
- re-runs are bounded: the claims of tasks beyond their first are exactly the tasks the
  killed services held (read from the store after each kill), each run again once;
- every kill was detected (the dead service's tasks re-queued) and how long that took;
- no process outlives its service: the descendants of a killed service die with it.

tests/test_queue_durability.py runs the same at a smaller size; this script's full size is
the issue's: 5,000 tasks, 20 kills.  ``--store postgres`` starts a private PostgreSQL
with pgserver.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import hashlib
import os
import pickle
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
TASK_REF = f"{HERE}:soak_task"
QUEUE = "soak"
POLL_S = 0.02  # how often the driver reads the store's counts and services
STOP_WAIT_S = 20.0  # a service asked to stop (SIGTERM) must have exited by then
REAP_WAIT_S = 5.0  # a killed service's descendants must be gone by then (they watch it)
MAX_UNEXPECTED_EXITS = 3  # services that exit unasked this often: the run stops, failed


# ---- the task ---------------------------------------------------------------------------------

def expected_value(key: int) -> str:
    return hashlib.sha256(f"soak-{key}".encode()).hexdigest()[:16]


def soak_task(key: int, log_path: str, seconds: float) -> dict[str, Any]:
    """Log the run's start, work `seconds`, log its end; the value with who ran it, when."""
    pid, start = os.getpid(), time.time()
    _append(log_path, f"start {key} {pid} {start!r}\n")
    time.sleep(seconds)
    value = expected_value(key)
    _append(log_path, f"done {key} {pid} {start!r} {time.time()!r}\n")
    return {"key": key, "value": value, "pid": pid, "start": start}


def _append(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())  # one write of < PIPE_BUF bytes: never interleaved
    finally:
        os.close(fd)


# ---- an enqueuing process -----------------------------------------------------------------

def enqueue_part(store: str, first: int, count: int, batches: int, log_path: str,
                 seconds: float, ids_path: str, seed: int) -> None:
    """Enqueue keys first..first+count-1 in `batches` batches of random sizes, writing each
    id the store gave back, with its key, to ids_path as soon as its batch returned."""
    import procqueue
    rng = random.Random(seed)
    keys = list(range(first, first + count))
    cuts = sorted(rng.sample(range(1, count), min(batches, count) - 1))
    tq = procqueue.TaskQueue(store)
    try:
        with open(ids_path, "w") as out:
            for start, end in zip([0, *cuts], [*cuts, count]):
                batch = keys[start:end]
                handles = tq.enqueue_many(TASK_REF, [(k, log_path, seconds) for k in batch],
                                          star=True, queue=QUEUE)
                out.write("".join(f"{h.id} {k}\n" for h, k in zip(handles, batch)))
                out.flush()
                time.sleep(rng.uniform(0.0, 0.05))  # spread the batches over the run
    finally:
        tq.close()


def _enqueuer(store: str, first: int, count: int, plan: "Plan", workdir: Path, n: int,
              env: dict[str, str]) -> subprocess.Popen[bytes]:
    args = [sys.executable, str(HERE), "_enqueue", store, str(first), str(count),
            str(plan.batches), plan.log_path(workdir), str(plan.task_s),
            str(workdir / f"ids-{n}.txt"), str(plan.seed + n)]
    with open(workdir / f"enqueuer-{n}.err", "wb") as err:
        return subprocess.Popen(args, env=env, stderr=err)


# ---- the worker services --------------------------------------------------------------------

@dataclass
class Kill:
    """One SIGKILL of a service, and what followed."""

    pid: int
    at: float  # time.monotonic() of the kill
    at_wall: float  # time.time() of the kill (the side-effect log's clock)
    workers: list[int] = field(default_factory=list)  # its descendants when it was killed
    service_id: str | None = None  # None: killed before it registered
    held: int | None = None  # its running tasks, as the store last showed them (see _watch)
    detected_s: float | None = None  # kill -> its row gone (its tasks re-queued)
    unserved_s: float | None = None  # of detected_s, the time no live service was there
    workers_gone_s: float | None = None  # kill -> its last descendant dead
    survivors: list[int] = field(default_factory=list)  # descendants alive REAP_WAIT_S later


class Fleet:
    """The worker services, one per slot, started as `procqueue worker` subprocesses."""

    def __init__(self, store: str, slots: int, jobs: int, workdir: Path,
                 env: dict[str, str]) -> None:
        self.store, self.jobs, self.workdir, self.env = store, jobs, workdir, env
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * slots
        self.started = 0
        self.unexpected_exits: list[tuple[int, int | None]] = []  # (pid, returncode)
        self.leftovers: list[int] = []  # descendants that outlived their service
        self.registered: dict[int, str] = {}  # pid -> service id, as seen in the store
        self.dying: list[tuple[Kill, list[Any]]] = []  # killed services' descendants
        self.launched: dict[int, float] = {}  # pid -> time.monotonic() of its start
        self.registered_at: dict[int, float] = {}  # pid -> when first seen registered
        self.killed_at: dict[int, float] = {}
        self.start_s: list[float] = []  # start -> registered, of each service that did

    def start(self, slot: int) -> None:
        self.started += 1
        cmd = [sys.executable, "-c", "from procqueue.cli import main; main()", "worker",
               self.store, "-j", str(self.jobs), "--no-pin"]
        with open(self.workdir / f"service-{self.started}.err", "wb") as err:
            proc = subprocess.Popen(cmd, env=self.env, stderr=err)
        self.procs[slot] = proc
        self.launched[proc.pid] = time.monotonic()

    def start_all(self) -> None:
        for slot in range(len(self.procs)):
            self.start(slot)

    def note(self, services: list[Any]) -> None:
        """Remember which pid registered as which service, and how long it took."""
        for s in services:
            if s.pid not in self.registered and s.pid in self.launched:
                self.start_s.append(time.monotonic() - self.launched[s.pid])
                self.registered_at[s.pid] = time.monotonic()
            self.registered.setdefault(s.pid, s.id)

    def unserved(self, start: float, end: float) -> float:
        """Seconds of [start, end] when no registered service was alive (only a live
        service's claims find a dead one)."""
        spans = sorted((max(seen, start), min(self.killed_at.get(pid, end), end))
                       for pid, seen in self.registered_at.items())
        covered, cursor = 0.0, start
        for begin, finish in spans:
            begin = max(begin, cursor)
            if finish > begin:
                covered, cursor = covered + finish - begin, finish
        return end - start - covered

    def all_registered(self) -> bool:
        """Every running service has registered (so SIGTERM finds its handler set)."""
        return all(p.pid in self.registered for p in self.procs if p is not None)

    def revive_exited(self) -> None:
        """A service that exited without being asked to is a finding; start it again."""
        for slot, proc in enumerate(self.procs):
            if proc is not None and proc.poll() is not None:
                self.unexpected_exits.append((proc.pid, proc.returncode))
                if len(self.unexpected_exits) > MAX_UNEXPECTED_EXITS:
                    raise RuntimeError(f"services keep exiting: {self.unexpected_exits}; the "
                                       f"last one's stderr:\n{self.last_stderr()}")
                self.start(slot)

    def last_stderr(self) -> str:
        return (self.workdir / f"service-{self.started}.err").read_text()[-3000:]

    def kill(self, slot: int, tq: Any) -> Kill:
        """SIGKILL the slot's service, read what it held, start a new one at once."""
        proc = self.procs[slot]
        assert proc is not None
        descendants = _descendants(proc.pid)
        proc.send_signal(signal.SIGKILL)
        kill = Kill(proc.pid, time.monotonic(), time.time(), [p.pid for p in descendants])
        self.killed_at[proc.pid] = kill.at
        proc.wait()
        services = tq.services()
        row = next((s for s in services if s.pid == kill.pid), None)
        self.start(slot)
        if row is not None:
            kill.service_id, kill.held = row.id, row.running
        else:
            kill.service_id = self.registered.get(kill.pid)  # registered: its row went already
        self.dying.append((kill, descendants))
        return kill

    def watch_dying(self) -> None:
        """Note when each killed service's descendants are all dead; those still running
        REAP_WAIT_S after the kill are leftovers."""
        still = []
        for kill, processes in self.dying:
            running = [p for p in processes if _running(p)]
            if not running:
                kill.workers_gone_s = time.monotonic() - kill.at
            elif time.monotonic() - kill.at > REAP_WAIT_S:
                kill.survivors = [p.pid for p in running]
                self.leftovers += kill.survivors
            else:
                still.append((kill, running))
        self.dying = still

    def stop_all(self) -> list[tuple[int, int | None]]:
        """SIGTERM every service; (pid, exit code) of each, None if it did not exit in time."""
        procs = [p for p in self.procs if p is not None]
        family = {p.pid: _descendants(p.pid) for p in procs}
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        codes = []
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(STOP_WAIT_S)
            codes.append((proc.pid, proc.returncode))
            self.leftovers += _survivors(family[proc.pid])
        self.procs = [None] * len(self.procs)
        return codes

    def close(self) -> None:
        """Kill and reap whatever is still running (the run failed), and any leftover."""
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                for child in _descendants(proc.pid):
                    with contextlib.suppress(Exception):
                        child.kill()
                proc.kill()
                proc.wait()
        self.procs = [None] * len(self.procs)
        for pid in set(self.leftovers) | set(processes_naming(self.store)):
            with contextlib.suppress(Exception):
                os.kill(pid, signal.SIGKILL)


def _descendants(pid: int) -> list[Any]:
    import psutil
    try:
        return list(psutil.Process(pid).children(recursive=True))
    except psutil.NoSuchProcess:
        return []


def processes_naming(text: str) -> list[int]:
    """Live processes with `text` in their command line: a service's pool workers are forked
    from it (python -c has no main module to re-import), so they carry its command line."""
    import psutil
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        with contextlib.suppress(psutil.Error):
            if (proc.info["status"] != psutil.STATUS_ZOMBIE
                    and text in " ".join(proc.info["cmdline"] or ())):
                found.append(proc.pid)
    return found


def _survivors(processes: list[Any]) -> list[int]:
    """The pids of these processes still running REAP_WAIT_S after their service died.  A
    process that died is gone or a zombie (orphans wait for init to reap them, lazily)."""
    deadline = time.monotonic() + REAP_WAIT_S
    running = processes
    while True:
        running = [p for p in running if _running(p)]
        if not running or time.monotonic() > deadline:
            return [p.pid for p in running]
        time.sleep(0.01)


def _running(proc: Any) -> bool:
    import psutil
    try:  # is_running: False once the pid is another process's
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


# ---- one run ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    tasks: int = 5000
    kills: int = 20
    task_s: float = 0.005  # each task sleeps this long
    jobs: int = 2  # worker processes per service
    batches: int = 10  # each enqueuer enqueues its half in this many batches
    first_kill: float = 0.05  # kills fall at random shares of the tasks done, in this range
    last_kill: float = 0.85
    deadline_s: float = 600.0  # the run fails if it has not ended by then
    seed: int = 0

    def log_path(self, workdir: Path) -> str:
        return str(workdir / "side-effects.log")


@dataclass
class Facts:
    """What a run recorded: the checks read only these."""

    plan: Plan
    enqueued: list[tuple[int, int]]  # (id, key) as the enqueuers got them back
    enqueuer_codes: list[int | None]
    records: dict[int, Any]  # id -> TaskRecord, every task of the soak's queue
    starts: dict[int, list[tuple[int, float]]]  # key -> (pid, start) of each run begun
    dones: dict[int, list[tuple[int, float, float]]]  # key -> (pid, start, end) of each ended
    kills: list[Kill]
    services_started: int
    service_start_s: list[float]  # start -> registered in the store, per service
    unexpected_exits: list[tuple[int, int | None]]
    stop_codes: list[tuple[int, int | None]]
    left_registered: list[str]  # services still in the store after they were stopped
    leftovers: list[int]  # descendants of a killed or stopped service alive after it
    strays: list[int]  # processes naming the store in their command line, after the run
    wall_s: float


def run(store: str, plan: Plan, workdir: Path) -> Facts:
    """One soak run on `store` (an SQLite path or a PostgreSQL URL), files in workdir."""
    import procqueue
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    tq = procqueue.TaskQueue(store)  # creates the store before anyone else opens it
    fleet = Fleet(store, 2, plan.jobs, workdir, env)
    enqueuers: list[subprocess.Popen[bytes]] = []
    started = time.monotonic()
    try:
        half = plan.tasks // 2
        enqueuers = [_enqueuer(store, 0, half, plan, workdir, 0, env),
                     _enqueuer(store, half, plan.tasks - half, plan, workdir, 1, env)]
        fleet.start_all()
        kills = _drive(tq, fleet, enqueuers, plan)
        stop_codes = fleet.stop_all()
        left_registered = [s.id for s in tq.services()]
        wall_s = time.monotonic() - started
        return Facts(plan, _read_ids(workdir), [p.wait() for p in enqueuers],
                     _records(tq), *_read_log(plan.log_path(workdir)), kills, fleet.started,
                     fleet.start_s,
                     fleet.unexpected_exits, stop_codes, left_registered, fleet.leftovers,
                     processes_naming(store), wall_s)
    finally:
        fleet.close()
        for proc in enqueuers:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        tq.close()


def _drive(tq: Any, fleet: Fleet, enqueuers: list[subprocess.Popen[bytes]],
           plan: Plan) -> list[Kill]:
    """Watch the run, kill a random service at each kill point, until every task ended,
    every enqueuer ended and every kill was detected."""
    rng = random.Random(plan.seed)
    points = sorted(rng.uniform(plan.first_kill, plan.last_kill) * plan.tasks
                    for _ in range(plan.kills))
    kills: list[Kill] = []
    deadline = time.monotonic() + plan.deadline_s
    while True:
        done, services = _ended(tq), tq.services()
        fleet.note(services)
        _watch(kills, services, fleet)
        fleet.watch_dying()
        fleet.revive_exited()
        if points and done >= points[0]:
            points.pop(0)
            kills.append(fleet.kill(rng.randrange(len(fleet.procs)), tq))
        elif (done >= plan.tasks and all(p.poll() is not None for p in enqueuers)
              and all(k.detected_s is not None for k in kills if k.service_id)
              and fleet.all_registered() and not fleet.dying):
            return kills
        if time.monotonic() > deadline:
            raise TimeoutError(f"the soak did not end in {plan.deadline_s} s: {done} of "
                               f"{plan.tasks} ended, {len(kills)} kills, "
                               f"{tq.counts()}, {services}")
        time.sleep(POLL_S)


def _ended(tq: Any) -> int:
    """The soak's tasks that ended (succeeded, or not: the checks tell)."""
    return sum(c.succeeded + c.failed + c.cancelled for c in tq.counts()
               if c.spec.name == QUEUE)


def _watch(kills: list[Kill], services: list[Any], fleet: Fleet) -> None:
    """Follow each killed service's row until its tasks are put back (the row goes): what
    it held is its running count last seen, as a PostgreSQL server may still commit the
    dead client's last transaction (a claim, a record) just after the kill."""
    now = time.monotonic()
    rows = {s.id: s for s in services}
    for kill in kills:
        if not kill.service_id or kill.detected_s is not None:
            continue
        if kill.service_id in rows:
            kill.held = rows[kill.service_id].running
        else:
            kill.detected_s = now - kill.at
            kill.unserved_s = fleet.unserved(kill.at, now)


def _read_ids(workdir: Path) -> list[tuple[int, int]]:
    pairs = []
    for path in sorted(workdir.glob("ids-*.txt")):
        for line in path.read_text().splitlines():
            task_id, key = line.split()
            pairs.append((int(task_id), int(key)))
    return pairs


def _records(tq: Any) -> dict[int, Any]:
    return {task_id: tq.handle(task_id).record() for task_id in tq.ids(queue=QUEUE)}


def _read_log(path: str) -> tuple[dict[int, list[tuple[int, float]]],
                                  dict[int, list[tuple[int, float, float]]]]:
    starts: dict[int, list[tuple[int, float]]] = {}
    dones: dict[int, list[tuple[int, float, float]]] = {}
    with contextlib.suppress(FileNotFoundError), open(path) as log:
        for line in log:
            kind, key, pid, *times = line.split()
            if kind == "start":
                starts.setdefault(int(key), []).append((int(pid), float(times[0])))
            else:
                dones.setdefault(int(key), []).append((int(pid), float(times[0]),
                                                       float(times[1])))
    return starts, dones


# ---- the checks: each returns its findings, empty when the promise held ---------------------

def check_enqueues(facts: Facts) -> list[str]:
    """No enqueue lost: the enqueuers got back one distinct id per key, and the store holds
    exactly those tasks."""
    problems = []
    ids = [task_id for task_id, _ in facts.enqueued]
    keys = sorted(key for _, key in facts.enqueued)
    if facts.enqueuer_codes != [0, 0]:
        problems.append(f"enqueuers exited with {facts.enqueuer_codes}")
    if keys != list(range(facts.plan.tasks)):
        problems.append(f"the enqueuers got ids back for {len(keys)} keys, "
                        f"{len(set(keys))} distinct, of {facts.plan.tasks}")
    if len(set(ids)) != len(ids):
        problems.append(f"{len(ids) - len(set(ids))} ids were given back twice")
    missing = sorted(set(ids) - set(facts.records))
    extra = sorted(set(facts.records) - set(ids))
    if missing:
        problems.append(f"{len(missing)} enqueued ids are not in the store: {missing[:10]}")
    if extra:
        problems.append(f"{len(extra)} tasks in the store no enqueuer got back: {extra[:10]}")
    return problems


def check_results(facts: Facts) -> list[str]:
    """Every task succeeded once, with the right value for its key."""
    problems = []
    for task_id, key in facts.enqueued:
        record = facts.records.get(task_id)
        if record is None:
            continue  # check_enqueues reports it
        if str(record.status) != "succeeded":
            runs = len(facts.starts.get(key, []))
            problems.append(f"task {task_id} (key {key}) ended {record.status} after "
                            f"{record.attempts} claims, {record.lost} losses and {runs} runs "
                            f"started: {record.error}")
            continue
        result = pickle.loads(record.result)
        if result["key"] != key or result["value"] != expected_value(key):
            problems.append(f"task {task_id} (key {key}) has the result {result}")
    return problems


def check_no_run_after_finish(facts: Facts) -> list[str]:
    """The kept result is the outcome of a run that ended (it is in the log), the last run of
    its task to start, and no run started after the result was committed."""
    problems = []
    for task_id, key in facts.enqueued:
        record = facts.records.get(task_id)
        if record is None or str(record.status) != "succeeded":
            continue
        kept = pickle.loads(record.result)
        ran = (kept["pid"], kept["start"])
        if ran not in [(pid, start) for pid, start, _ in facts.dones.get(key, [])]:
            problems.append(f"task {task_id}: the kept run {ran} is not in the log")
        later = [s for s in facts.starts.get(key, []) if s[1] > kept["start"]]
        if later:
            problems.append(f"task {task_id} ran again after the run whose result was kept "
                            f"(started {kept['start']}, finished_at {record.finished_at}): "
                            f"{later}")
        if record.pid != kept["pid"]:
            problems.append(f"task {task_id}: record pid {record.pid}, result's {kept['pid']}")
    return problems


def check_reruns(facts: Facts) -> list[str]:
    """Each run of a task was a claim of it; the claims after the first are exactly the
    tasks the killed services held (each put back once per kill); the losses counted
    against tasks (those a service had held across a heartbeat) are among them."""
    problems = []
    for task_id, key in facts.enqueued:
        record = facts.records.get(task_id)
        if record is None:
            continue
        runs = len(facts.starts.get(key, []))
        if runs > record.attempts:
            problems.append(f"task {task_id} ran {runs} times in {record.attempts} claims")
        if record.lost > record.attempts - 1 + (str(record.status) != "succeeded"):
            problems.append(f"task {task_id}: {record.attempts} claims, {record.lost} losses")
    if any(k.service_id is not None and k.held is None for k in facts.kills):
        problems.append("a killed service's row was gone before its tasks could be counted")
        return problems
    reruns, held = reruns_of(facts), held_by_killed(facts)
    lost = sum(r.lost for r in facts.records.values())
    if reruns != held:
        problems.append(f"{reruns} re-runs, the killed services held {held} tasks")
    if lost > held:
        problems.append(f"{lost} losses counted, the killed services held {held} tasks")
    return problems


def reruns_of(facts: Facts) -> int:
    return sum(r.attempts - 1 for r in facts.records.values())


def held_by_killed(facts: Facts) -> int:
    return sum(k.held or 0 for k in facts.kills)


def check_services(facts: Facts, detect_within_s: float) -> list[str]:
    """Every kill of a registered service was detected, within detect_within_s of a live
    service being there to find it; no service died on its own, each stopped cleanly, and no
    process outlived its service."""
    problems = []
    for kill in facts.kills:
        late = kill.detected_s is None or kill.detected_s - (kill.unserved_s or 0.0) > (
            detect_within_s)
        if kill.service_id is not None and late:
            problems.append(f"the kill of service {kill.service_id} (pid {kill.pid}) was "
                            f"detected after {kill.detected_s} s, {kill.unserved_s} s of "
                            f"them with no live service")
    if facts.unexpected_exits:
        problems.append(f"services exited unasked: {facts.unexpected_exits}")
    if any(code != 0 for _, code in facts.stop_codes):
        problems.append(f"services asked to stop exited with {facts.stop_codes}")
    if facts.left_registered:
        problems.append(f"stopped services are still registered: {facts.left_registered}")
    if facts.leftovers:
        problems.append(f"processes outlived their service: {facts.leftovers}")
    if facts.strays:
        problems.append(f"processes naming the store are alive after the run: {facts.strays}")
    return problems


def all_problems(facts: Facts, detect_within_s: float) -> list[str]:
    return (check_enqueues(facts) + check_results(facts) + check_no_run_after_finish(facts)
            + check_reruns(facts) + check_services(facts, detect_within_s))


def figures(facts: Facts) -> dict[str, Any]:
    detected = [k.detected_s for k in facts.kills if k.detected_s is not None]
    return {"seed": facts.plan.seed, "tasks": len(facts.records), "kills": len(facts.kills),
            "kills_before_registering": sum(1 for k in facts.kills if k.service_id is None),
            "tasks_held_by_killed": held_by_killed(facts),
            "reruns": reruns_of(facts),
            "tasks_by_losses": dict(sorted(collections.Counter(
                r.lost for r in facts.records.values()).items())),
            "completed_runs_beyond_one": sum(len(v) for v in facts.dones.values())
            - len(facts.dones),
            "services_started": facts.services_started,
            "max_service_start_s": round(max(facts.service_start_s, default=0.0), 3),
            "max_detection_s": round(max(detected), 3) if detected else None,
            "mean_detection_s": round(sum(detected) / len(detected), 3) if detected else None,
            "max_detection_once_served_s": max(
                (round(k.detected_s - (k.unserved_s or 0.0), 3) for k in facts.kills
                 if k.detected_s is not None), default=None),
            "max_workers_gone_s": max((round(k.workers_gone_s, 3) for k in facts.kills
                                       if k.workers_gone_s is not None), default=None),
            "wall_s": round(facts.wall_s, 2)}


# ---- the command ------------------------------------------------------------------------------

@contextlib.contextmanager
def store_target(kind: str, workdir: Path) -> Iterator[str]:
    """'sqlite' (a file in workdir), 'postgres' (a private pgserver), or a path/URL as is."""
    if kind == "sqlite":
        yield str(workdir / "soak.db")
    elif kind == "postgres":
        import pgserver  # type: ignore[import-not-found]
        server = pgserver.get_server(str(workdir / "pg"), cleanup_mode="stop")
        try:
            yield server.get_uri()
        finally:
            server.cleanup()
    else:
        yield kind


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default="sqlite",
                        help="sqlite | postgres (a private pgserver) | a path or URL")
    defaults = Plan()
    for name in ("tasks", "kills", "task_s", "jobs", "batches", "seed"):
        value = getattr(defaults, name)
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    plan = dataclasses.replace(defaults, tasks=args.tasks, kills=args.kills,
                               task_s=args.task_s, jobs=args.jobs, batches=args.batches,
                               seed=args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="queue-soak-"))
    with store_target(args.store, workdir) as store:
        facts = run(store, plan, workdir)
    from procqueue.store.sql import LEASE_S
    problems = all_problems(facts, detect_within_s=LEASE_S + 2.0)
    for name, value in figures(facts).items():
        print(f"{name:28} {value}")
    for problem in problems:
        print("PROBLEM:", problem)
    print("workdir:", workdir if args.keep else "(removed)")
    if not args.keep:
        import shutil
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if problems else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_enqueue":
        s, first, count, batches, log, seconds, ids, seed = sys.argv[2:]
        enqueue_part(s, int(first), int(count), int(batches), log, float(seconds), ids,
                     int(seed))
    else:
        sys.exit(main())
