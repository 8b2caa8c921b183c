"""How worker processes are started: the start method, and what the fork server preloads.

forkserver: the supervisor is a thread, and forking a process that has threads can copy a lock
some other thread holds (then the child deadlocks on it).  The fork server is a clean,
single-threaded process, so workers (and their replacements after a crash) start safely and
fast.  spawn is the fallback where forkserver does not exist.  Kept light to import: the
`procqueue` command starts the fork server from here before it imports anything else.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import signal
import sys
import threading
import time
from typing import Any

DEFAULT_START_METHOD = "forkserver" if sys.platform.startswith("linux") else "spawn"
# Where a pool that names no start method falls back to fork: Linux, where it is
# multiprocessing's own default (see default_start_method).
FALLBACK_START_METHOD = "fork" if DEFAULT_START_METHOD == "forkserver" else None

# What each worker imports as it starts, imported once in its fork server instead: ctypes for
# prctl(PR_SET_PDEATHSIG) (worker._die_with_parent), pkgutil for runpy, which imports the
# program's main module again in the worker.
WORKER_START_MODULES = ("ctypes", "pkgutil")
# psutil: each worker pins itself with it at start where os.sched_setaffinity is missing.
FORK_SERVER_PRELOAD = ("procqueue.worker", "cloudpickle", "psutil") + WORKER_START_MODULES
FORK_SERVER_PRELOAD_CLI = FORK_SERVER_PRELOAD + ("procqueue.cli.loader",)
FORK_SERVER_PRELOAD_FULL = FORK_SERVER_PRELOAD + ("procqueue.pool",)
STOP_WAIT_S = 2.0  # at exit, how long to wait for a fork server start_fork_server() started


def default_start_method() -> str:
    """The start method of a pool that names none: the one the program chose with
    multiprocessing.set_start_method(), as for multiprocessing.Pool; else forkserver on Linux,
    unless its workers
    could not import the program's main module the way forkserver has them do; then fork, as
    multiprocessing uses on Linux, so that code written for multiprocessing.Pool keeps working.

    forkserver (and spawn) import the main module again in each worker, as __mp_main__ so that
    its `if __name__ == "__main__":` block does not run, for the functions and classes it
    defines.  A main module with no file (`python -c`, a script piped in, the REPL, Jupyter)
    cannot be imported: its classes would not exist in a worker, nor the globals an
    initializer sets for the tasks.  A script that makes its pool outside that guard would
    make a pool again in every worker."""
    chosen = program_start_method()
    if chosen is not None:
        return chosen
    if FALLBACK_START_METHOD is not None and not _workers_can_import_main():
        return FALLBACK_START_METHOD
    return DEFAULT_START_METHOD


# ---- the start method the program chose ------------------------------------------------------
#
# multiprocessing's default context is fixed to its platform default not only by
# set_start_method() but implicitly, by the first Process, Queue or Pool made from it, and by
# the preparation of every spawn or forkserver child (procqueue's own workers included).  Only
# the first is the program's choice, and a fixed "fork" looks the same either way; so the
# default context's get_context() is wrapped (delegating unchanged) to remember the context
# set_start_method() chose.  The wrapper is on the class: it sees calls through names bound
# before procqueue was imported (`from multiprocessing import set_start_method`) too.  It is
# installed when procqueue is imported (procqueue/__init__.py); a start method fixed before
# then counts as chosen.

_chosen_context: list[Any] = [None]  # the context the program's set_start_method() picked


def program_start_method() -> str | None:
    """The start method the program set with multiprocessing.set_start_method(), or None."""
    default: Any = multiprocessing.context._default_context
    actual = default._actual_context
    if actual is None:
        return None
    if actual is _chosen_context[0] or actual is not default._default_context:
        return str(actual._name)  # only set_start_method() picks other than the default
    return None


def _record_chosen_context() -> None:
    cls = multiprocessing.context.DefaultContext
    original = cls.get_context
    if getattr(original, "_procqueue_records", False):
        return

    def get_context(self: Any, method: str | None = None) -> Any:
        fixing_implicitly = method is None and self._actual_context is None
        context = original(self, method)
        if self is multiprocessing.context._default_context:
            caller = sys._getframe(1)
            if fixing_implicitly:
                _chosen_context[0] = None
            elif (method is not None and caller.f_code is cls.set_start_method.__code__
                  and caller.f_back is not None
                  and caller.f_back.f_globals.get("__name__") != "multiprocessing.spawn"):
                _chosen_context[0] = context  # a child's preparation copies its parent's
        return context

    # Set before procqueue was imported: most likely by set_start_method() in the program.
    _chosen_context[0] = getattr(multiprocessing.context._default_context, "_actual_context",
                                 None)
    get_context._procqueue_records = True  # type: ignore[attr-defined]
    get_context.__doc__ = original.__doc__
    cls.get_context = get_context  # type: ignore[method-assign]


_record_chosen_context()


_main_not_importable = False  # once found, for good: also in the fork workers, whose own
#                               pools' workers would import the same main module


def _workers_can_import_main() -> bool:
    global _main_not_importable
    if not _main_not_importable:
        main = sys.modules.get("__main__")
        if main is None:
            return True
        path = getattr(main, "__file__", None)
        _main_not_importable = (not isinstance(path, str) or not os.path.isfile(path)
                                or _main_running_outside_its_guard(main, path))
    return not _main_not_importable


def _main_running_outside_its_guard(main: Any, path: str) -> bool:
    """Whether the main thread is in the main module's top-level code, at a line outside
    every `if __name__ == "__main__":` block (the line that, in the end, is making the pool)."""
    import threading

    main_thread = threading.main_thread().ident
    frame = sys._current_frames().get(main_thread) if main_thread is not None else None
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_globals is vars(main):
            guards = _main_guard_lines(path)
            return guards is not None and not any(first <= frame.f_lineno <= last
                                                   for first, last in guards)
        frame = frame.f_back
    return False  # the module's top level has run: importing it again makes no pool


_GUARDS: dict[str, list[tuple[int, int]] | None] = {}


def _main_guard_lines(path: str) -> list[tuple[int, int]] | None:
    """The (first, last) lines of each `if __name__ == "__main__":` block of the script, or
    None when its source cannot be read (then it is taken to be guarded, as before)."""
    if path not in _GUARDS:
        import ast

        try:
            with open(path, "rb") as source:
                tree = ast.parse(source.read(), path)
        except (OSError, SyntaxError, ValueError):
            _GUARDS[path] = None
        else:
            _GUARDS[path] = [(node.lineno, node.end_lineno or node.lineno)
                             for node in ast.walk(tree)
                             if isinstance(node, ast.If) and _tests_main_name(node.test)]
    return _GUARDS[path]


def _tests_main_name(test: Any) -> bool:
    """`__name__ == "__main__"`, either way round."""
    import ast

    if not (isinstance(test, ast.Compare) and len(test.ops) == 1
            and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = [test.left, test.comparators[0]]
    names = [s for s in sides if isinstance(s, ast.Name) and s.id == "__name__"]
    mains = [s for s in sides if isinstance(s, ast.Constant) and s.value == "__main__"]
    return len(names) == 1 and len(mains) == 1


def preload_worker_in_fork_server(context: Any) -> None:
    """Have the fork server import procqueue once, so each worker it forks starts with it
    loaded (~5 ms) instead of importing it (~100 ms).  Only before the fork server starts,
    and keeping whatever the program preloads itself.  (Python's own '__main__' preload
    never takes effect in 3.11: it looks for a 'main_path' the preparation data lacks.)"""
    from multiprocessing import forkserver

    server = forkserver._forkserver
    if getattr(server, "_forkserver_pid", None) is not None:
        return  # already running: too late, and harmless
    if _shadowed_in_working_directory():
        return
    preload = list(getattr(server, "_preload_modules", ["__main__"]))
    # A program using the API re-imports procqueue.pool in every worker (its script says
    # `from procqueue import Pool`): preloaded, a worker (or a replacement after a crash)
    # starts in ~5 ms instead of ~80 ms.  The `procqueue` command's workers never import it,
    # and there the ~150 ms the preload puts before the first worker would be pure cost;
    # they import the command's loader of the user's function instead.
    modules = FORK_SERVER_PRELOAD_CLI if _main_is_the_cli() else FORK_SERVER_PRELOAD_FULL
    wanted = [m for m in modules if m not in preload]
    if wanted:
        context.set_forkserver_preload(preload + wanted)


def start_fork_server() -> None:
    """Start the process the pool's workers are forked from now, not at the first Pool():
    its start (an interpreter and its imports, ~80 ms) then overlaps what the program does
    before it makes a pool (the `procqueue` command: importing click and the pool).  At exit
    it is stopped and waited for, so it cannot outlive the program even if no pool used it.
    Does nothing where workers are spawned (no fork server) or if it already runs."""
    if DEFAULT_START_METHOD != "forkserver":
        return
    from multiprocessing import forkserver

    preload_worker_in_fork_server(multiprocessing.get_context("forkserver"))
    server = forkserver._forkserver
    started = getattr(server, "_forkserver_pid", None) is None
    forkserver.ensure_running()
    if started:
        atexit.register(_stop_fork_server, server)


def _stop_fork_server(server: Any) -> None:
    """Close this process's end of the server's "alive" pipe, then kill it and wait for it a
    bounded time.  At exit it has nothing left to do: left to exit by itself when it sees
    the pipe close, its interpreter's shutdown would keep us ~20 ms, and a child forked from
    this program that still holds the pipe open would keep it alive."""
    pid = getattr(server, "_forkserver_pid", None)
    alive_fd = getattr(server, "_forkserver_alive_fd", None)
    if pid is None or alive_fd is None:
        return
    server._forkserver_pid = server._forkserver_alive_fd = None
    os.close(alive_fd)
    kill_and_reap(pid)


def kill_and_reap(pid: int) -> None:
    """SIGKILL a fork server (our child) and wait for it, at most STOP_WAIT_S."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + STOP_WAIT_S
    pause = 0.0002  # a killed process is gone in well under a millisecond: look again soon
    try:
        while not os.waitpid(pid, os.WNOHANG)[0] and time.monotonic() < deadline:
            time.sleep(pause)
            pause = min(2 * pause, 0.005)
    except ChildProcessError:
        pass  # reaped already


def _forget_the_parents_fork_server() -> None:
    """In a process forked from one whose fork server runs (os.fork, a fork
    multiprocessing.Process): that server is not this process's child, so multiprocessing's
    ensure_running() would fail on it (waitpid: ChildProcessError) and break every pool made
    here.  The child starts a fork server of its own when it needs one, and closes its copy of
    the parent's "alive" descriptor, which would otherwise keep the parent's server up."""
    # No import here: another thread of the parent may have held the import lock at fork.
    forkserver = sys.modules.get("multiprocessing.forkserver")
    server: Any = getattr(forkserver, "_forkserver", None)
    if getattr(server, "_forkserver_pid", None) is None:
        return
    alive_fd = server._forkserver_alive_fd
    server._forkserver_pid = server._forkserver_alive_fd = None
    server._forkserver_address = None  # the parent's socket, unlinked by the parent only
    server._lock = threading.Lock()  # another thread of the parent may have held it
    if alive_fd is not None:
        try:
            os.close(alive_fd)
        except OSError:
            pass


os.register_at_fork(after_in_child=_forget_the_parents_fork_server)


def _main_is_the_cli() -> bool:
    program = sys.argv[0] if sys.argv else ""
    return os.path.basename(program) == "procqueue"


def _shadowed_in_working_directory() -> bool:
    """Python 3.11's fork server imports its preload modules before applying our sys.path,
    with the working directory first: a different procqueue package there (a source checkout
    while procqueue is installed) would be imported instead of ours.  Then skip the preload:
    workers start slower, but with the right code."""
    local = os.path.join(os.getcwd(), "procqueue", "__init__.py")
    ours = os.path.join(os.path.dirname(os.path.abspath(__file__)), "__init__.py")
    return os.path.isfile(local) and os.path.realpath(local) != os.path.realpath(ours)


def null_over(fd: int) -> None:
    """Point `fd` at /dev/null: the pipe end it held is let go, its number stays taken (a
    closed one is taken then, inheritable)."""
    try:
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return
    try:
        try:
            inheritable = os.get_inheritable(fd)
        except OSError:  # closed
            inheritable = True
        os.dup2(null, fd, inheritable=inheritable)
    except OSError:
        pass
    finally:
        os.close(null)
