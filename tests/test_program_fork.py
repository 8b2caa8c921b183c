"""A pool made in a one-thread program forks its own fork server from the program
(procqueue/program_fork.py); with other threads it uses multiprocessing's shared one.  Either
way a worker must start as under forkserver, and nothing may outlive the pool or the program.

The test process itself has pytest-timeout's thread, so these run small programs of their own.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from process_checks import wait_gone

PRELUDE = textwrap.dedent("""\
    import json, os, signal, subprocess, sys, threading, time
    import psutil
    import procqueue

    VALUE = "module"

    def parent_cmdline(_):
        return psutil.Process(os.getppid()).cmdline()

    def seen(_):
        return [VALUE, "GUARD_ONLY" in globals(),
                signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL,
                signal.getsignal(signal.SIGHUP) == signal.SIG_IGN]

    def shout(x):
        sys.stdout.write(f"task {x}\\n")  # one write: lines of two workers do not mix
        sys.stdout.flush()

    def crash(x):
        if x == 1:
            os._exit(3)
        return x

    def our_children():
        # multiprocessing's resource tracker lives until the program exits, as ever
        return [p.pid for p in psutil.Process().children(recursive=True)
                if p.status() != psutil.STATUS_ZOMBIE
                and "resource_tracker" not in " ".join(p.cmdline())]

    def hold_threads():
        # A second thread, as a web server or a library's would be
        threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
    """)


def run_script(tmp_path, source: str, env: dict | None = None) -> str:
    """Run PRELUDE + source as a program of its own; its stdout (it must exit 0)."""
    script = tmp_path / "program.py"
    script.write_text(PRELUDE + textwrap.dedent(source))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr
    return run.stdout


def run_program(tmp_path, body: str, *, threaded: bool) -> dict:
    """Run `body` under the program's main guard; the JSON object it printed last."""
    setup = "    hold_threads()\n" if threaded else ""
    stdout = run_script(tmp_path, 'if __name__ == "__main__":\n' + setup
                        + textwrap.indent(textwrap.dedent(body), "    "))
    return json.loads(stdout.splitlines()[-1])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("threaded", [False, True], ids=["one-thread", "threads"])
def test_workers_come_from_a_fork_of_the_program_only_when_it_has_one_thread(tmp_path, threaded):
    out = run_program(tmp_path, """
        with procqueue.Pool(2) as pool:
            parents = pool.map(parent_cmdline, range(4))
        pool.join()
        print(json.dumps({"me": psutil.Process().cmdline(), "parents": parents,
                          "left": our_children()}))
        """, threaded=threaded)
    if threaded:
        assert all("multiprocessing.forkserver" in " ".join(p) for p in out["parents"])
    else:
        assert out["parents"] == [out["me"]] * 4
    # The pool's own server is stopped with it (multiprocessing's shared one lives on, as
    # ever, until the program exits)
    assert threaded or out["left"] == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("ending", ["with", "close-join"])
def test_a_pool_that_fed_a_generator_leaves_no_thread_behind(tmp_path, ending):
    # imap over an iterator is watched by a thread of the pool (input_feed.FeedWatch): it
    # must end with the pool, or the next pool of a one-thread program is not forked from it
    # (and a thread would outlive the pool).
    end = ("pool.terminate()" if ending == "with" else "pool.close()\n        pool.join()")
    out = run_program(tmp_path, f"""
        pool = procqueue.Pool(2)
        list(pool.imap(seen, (x for x in range(3))))
        list(pool.imap_unordered(seen, iter(range(3))))
        {end}
        threads = threading.active_count()
        with procqueue.Pool(2) as pool:
            parents = pool.map(parent_cmdline, range(4))
        print(json.dumps({{"me": psutil.Process().cmdline(), "parents": parents,
                          "threads": threads}}))
        """, threaded=False)
    assert out["threads"] == 1
    assert out["parents"] == [out["me"]] * 4


@pytest.mark.timeout(60)
@pytest.mark.parametrize("threaded", [False, True], ids=["one-thread", "threads"])
def test_a_worker_starts_as_under_forkserver_whichever_server_forked_it(tmp_path, threaded):
    # The main module is imported again in the worker (its guarded block does not run), the
    # program's own signal handlers are not the worker's, and a signal it ignores stays
    # ignored (as across the exec of a fresh interpreter: nohup).
    out = run_program(tmp_path, """
        VALUE = "guard"
        GUARD_ONLY = 1
        signal.signal(signal.SIGUSR1, lambda *a: None)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        with procqueue.Pool(2) as pool:
            print(json.dumps({"seen": pool.map(seen, range(2))}))
        """, threaded=threaded)
    assert out["seen"] == [["module", False, True, True]] * 2


@pytest.mark.timeout(60)
@pytest.mark.parametrize("threaded", [False, True], ids=["one-thread", "threads"])
def test_a_task_reads_end_of_file_from_stdin_and_the_program_keeps_its_own(tmp_path, threaded):
    # A task, or a program it runs without a stdin of its own, must not take the program's
    # input (`seq 20 | procqueue map job.py`, a task running `cat`: lines lost)
    script = tmp_path / "reader.py"
    script.write_text(PRELUDE + textwrap.dedent(f"""\
        def read_stdin(_):
            raw = os.read(0, 100)
            child = subprocess.run(["cat"], capture_output=True, timeout=20).stdout
            return [raw.decode(), child.decode()]

        if __name__ == "__main__":
            if {threaded}:
                hold_threads()
            with procqueue.Pool(2) as pool:
                tasks = pool.map(read_stdin, range(2))
            print(json.dumps({{"tasks": tasks, "program": sys.stdin.read()}}))
        """))
    run = subprocess.run([sys.executable, str(script)], input="line 1\nline 2\n",
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.splitlines()[-1])
    assert out == {"tasks": [["", ""], ["", ""]], "program": "line 1\nline 2\n"}


@pytest.mark.timeout(60)
def test_the_fork_server_holds_no_pipe_of_the_program(tmp_path):
    # A child process the program feeds must see EOF when the program closes its stdin,
    # while the pool (and its server, a fork of the program) still runs.
    out = run_program(tmp_path, """
        cat = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
        with procqueue.Pool(2) as pool:
            pool.map(seen, range(2))
            cat.stdin.close()
            try:
                code = cat.wait(timeout=10)
            except subprocess.TimeoutExpired:
                cat.kill()
                code = "no EOF"
        print(json.dumps({"cat": code}))
        """, threaded=False)
    assert out["cat"] == 0


@pytest.mark.timeout(60)
def test_the_resource_tracker_holds_neither_stdin_nor_stdout_of_the_program(tmp_path):
    # The tracker outlives the program: holding its stdout, it kept a reader of the output
    # (`procqueue map ... | jq`) waiting after the program had ended.  Its stderr it keeps,
    # for its warnings.  The program's own stdout works on, before and after.
    out = run_program(tmp_path, """
        print("before", flush=True)
        from multiprocessing import resource_tracker
        with procqueue.Pool(2) as pool:
            assert pool.map(abs, [-1]) == [1]
        tracker = psutil.Process(resource_tracker._resource_tracker._pid)
        print(json.dumps({fd: os.readlink(f"/proc/{tracker.pid}/fd/{fd}") for fd in (0, 1, 2)}
                         | {"me": os.readlink("/proc/self/fd/1")}))
        """, threaded=False)
    assert out["0"] == out["1"] == os.devnull
    assert out["2"] != os.devnull and out["me"] != os.devnull


@pytest.mark.timeout(60)
def test_the_resource_tracker_removes_what_a_killed_program_s_worker_left(tmp_path):
    # The tracker is started by the pool (at low priority, without site): it must still do
    # its one job.  A worker makes a shared memory segment and keeps it registered; the
    # program is then SIGKILLed, and the tracker, seeing every holder of its pipe gone,
    # unlinks the segment.
    script = tmp_path / "leak.py"
    script.write_text(PRELUDE + textwrap.dedent("""\
        from multiprocessing import shared_memory

        def leak(_):
            segment = shared_memory.SharedMemory(create=True, size=4096)
            segment.close()  # unmapped, not unlinked: still registered with the tracker
            return segment.name

        if __name__ == "__main__":
            with procqueue.Pool(1) as pool:
                name = pool.apply(leak, (0,))
            print(json.dumps({"name": name}), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        """))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    assert run.returncode == -signal.SIGKILL, run.stderr
    segment = "/dev/shm/" + json.loads(run.stdout)["name"].lstrip("/")
    deadline = time.monotonic() + 20
    while os.path.exists(segment) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(segment), "the resource tracker left the segment behind"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("threaded", [False, True], ids=["one-thread", "threads"])
def test_a_process_the_program_forked_does_not_keep_the_workers_up(tmp_path, threaded):
    # The program forks a helper (os.fork) while its pool runs, then is SIGKILLed.  The
    # helper's copies of the pool's pipes must not keep the workers (and the fork server)
    # alive: they go with the program, the helper lives on.
    script = tmp_path / "helper.py"
    script.write_text(PRELUDE + textwrap.dedent("""\
        def hold(_):
            time.sleep(60)

        if __name__ == "__main__":
            if len(sys.argv) > 1:
                hold_threads()
            pool = procqueue.Pool(2)
            for i in range(2):
                pool.apply_async(hold, (i,))
            time.sleep(0.5)  # both workers run a task
            helper = os.fork()
            if helper == 0:
                time.sleep(30)
                os._exit(0)
            # (multiprocessing's resource tracker lives as long as the helper: it is not ours)
            tree = [p.pid for p in psutil.Process().children(recursive=True)
                    if p.pid != helper and "resource_tracker" not in " ".join(p.cmdline())]
            print(json.dumps({"helper": helper, "tree": tree}), flush=True)
            time.sleep(60)
        """))
    proc = subprocess.Popen([sys.executable, str(script), *(["threads"] if threaded else [])],
                            stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    helper = None
    try:
        out = json.loads(proc.stdout.readline())
        helper, tree = out["helper"], out["tree"]
        assert len(tree) >= 3  # two workers and their fork server
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert wait_gone(tree, 5.0) == [], "the pool's processes outlived the program"
        assert psutil.pid_exists(helper)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if helper is not None:
            try:
                os.kill(helper, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.timeout(60)
def test_a_program_with_stdin_and_stdout_closed_still_gets_its_pool(tmp_path):
    # A daemon-like program: the resource tracker's start has no stdin or stdout to point at
    # /dev/null and put back
    script = tmp_path / "closed.py"
    script.write_text(PRELUDE + textwrap.dedent("""\
        if __name__ == "__main__":
            os.close(0)
            os.close(1)
            with procqueue.Pool(2) as pool:
                got = pool.map(abs, [-1, -2, -3])
            sys.stderr.write(json.dumps(got) + "\\n")
        """))
    run = subprocess.run([sys.executable, str(script)], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         timeout=60, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stderr.splitlines()[-1]) == [1, 2, 3]


@pytest.mark.timeout(60)
def test_what_the_program_printed_before_the_pool_comes_out_once(tmp_path):
    # stdout is a pipe here (and buffered: no PYTHONUNBUFFERED), so the line waits in the
    # program's buffer when the server is forked; a worker that prints and flushes must not
    # write it again
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    lines = run_script(tmp_path, """\
        if __name__ == "__main__":
            print("before the pool")
            with procqueue.Pool(2, maxtasksperchild=1) as pool:
                pool.map(shout, range(6))
            print("after the pool")
        """, env).splitlines()
    assert lines.count("before the pool") == 1 and lines[0] == "before the pool"
    assert sorted(lines[1:-1]) == [f"task {i}" for i in range(6)]


@pytest.mark.timeout(60)
def test_a_crashed_worker_is_replaced_from_the_programs_fork(tmp_path):
    out = run_program(tmp_path, """
        with procqueue.Pool(2, retries=0) as pool:
            results = []
            for x in range(3):
                try:
                    results.append(pool.apply(crash, (x,)))
                except procqueue.WorkerCrashedError as exc:
                    results.append(f"crashed {exc.exitcode}")
            parents = pool.map(parent_cmdline, range(4))
        print(json.dumps({"results": results, "me": psutil.Process().cmdline(),
                          "parents": parents}))
        """, threaded=False)
    assert out["results"] == [0, "crashed 3", 2]
    assert out["parents"] == [out["me"]] * 4


@pytest.mark.timeout(60)
def test_a_pool_whose_server_was_killed_goes_on_with_the_shared_server(tmp_path):
    # Killing the server takes its workers with it (they die with their parent); the pool
    # replaces them from multiprocessing's shared server and every task still has a result.
    out = run_program(tmp_path, """
        with procqueue.Pool(2, retries=2) as pool:
            server = pool.apply(os.getppid)
            workers = [psutil.Process(w.pid) for w in pool.stats().workers]
            os.kill(server, signal.SIGKILL)
            # SIGKILL takes effect a moment later: the old workers could still run the tasks
            psutil.wait_procs(workers, timeout=10)
            results = pool.map(abs, range(-20, 0))
            parents = pool.map(parent_cmdline, range(4))
        print(json.dumps({"results": results, "parents": parents}))
        """, threaded=False)
    assert out["results"] == list(range(20, 0, -1))
    assert all("multiprocessing.forkserver" in " ".join(p) for p in out["parents"]), out


@pytest.mark.timeout(60)
def test_workers_forked_from_the_programs_fork_draw_their_own_random_numbers(tmp_path):
    # numpy's global random state is made when numpy is imported, and fork copies it: without
    # a fresh draw every worker would produce the same "random" numbers.  One BLAS thread, so
    # that importing numpy starts no thread and the program is forked.
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    stdout = run_script(tmp_path, """\
        import hashlib
        import numpy

        def rng_state(_):
            time.sleep(0.2)  # both workers take one
            state = numpy.random.get_state()[1].tobytes()
            return os.getpid(), hashlib.sha1(state).hexdigest(), parent_cmdline(0)

        if __name__ == "__main__":
            mine = rng_state(0)[1]
            with procqueue.Pool(2) as pool:
                rows = pool.map(rng_state, range(2), chunksize=1)
            print(json.dumps({"mine": mine, "rows": rows, "me": psutil.Process().cmdline()}))
        """, env)
    out = json.loads(stdout.splitlines()[-1])
    assert [row[2] for row in out["rows"]] == [out["me"]] * 2  # the fork path was taken
    assert out["rows"][0][0] != out["rows"][1][0]  # two workers
    states = {row[1] for row in out["rows"]}
    assert len(states) == 2 and out["mine"] not in states


@pytest.mark.timeout(60)
def test_two_pools_one_after_the_other_each_fork_their_own_server(tmp_path):
    out = run_program(tmp_path, """
        pids, parents = [], []
        for _ in range(2):
            with procqueue.Pool(1) as pool:
                pids.append(pool.apply(os.getppid))
                parents.append(pool.apply(parent_cmdline, (0,)))
            pool.join()  # the second pool is made right after: the first one's thread is gone
        print(json.dumps({"servers": pids, "parents": parents,
                          "me": psutil.Process().cmdline(), "left": our_children()}))
        """, threaded=False)
    assert out["servers"][0] != out["servers"][1] and out["left"] == []
    assert out["parents"] == [out["me"]] * 2  # both forks of the program


@pytest.mark.timeout(60)
def test_nothing_outlives_a_sigkilled_program_whose_server_is_its_fork(tmp_path):
    script = tmp_path / "program.py"
    script.write_text(PRELUDE + textwrap.dedent("""\
        if __name__ == "__main__":
            pool = procqueue.Pool(2)
            pool.map(seen, range(2))
            family = [p.pid for p in psutil.Process().children(recursive=True)]
            print(json.dumps(family), flush=True)
            pool.map_async(time.sleep, [30, 30])
            time.sleep(60)
        """))
    program = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                               text=True, cwd=tmp_path)
    try:
        family = json.loads(program.stdout.readline())
        assert len(family) >= 3  # the server and two workers
        time.sleep(0.3)  # the sleeps have started
    finally:
        os.kill(program.pid, signal.SIGKILL)
        program.wait()
        program.stdout.close()
    assert wait_gone(family, timeout_s=15) == []


@pytest.mark.timeout(60)
def test_the_switch_turns_the_programs_fork_off(tmp_path):
    stdout = run_script(tmp_path, """\
        if __name__ == "__main__":
            with procqueue.Pool(1) as pool:
                print(json.dumps(pool.apply(parent_cmdline, (0,))))
        """, {**os.environ, "PROCQUEUE_FORK_PROGRAM": "0"})
    assert "multiprocessing.forkserver" in " ".join(json.loads(stdout))

