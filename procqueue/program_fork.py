"""A pool's own fork server, forked from the program itself when that is safe.

The default start method is forkserver (fork_server.py): workers are forked from a clean,
single-threaded server, never from the program, whose supervisor thread (and any thread of
its own) may hold a lock at the moment of a fork.  Starting multiprocessing's server costs a
fresh interpreter and its imports (~150-250 ms), which a short script, a test that makes many
pools and the `procqueue` command pay on every run.

When a pool is created in a program that has exactly one thread (checked in /proc, so threads
started by C libraries count too), no lock can be held by anyone else: forking the program at
that moment is as safe as a fresh interpreter, and takes a few milliseconds.  That fork
becomes this pool's fork server, made before the pool's supervisor thread starts and stopped
after its last worker is reaped.  The pool's workers (and their replacements after a crash)
are forked from it, through multiprocessing's own forkserver protocol and server loop, so a
worker starts exactly as under forkserver: the program's main module is imported again in
it (the server forgets its copy), the program's signal handlers are not inherited, numpy's
global random state is drawn afresh in each worker, and the server keeps none of the
program's pipes or sockets (a child's EOF, a peer's hang-up, the pool's own "the supervisor
died" pipe all keep working).  What a worker does see is the state of other modules as the
program had it when the pool was made, as under multiprocessing's fork start method.

Where it is not safe (threads exist: another pool is running, numpy's BLAS threads, a web
server), not worth it (a program so big that each worker's copy-on-write view of it would
blur the memory figures the pool recycles workers on), not needed (multiprocessing's shared
server already runs: procqueue.start_fork_server(), an earlier pool) or switched off
(PROCQUEUE_FORK_PROGRAM=0), the pool uses multiprocessing's shared fork server, as before.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import stat
import sys
import threading
import time
import types
from multiprocessing import forkserver, popen_forkserver, reduction, spawn
from multiprocessing.context import ForkServerContext, ForkServerProcess, set_spawning_popen
from typing import Any

from .fork_server import WORKER_START_MODULES, kill_and_reap, null_over

# multiprocessing's internals this module drives, untyped in typeshed
from multiprocessing import connection as _connection, util as _util  # noqa: I001
connection: Any = _connection
util: Any = _util
_ForkServer: Any = forkserver.ForkServer
_ForkServerPopen: Any = popen_forkserver.Popen

# Above this resident size the program is not forked: a worker forked from a fork of it would
# report (and be recycled on) the program's memory as its own.  A worker of a small script
# is ~20 MiB resident either way; a script with a few libraries loaded stays well under this.
MAX_PROGRAM_RSS_BYTES = 256 * 2**20

# Programs that must never have their pool's server forked from them set this to "0".
ENV_SWITCH = "PROCQUEUE_FORK_PROGRAM"

# How long a pool being made waits for procqueue's own threads that have ended to be gone from
# the kernel's list (they go within a millisecond or so; a loaded machine may take longer).
THREAD_EXIT_WAIT_S = 0.2

_ENDING_THREADS: set[int] = set()  # native ids of procqueue threads past their last line
_SERVERS: dict[int, "ProgramForkServer"] = {}  # id -> server, looked up by _launch
_KEPT_MAINS: list[types.ModuleType] = []  # in a server: the program's main module, kept alive


def note_thread_ending() -> None:
    """The last call of a procqueue thread (a pool's supervisor, a feeder).  Thread.join()
    returns before the OS thread is gone, so a pool made right after another one's join()
    would still see it in /proc: program_has_one_thread() waits a moment for these only."""
    _ENDING_THREADS.add(threading.get_native_id())


def program_has_one_thread() -> bool:
    """Whether this process has exactly one OS thread now (Python's and C libraries')."""
    deadline = time.monotonic() + THREAD_EXIT_WAIT_S
    while True:
        try:
            tasks = {int(name) for name in os.listdir("/proc/self/task")}
        except (OSError, ValueError):
            return False
        others = tasks - {threading.get_native_id()}
        _ENDING_THREADS.intersection_update(others)  # forget those gone (their ids recycle)
        if not others:
            return True
        if not others <= _ENDING_THREADS or time.monotonic() > deadline:
            return False
        time.sleep(0.0005)


def program_rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return sys.maxsize


def why_not_fork_program() -> str | None:
    """None if the program may be forked into a fork server now, else why not."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return f"{ENV_SWITCH}=0"
    if not sys.platform.startswith("linux"):
        return "not Linux"
    if not program_has_one_thread():
        return "the program has other threads"
    if program_rss_bytes() > MAX_PROGRAM_RSS_BYTES:
        return "the program is too big"
    return None


class ProgramForkServer(_ForkServer):  # type: ignore[misc]
    """One pool's fork server: multiprocessing's server loop, in a fork of the program."""

    _forkserver_pid: int | None
    _forkserver_alive_fd: int | None

    @property
    def running(self) -> bool:
        return self._forkserver_pid is not None

    def serves(self) -> bool:
        """Running and alive.  A server that died (the OOM killer, a stray kill) is stopped
        here, so the pool's next workers come from multiprocessing's shared server."""
        pid = self._forkserver_pid
        if pid is None:
            return False
        try:
            exited = os.waitpid(pid, os.WNOHANG)[0] != 0
        except ChildProcessError:
            exited = True
        if exited:
            self._forget()  # reaped already: its pid may be someone else's now
        return not exited

    def start(self) -> bool:
        """Fork the server now if that is safe (call before the pool starts any thread);
        False if not, and then the pool uses multiprocessing's shared server."""
        if self.running:
            return True
        if _shared_server_runs() or why_not_fork_program() is not None:
            return False
        _start_resource_tracker_off_stdout()
        listener = socket.socket(socket.AF_UNIX)
        try:
            alive_r, alive_w = os.pipe()
        except OSError:
            listener.close()
            return False
        try:
            address = connection.arbitrary_address("AF_UNIX")
            listener.bind(address)
            if not util.is_abstract_socket_namespace(address):
                os.chmod(address, 0o600)
            listener.listen()
            _flush_std_streams()
            pid = os.fork()
            if pid == 0:
                _serve(listener.fileno(), alive_r)  # never returns
        except OSError:  # no process or descriptor to spare: the shared server may do
            os.close(alive_w)
            return False
        except BaseException:
            os.close(alive_w)
            raise
        finally:
            listener.close()
            os.close(alive_r)
        self._forkserver_address = address
        self._forkserver_alive_fd = alive_w
        self._forkserver_pid = pid
        _SERVERS[id(self)] = self
        return True

    def let_go_after_fork(self) -> None:
        """In a child forked from the program: forget the server (it is the program's, not
        this child's to stop) and point this child's copy of its "alive" pipe at /dev/null."""
        fd = self._forkserver_alive_fd
        self._forkserver_pid = self._forkserver_alive_fd = self._forkserver_address = None
        _SERVERS.pop(id(self), None)
        if fd is not None:
            null_over(fd)

    def ensure_running(self) -> None:
        """The server is made by start() only: once it is gone, _Popen starts the pool's
        workers from multiprocessing's shared server instead.  Only the resource tracker,
        whose descriptor every launch passes on, is started here."""
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()

    def stop(self) -> None:
        """After the pool's last worker is reaped: close the "alive" pipe, kill the server and
        reap it.  Idempotent."""
        pid = self._forget()
        if pid is not None:
            kill_and_reap(pid)

    def _forget(self) -> int | None:
        """Drop this process's hold on the server; returns its pid if it had one."""
        pid, alive_fd = self._forkserver_pid, self._forkserver_alive_fd
        address = self._forkserver_address
        self._forkserver_pid = self._forkserver_alive_fd = self._forkserver_address = None
        _SERVERS.pop(id(self), None)
        if alive_fd is not None:
            os.close(alive_fd)
        if isinstance(address, str) and not util.is_abstract_socket_namespace(address):
            try:
                os.unlink(address)
            except OSError:
                pass
        return pid


def _start_resource_tracker_off_stdout() -> None:
    """Start multiprocessing's resource tracker (every launch passes its descriptor on) with
    its stdin and stdout on /dev/null.  Started as multiprocessing starts it, it would hold
    the program's stdout open until it exits, after the program: a reader of the program's
    output (`procqueue map ... | jq`, `$(...)`) got its end of file ~12 ms after the
    program had ended (a one-input `procqueue map` piped: 119 ms against 107 to /dev/null).
    It keeps stderr, where it warns of resources it cleaned up.  Called while the program has
    one thread, so nothing else writes to stdout while it points at /dev/null."""
    from multiprocessing import resource_tracker

    if getattr(resource_tracker._resource_tracker, "_fd", None) is not None:
        return  # running already (or inherited): nothing to start
    _flush_std_streams()
    saved: dict[int, int] = {}
    null = os.open(os.devnull, os.O_RDWR)
    try:
        for fd in (0, 1):
            try:
                saved[fd] = os.dup(fd)
            except OSError:  # closed in this program: the tracker gets none either way
                continue
            os.dup2(null, fd)
        _spawn_resource_tracker()
    finally:
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        os.close(null)


# The tracker's command, as multiprocessing runs it (resource_tracker.ensure_running), but
# deaf to a hang-up of the program's process group (a closed terminal): the program may go on
# after one, and the tracker's death would leave what it tracks behind.
_TRACKER_COMMAND = ("import signal;signal.signal(signal.SIGHUP, signal.SIG_IGN);"
                    "from multiprocessing.resource_tracker import main;main(%d)")


def _spawn_resource_tracker() -> None:
    """resource_tracker.ensure_running(), but the tracker yields the CPU to the pool: it is a
    fresh interpreter (~10 ms of CPU) started just as the pool's first workers start, and
    it has nothing to do until a resource is registered (messages wait in its pipe) or the
    program ends.  So it runs without site (-S: multiprocessing is in the standard library;
    a venv's .pth files cost milliseconds more) and at the lowest priority (nice 19: a
    2-CPU machine's one-input `procqueue map`, 30-50 alternating runs: ~3 ms less).  Where
    multiprocessing's tracker is not laid out as this expects, its own start is used."""
    from multiprocessing import resource_tracker

    tracker: Any = resource_tracker._resource_tracker
    if not all(hasattr(tracker, name) for name in ("_fd", "_pid", "_lock")):
        resource_tracker.ensure_running()
        return
    ignored = {signal.SIGINT, signal.SIGTERM}  # as multiprocessing: main() ignores them
    with tracker._lock:
        if tracker._fd is not None:
            return
        fds = []
        try:
            fds.append(sys.stderr.fileno())
        except (AttributeError, OSError, ValueError):
            pass
        r, w = os.pipe()
        exe = spawn.get_executable()
        args = [exe, *util._args_from_interpreter_flags(), "-S", "-c", _TRACKER_COMMAND % r]
        signal.pthread_sigmask(signal.SIG_BLOCK, ignored)
        try:
            pid = util.spawnv_passfds(exe, args, [*fds, r])
        except BaseException:
            os.close(w)
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, ignored)
            os.close(r)
        tracker._fd, tracker._pid = w, pid
    try:
        os.setpriority(os.PRIO_PROCESS, pid, 19)
    except OSError:  # gone already, or not ours to renice: it runs as multiprocessing's would
        pass


def _flush_std_streams() -> None:
    """What the program printed but has not flushed would be in the fork's buffers too, and
    could come out once more from the server or a worker."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass


def _shared_server_runs() -> bool:
    """multiprocessing's server already runs (start_fork_server(), an earlier pool that could
    not fork the program): it costs nothing more, so the pool uses it."""
    return getattr(forkserver._forkserver, "_forkserver_pid", None) is not None


# ---- in the forked server --------------------------------------------------------------------

def _serve(listener_fd: int, alive_r: int) -> None:
    """The child side of start(): become a clean fork server, then run multiprocessing's."""
    code = 0
    try:
        _drop_pipes_and_sockets(keep={0, 1, 2, listener_fd, alive_r})
        _reset_signal_handlers()
        _outlive_a_hang_up()
        _forget_main_module()
        os.register_at_fork(after_in_child=_fresh_random_state)
        _import_what_workers_import_at_start()
        forkserver.main(listener_fd, alive_r, [])
    except SystemExit:
        pass  # the "alive" pipe closed: the program is gone, or its pool has stopped
    except BaseException:
        code = 1
    finally:
        _kill_workers_left()
        os._exit(code)  # nothing of the program's (atexit, finalizers) runs here


def _kill_workers_left() -> None:
    """Before the server goes: every worker it forked that is still there (the program died
    under it) is killed with its process group, a task's own subprocesses included.  The
    workers' parent-death signal would kill each worker alone, and possibly before the
    worker's watchdog thread had killed its group."""
    try:
        with open(f"/proc/self/task/{os.getpid()}/children") as children:
            pids = [int(pid) for pid in children.read().split()]
    except (OSError, ValueError):
        return  # no such file (an old kernel): the parent-death signal alone, as before
    for pid in pids:
        for kill in (os.killpg, os.kill):  # a worker leads its group once it has started
            try:
                kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _import_what_workers_import_at_start() -> None:
    """Once here, while the program goes on making its pool, rather than in every worker."""
    for module in WORKER_START_MODULES:
        try:
            __import__(module)
        except ImportError:  # ctypes may be missing from a minimal Python; workers do without
            pass


def _drop_pipes_and_sockets(keep: set[int]) -> None:
    """Point every inherited pipe and socket at /dev/null, so this server (and the workers
    forked from it) holds no end of the program's: a child process it feeds sees EOF, a peer
    sees a hang-up, and the pool's death pipe tells its workers when the program dies.
    dup2, not close: the descriptor numbers stay taken, so a Python object still holding one
    can never close a descriptor opened later under the same number.  Regular files and
    terminals stay open (a logging handler's file keeps working, as after a fork)."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd in keep:
            continue
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            continue  # listdir's own descriptor, closed by now
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or not (
                stat.S_ISREG(mode) or stat.S_ISCHR(mode) or stat.S_ISDIR(mode)):
            null_over(fd)


def _reset_signal_handlers() -> None:
    """As in the fresh interpreter multiprocessing would start: the program's own Python
    handlers are not the workers' (SIGINT raises KeyboardInterrupt again, SIGPIPE and SIGXFSZ
    are ignored as at any interpreter's start).  An ignored signal stays ignored, as it would
    across an exec (`nohup`)."""
    signal.set_wakeup_fd(-1)
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            current = signal.getsignal(sig)
            if sig in (signal.SIGPIPE, signal.SIGXFSZ):
                wanted: Any = signal.SIG_IGN
            elif callable(current) and current is not signal.default_int_handler:
                wanted = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
            else:
                continue
            if current != wanted:
                signal.signal(sig, wanted)
        except (OSError, ValueError):
            pass


def _outlive_a_hang_up() -> None:
    """A hang-up sent to the program's process group (its terminal or ssh session closed)
    must not end this server: its workers would die with it (their parent-death signal)
    while the program may go on waiting for their results (`procqueue map` lets running
    tasks finish on SIGHUP).  The server still goes when the program does (its "alive"
    pipe).  A worker forked from it gets the program's own SIGHUP disposition back."""
    programs = signal.getsignal(signal.SIGHUP)
    if programs == signal.SIG_IGN:
        return  # ignored by the program already (nohup): the workers keep it ignored too
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    os.register_at_fork(after_in_child=lambda: signal.signal(signal.SIGHUP, programs))


def _fresh_random_state() -> None:
    """In each worker, right after its fork (before it imports the script again): numpy's
    global random state, copied from the program, is drawn afresh, as a worker that imported
    numpy itself would have it; otherwise every worker would draw the same numbers.  (Python's
    random module reseeds itself at fork; a seed the script sets at import still applies.)"""
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:
        try:
            numpy_random.seed()
        except Exception:  # noqa: BLE001 - a broken numpy is the script's to find, not ours
            pass


def _forget_main_module() -> None:
    """Each worker imports the program's main module again, as under forkserver (functions
    and classes defined there exist; its `if __name__ == "__main__":` block does not run), so
    a pool behaves the same whichever server it got.  The program's copy stays referenced:
    dropping it could run finalizers of objects that belong to the program."""
    main = sys.modules.get("__main__")
    if main is not None:
        _KEPT_MAINS.append(main)
    sys.modules["__main__"] = types.ModuleType("__main__")


# ---- the context a pool uses ----------------------------------------------------------------

class _Popen(_ForkServerPopen):  # type: ignore[misc]
    """Launch through the pool's own server when it runs, else multiprocessing's."""

    def _launch(self, process_obj: Any) -> None:
        server = _SERVERS.get(getattr(process_obj, "_procqueue_server", -1))
        if server is not None and server.serves():
            try:
                self._launch_through(server, process_obj)
                return
            except (OSError, EOFError):
                # It died after serves() looked (killed, and not yet a zombie then): it is
                # going, so stop it and start this worker from the shared server instead.
                self._forget_attempt()
                server.stop()
        super()._launch(process_obj)

    def _launch_through(self, server: ProgramForkServer, process_obj: Any) -> None:
        prepared = io.BytesIO()
        set_spawning_popen(self)
        try:
            reduction.dump(spawn.get_preparation_data(process_obj._name), prepared)
            reduction.dump(process_obj, prepared)
        finally:
            set_spawning_popen(None)
        self.sentinel, data_w = server.connect_to_new_process(self._fds)
        # The child reads its parent's liveness from a copy of this pipe's write end.
        parent_w = os.dup(data_w)
        self.finalizer = util.Finalize(self, util.close_fds, (parent_w, self.sentinel))
        with open(data_w, "wb", closefd=True) as pipe:
            pipe.write(prepared.getbuffer())
        self.pid = forkserver.read_signed(self.sentinel)

    def _forget_attempt(self) -> None:
        if getattr(self, "finalizer", None) is not None:
            self.finalizer()  # closes the sentinel and the copy of the data pipe
        self.finalizer = None
        self.sentinel = None


class _Process(ForkServerProcess):
    _start_method = "forkserver"

    @staticmethod
    def _Popen(process_obj: Any) -> Any:
        return _Popen(process_obj)


class ProgramForkContext(ForkServerContext):
    """The forkserver context of one pool, whose server start() forks from the program
    (see the module docstring); processes go to multiprocessing's shared server when it
    could not."""

    _name = "forkserver"

    def __init__(self) -> None:
        super().__init__()
        self.server = ProgramForkServer()

    def start_server(self) -> bool:
        return self.server.start()

    def stop_server(self) -> None:
        self.server.stop()

    def Process(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]  # noqa: N802
        """multiprocessing's Process class here is a factory: each process notes its pool's
        server (by a number that pickles, as the process object goes to the worker)."""
        process: Any = _Process(*args, **kwargs)
        process._procqueue_server = id(self.server)
        return process
