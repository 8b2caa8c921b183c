"""`procqueue`: run a Python function over many inputs on all CPUs, GNU-parallel style.

Thin by design: parse and check the arguments, build the Pool through the public API, write
one JSON record per input, and turn the outcome into an exit code:

    0    every input succeeded (or there were none)
    1    some inputs failed (each has a record with its error), or a directory of inputs
         could not be read (said on stderr)
    2    usage error: bad option, script (missing, not parsing, failing to import), function,
         input path or output file, checked before any work; or the output failed (disk full)
    3    the run could not go on (the pool broke: see the message); records may be missing
    130  interrupted by Ctrl-C (143: SIGTERM, 129: SIGHUP); records of finished inputs are
         written
    141  the reader of stdout went away (`| head`): the run stopped quietly, as filters do
"""

from __future__ import annotations

import ast
import builtins
import importlib
import contextlib
import os
import re
import signal
import sys
import threading
import time
import traceback
from typing import Any, Callable, TextIO, cast

import click

import procqueue
from procqueue import HaltPolicy

from .inputs import (ARG_FILES, SEPARATORS, TRIMS, Inputs, StreamedInputs, collect_inputs,
                     collect_named_inputs, group_inputs, stdin_inputs)
from .loader import NamedArguments, WorkerStart
from .batch_dashboard import batch_dashboard, feeding, serving
from .output import (JobLog, LoggedJob, OpenedAtFirstWrite, RecordWriter, dry_run_text,
                     forgiving_stderr, joblog_command, line_of, logged_jobs, record_of,
                     unquoted_joblog_command)
from .progress import Progress
from .script import (ScriptError, check_arguments, check_keyword_arguments,
                     format_1_function_identity, function_identity, resolve_script)

EXIT_OK = 0  # every input succeeded
EXIT_FAILURES = 1  # some inputs failed
EXIT_USAGE = 2  # click's own usage errors use it too
EXIT_RUN_FAILED = 3  # the pool broke (a procqueue error outside any one task)
EXIT_SIGINT = 130  # 128 + SIGINT, as shells report it
EXIT_SIGTERM = 143  # 128 + SIGTERM
EXIT_SIGHUP = 129  # 128 + SIGHUP
EXIT_EPIPE = 141  # 128 + SIGPIPE: what a shell reports for a filter whose reader went away
EXIT_BY_SIGNAL = {signal.SIGINT: EXIT_SIGINT, signal.SIGTERM: EXIT_SIGTERM,
                  signal.SIGHUP: EXIT_SIGHUP}

EXAMPLES = """\b
Examples:
  procqueue map score.py inputs/ -j 3 > results.jsonl
  procqueue map score.py inputs/ --glob '*.txt' --unordered --stats
  find . -name '*.csv' | procqueue map tools.py - --fn parse --timeout 60
  procqueue map tools.py:score inputs/ -o scores.jsonl --halt now,fail=10%
  procqueue map mypkg.jobs:render jobs/ --retries 2 --halt soon,fail=5
  procqueue map fetch.py --lines urls.txt --rate 50/30s --limit geo-api=2
  procqueue map render.py -j 3 ::: scene1 scene2 scene3
  procqueue map resize.py ::: a.png b.png ::: 64 128    (4 calls: process(image, size))
  procqueue map score.py inputs/ --cluster tcp://scheduler:8786   (Dask; or --cluster local:4)

\b
Options go before the first ::: or ::::; every word after it is an input.

\b
Exit codes: 0 all inputs ok (or none), 1 some failed (see their records) or a
directory could not be read, 2 usage error (checked before any work) or the output
failed, 3 the pool broke, 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP, 141 stdout closed.
(GNU parallel exits with the number of failed jobs, at most 101, and 255 for a
usage error.)
Ctrl-C once: no new inputs start and running ones get --interrupt-grace seconds to
finish; twice (0.2 s apart or more): they are killed.  SIGTERM kills them at once;
SIGHUP (the terminal went away) lets them finish.
"""


class JobsType(click.ParamType):
    """-j as GNU parallel reads it, for CPU-bound work: N workers; N% of the usable CPUs;
    +N / -N: the usable CPUs plus or minus N; 0: every usable CPU (parallel's "as many as
    possible", which for CPU-bound tasks is one per CPU).  Never fewer than one."""

    name = "jobs"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip()
        cpus = _usable_cpus()
        try:
            if text.endswith("%"):
                jobs = round(cpus * float(text[:-1]) / 100)
            elif text.startswith(("+", "-")):
                jobs = cpus + int(text)
            else:
                jobs = int(text)
                if jobs == 0:
                    return cpus
        except ValueError:
            self.fail(f"{value!r} is not N, N%, +N, -N or 0", param, ctx)
        if jobs < 1 and not text.startswith(("+", "-")) and not text.endswith("%"):
            self.fail(f"{value!r}: give at least 1 (or 0 for every usable CPU)", param, ctx)
        return max(1, jobs)


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)


def _workers_for(jobs: int | None, inputs: int | None) -> int:
    """-j's workers (usable CPUs by default), but no more than there are inputs (None: not
    known yet), as GNU parallel starts no more jobs than it has: a worker with nothing to run
    would only be forked, pinned, made to import the script and stopped (on a 64-CPU
    machine, 64 of them for a batch of 3 files)."""
    workers = jobs if jobs is not None else _usable_cpus()
    return max(1, workers if inputs is None else min(workers, inputs))


class HaltPolicyError(click.BadParameter):
    pass


class OutputUnusable(click.ClickException):
    """--output cannot be opened for writing."""

    exit_code = EXIT_USAGE


class RunFailed(click.ClickException):
    """The pool itself failed (PoolBrokenError and the like): not one input's error."""

    exit_code = EXIT_RUN_FAILED


def _new_pool(jobs: int | None, max_tasks_per_child: int | None,
              pool_options: dict[str, Any]) -> procqueue.Pool:
    """The run's pool; a --cluster that cannot be reached is one line (Dask's connection
    error after its timeout was a traceback and exit code 1)."""
    try:
        return procqueue.Pool(jobs, maxtasksperchild=max_tasks_per_child, **pool_options)
    except OSError as exc:
        if "address" not in pool_options:
            raise
        raise RunFailed(f"cannot reach the Dask cluster at {pool_options['address']}: "
                        f"{exc}") from None


class Interrupted(click.ClickException):
    """Ctrl-C before the run's own handlers were installed (starting or stopping the pool)."""

    exit_code = EXIT_SIGINT

    def __init__(self) -> None:
        super().__init__("interrupted")


def parse_halt(text: str | None) -> HaltPolicy | None:
    """--halt, as GNU parallel reads it (see procqueue.scheduler.HaltPolicy)."""
    if text is None:
        return None
    try:
        return HaltPolicy.parse(text)
    except ValueError as exc:
        raise HaltPolicyError(str(exc), param_hint="--halt") from None


# Two SIGINTs closer than this are one Ctrl-C (seconds): `timeout -s INT` and a terminal
# signal the command's process group, which can deliver it twice; a person presses twice
# far more slowly.
SAME_CTRL_C_S = 0.2


class Interrupts:
    """Ctrl-C, twice: the first stops dispatching and lets running tasks finish (for at most
    `grace_s`, when given, then kills them); the second kills them at once.  SIGTERM kills at
    once.  SIGHUP (the terminal closed) drains: no new inputs, running ones finish, however
    long (workers lead their own process groups, so it does not reach them).  Records of
    every finished input are still written; the exit code says what happened."""

    def __init__(self, progress: Progress, grace_s: float | None,
                 running: Callable[[], int] = lambda: 0) -> None:
        self.progress = progress
        self.grace_s = grace_s
        self.running = running  # tasks held by workers now (pool.stats), for the message
        self.signal: int | None = None
        self._first_at = 0.0  # time.monotonic() of the first signal
        self._outcomes: procqueue.OutcomeIterator | None = None
        self._timer: threading.Timer | None = None
        self._previous: dict[int, Any] = {}

    def install(self, outcomes: procqueue.OutcomeIterator) -> None:
        self._outcomes = outcomes
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        if self._timer is not None:
            self._timer.cancel()

    def _on_signal(self, signum: int, frame: Any) -> None:
        assert self._outcomes is not None
        first = self.signal is None
        now = time.monotonic()
        if not first and signum == self.signal == signal.SIGINT \
                and now - self._first_at < SAME_CTRL_C_S:
            return  # `timeout -s INT`, or a terminal, signalled the process and its group
        if first:
            self._first_at = now
        self.signal = self.signal or signum
        if signum == signal.SIGHUP and first:
            self.progress.note(f"procqueue: hangup: no new inputs start; finishing "
                               f"{self.running()} running task(s)")
            self._outcomes.cancel(kill_running=False)
        elif signum == signal.SIGINT and first:
            limit = f" (for at most {self.grace_s:g} s)" if self.grace_s is not None else ""
            self.progress.note(f"procqueue: interrupted: no new inputs start; finishing "
                               f"{self.running()} running task(s){limit}. Press Ctrl-C again "
                               "to kill them.")
            self._outcomes.cancel(kill_running=False)
            if self.grace_s is not None:
                outcomes = self._outcomes
                self._timer = threading.Timer(self.grace_s,
                                              lambda: outcomes.cancel(kill_running=True))
                self._timer.daemon = True
                self._timer.start()
        else:
            self.progress.note("procqueue: killing the running tasks")
            self._outcomes.cancel(kill_running=True)


class MapCommand(click.Command):
    """`map`, whose arguments after the first `:::`-style separator are all inputs, as in GNU
    parallel: `::: 2 -1 0.1` is three inputs (a negative number is no option), and so are
    `::: -q` and `::: --help`.  Options go before the first separator."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        first = next((i for i, arg in enumerate(args) if arg in SEPARATORS), len(args))
        rest = super().parse_args(ctx, args[:first])
        if first < len(args):
            ctx.params["inputs"] = tuple(ctx.params.get("inputs") or ()) + tuple(args[first:])
        return rest


class CommandGroup(click.Group):
    """`procqueue`'s commands.  Those kept in modules of their own are imported when named
    (or listed by --help), so `procqueue map` does not pay for building the queue, dashboard
    and limits commands (~30 ms of its start, issue #24)."""

    ELSEWHERE = {  # command -> "module:attribute" in this package
        "limits": "limits:limits_command", "dashboard": "dashboard:dashboard_command",
        **{name: f"queue:{name}_command" for name in (
            "worker", "enqueue", "define", "status", "result", "cancel", "retry", "prune")},
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.ELSEWHERE})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands and name in self.ELSEWHERE:
            module, attribute = self.ELSEWHERE[name].split(":")
            command = getattr(importlib.import_module(f".{module}", __package__), attribute)
            self.add_command(command, name)
        return super().get_command(ctx, name)


@click.group(cls=CommandGroup, epilog=EXAMPLES,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(procqueue.__version__, prog_name="procqueue")
def cli() -> None:
    """Run a Python function over many inputs on all CPUs: the script is imported once per
    worker, its function called once per input, one JSON line written per input."""


@cli.command("map", cls=MapCommand, epilog=EXAMPLES,
             short_help="Call a script's function once per input, one JSON line each.")
@click.argument("script")
@click.argument("inputs", nargs=-1)
@click.option("--fn", "fn_name", metavar="NAME",
              help="Function to call [default: process, or the one named in SCRIPT:NAME].")
@click.option("-j", "--jobs", "-P", "--max-procs", "jobs", type=JobsType(), default=None,
              metavar="N|N%|+N|-N|0",
              help="Worker processes: N, a percentage of the usable CPUs, usable CPUs plus or "
                   "minus N, or 0 for all usable CPUs (GNU parallel's forms, but its 0 is as "
                   "many jobs as possible: give N for more workers than CPUs); never more "
                   "than there are inputs [default: usable CPUs].")
@click.option("--cluster", metavar="ADDRESS|local:N",
              help="Run on Dask distributed: a scheduler address (tcp://host:8786), or local:N "
                   "for a LocalCluster of N worker processes (needs procqueue[dask]) "
                   "[default: this machine's processes].")
@click.option("--glob", metavar="PATTERN",
              help="Only files of directories matching PATTERN (a shell glob, against the "
                   "file's name or its path under the directory) [default: every file].")
@click.option("--lines", "-a", "--arg-file", "arg_files", metavar="FILE", multiple=True,
              help="Also take one input per line of FILE, empty and whitespace-only lines "
                   "skipped (kept as inputs where sources are linked: --link, ::::+) (GNU "
                   "parallel's -a; '-' as an INPUT reads stdin); each further -a is another "
                   "input source, as :::: FILE [default: none].")
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True), metavar="FILE",
              help="Write the JSON Lines to FILE [default: stdout].")
@click.option("--unordered", is_flag=True,
              help="Write records as inputs finish, not in input order.")
@click.option("-k", "--keep-order", is_flag=True,
              help="Records in input order: the default (GNU parallel's -k).")
@click.option("--timeout", metavar="SECONDS|P%",
              help="Kill a task after SECONDS (ms, s, m or h may follow, as in --delay: 1m, "
                   "500ms), or after P% (over 100%) of the median time of the "
                   "tasks that succeeded so far (as GNU parallel's); a relative timeout applies "
                   "once 3 tasks succeeded and never kills a task younger than 1 s "
                   "[default: no timeout].")
@click.option("--retries", type=click.IntRange(min=0), default=None, metavar="N",
              help="Run a failed input up to N more times, N+1 runs in all: one that raised, "
                   "timed out or crashed its worker (GNU parallel's --retries N counts runs, "
                   "N in all, and its 0 is forever; here 0 is no retry) [default: a crashed "
                   "worker's input runs once more, no other retries].")
@click.option("--no-pin", is_flag=True,
              help="Do not pin workers to CPUs [default: each worker pinned to one CPU].")
@click.option("--max-tasks-per-child", type=click.IntRange(min=1), default=None, metavar="N",
              help="Replace a worker after it ran N tasks [default: never].")
@click.option("--max-memory-per-child", metavar="SIZE",
              help="Replace a worker whose resident memory exceeds SIZE after a task: bytes, "
                   "or K, M, G, T (powers of 1024), e.g. 2G [default: no limit].")
@click.option("--memfree", metavar="SIZE",
              help="Start a task only while SIZE of memory is free: bytes, or K, M, G, T "
                   "(powers of 1024), e.g. 2G [default: no check].")
@click.option("--chunksize", type=click.IntRange(min=1), default=None, metavar="N",
              help="Inputs per batch sent to a worker [default: adaptive, from measured task "
                   "times].")
@click.option("--concurrency", type=click.IntRange(min=1), default=None, metavar="K",
              help="At most K tasks running at once [default: one per worker].")
@click.option("--rate", metavar="L/P",
              help="At most L task starts in any P, a duration in ms, s, m or h (seconds if "
                   "no unit), e.g. 50/30s [default: no limit].")
@click.option("--delay", metavar="SECONDS",
              help="Start inputs at least SECONDS apart (ms, s, m or h may follow; GNU "
                   "parallel's --delay, the same as --rate 1/SECONDS) [default: no delay].")
@click.option("--limit", "limits", metavar="NAME=K[,RATE]", multiple=True,
              help="A machine-wide named limit: at most K running tasks (and RATE starts, as "
                   "--rate) among every procqueue using NAME; see `procqueue limits` "
                   "[default: none].")
@click.option("--key-from", metavar="EXPR",
              help="Python expression of x (the input; os is there too) giving its concurrency "
                   "key [default: no keys].")
@click.option("--key-concurrency", type=click.IntRange(min=1), default=None, metavar="K",
              help="At most K running tasks per key (with --key-from) [default: 1].")
@click.option("--halt", metavar="POLICY",
              help="Stop starting inputs after N (or N%) failures, successes or finished "
                   "inputs: soon,fail=N lets running tasks finish, now,fail=N kills them; also "
                   "success=, done=, and GNU parallel's 0 (never), 1 (soon,fail=1), "
                   "2 (now,fail=1) [default: 0, never halt].")
@click.option("--interrupt-grace", type=click.FloatRange(min=0), default=3.0, metavar="SECONDS",
              show_default=True,
              help="After the first Ctrl-C, running tasks get SECONDS to finish before they are "
                   "killed (a second Ctrl-C kills them at once).")
@click.option("--trace", "trace_path", metavar="FILE",
              help="Write every task attempt to FILE (Chrome trace format; see `procqueue "
                   "report`) [default: no trace].")
@click.option("--journal", "journal_path", metavar="FILE",
              help="Record every outcome in FILE (SQLite); the same command run again resumes: "
                   "inputs already done are not recomputed [default: no journal].")
@click.option("--retry-failed", is_flag=True, help="With --journal: run failed inputs again.")
@click.option("--force", is_flag=True,
              help="With --journal: accept a journal written by a changed script.")
@click.option("--joblog", "joblog_path", metavar="FILE",
              help="Also log each input that ran to FILE, tab-separated, in GNU parallel's "
                   "--joblog format (Seq, Starttime, JobRuntime, Exitval, Signal, ...) "
                   "[default: no log].")
@click.option("--resume", is_flag=True,
              help="With --joblog: skip the inputs an earlier run logged there (by position: "
                   "give the same inputs, or it is refused), append the rest (GNU parallel's "
                   "--resume).")
@click.option("--resume-failed", is_flag=True,
              help="With --joblog: as --resume, but run the logged inputs that failed again.")
@click.option("--will-cite", "--no-notice", "will_cite", is_flag=True, hidden=True,
              help="Accepted for GNU parallel scripts (no notice is ever printed).")
@click.option("--dry-run", is_flag=True,
              help="Check SCRIPT and its function, print the inputs one call per line (each "
                   "argument shell-quoted where needed: 'b c' 1), run nothing (GNU parallel's "
                   "--dry-run).")
@click.option("-C", "--colsep", metavar="REGEX",
              help="Split each input into columns at REGEX and pass one argument per column, "
                   "trimmed as --trim says (GNU parallel's --colsep; e.g. --colsep , :::: "
                   "pairs.csv: a line 'a, 1' is 'a' and '1') [default: one argument per "
                   "input].")
@click.option("--trim", type=click.Choice(list(TRIMS)), default=None,
              help="Strip whitespace around each argument (each column with --colsep, the "
                   "--header names too): n none, l left, r right, lr or rl both (GNU "
                   "parallel's --trim) [default: rl with --colsep, else n].")
@click.option("--header", "header", metavar=":",
              help="The first input of each source names its columns (split at --colsep, "
                   "a tab by default), and the function gets each row's columns as keyword "
                   "arguments of those names (GNU parallel's --header :; e.g. --header : "
                   "--colsep , :::: table.csv calls process(name=..., size=...)) [default: no "
                   "header].")
@click.option("--link", "--xapply", "link", is_flag=True,
              help="Pair the input sources one to one instead of combining them (GNU "
                   "parallel's --link: ::: a b ::: 1 2 gives (a, 1), (b, 2)), a shorter source "
                   "starting over (:::+ pairs so too, but stops at the shorter source).")
@click.option("-N", "-n", "--max-args", "max_args", type=click.IntRange(min=1), default=None,
              metavar="N",
              help="Pass N inputs per call, as N arguments (GNU parallel's -N: ::: a b c d "
                   "-N 2 calls f(a, b) and f(c, d); the last call may get fewer) [default: 1].")
@click.option("-0", "--null", is_flag=True,
              help="Inputs from stdin and files of inputs are separated by NUL, not newlines "
                   "(find -print0; GNU parallel's -0).")
@click.option("--bar", "--progress", "--eta", "bar", is_flag=True,
              help="Show the progress bar even when stderr is not a terminal.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar (wins over --bar).")
@click.option("--stats", is_flag=True, help="Print a summary on stderr at the end.")
@click.option("--dashboard", "dashboard", is_flag=True,
              help="Serve a live page about the run on 127.0.0.1 while it runs (workers, "
                   "their tasks, throughput, timeline, failures); its URL, with an access "
                   "token, is printed on stderr.")
@click.option("--dashboard-host", default="127.0.0.1", show_default=True, metavar="HOST",
              help="With --dashboard: the address to listen on.")
@click.option("--dashboard-port", type=click.IntRange(0, 65535), default=0, metavar="N",
              help="With --dashboard: the port to listen on [default: a free one].")
def map_command(script: str, inputs: tuple[str, ...], fn_name: str | None, jobs: int | None,
                cluster: str | None, glob: str | None, arg_files: tuple[str, ...],
                output: str | None,
                unordered: bool, keep_order: bool, timeout: str | None, retries: int | None,
                no_pin: bool, max_tasks_per_child: int | None, max_memory_per_child: str | None,
                memfree: str | None, chunksize: int | None, concurrency: int | None,
                rate: str | None, delay: str | None, limits: tuple[str, ...],
                key_from: str | None, key_concurrency: int | None, halt: str | None,
                interrupt_grace: float | None, trace_path: str | None,
                journal_path: str | None, retry_failed: bool, force: bool,
                joblog_path: str | None, resume: bool, resume_failed: bool, will_cite: bool,
                dry_run: bool, colsep: str | None, trim: str | None, header: str | None,
                link: bool,
                max_args: int | None,
                null: bool, bar: bool, quiet: bool, stats: bool, dashboard: bool,
                dashboard_host: str, dashboard_port: int) -> None:
    """Call SCRIPT's function once per input of INPUTS (files, directories, or - for
    stdin lines, which no INPUTS also reads unless it is a terminal; after ::: the inputs
    themselves, after :::: files of inputs, as in GNU parallel) and write one JSON line per
    input.  Several input sources (::: a b ::: 1 2) give every combination, passed as that
    many arguments; :::+ pairs a source with the one before (as many pairs as the
    shorter has).  stdin's lines run as they
    come while it is still being written (tail -f log | procqueue map job.py)."""
    if keep_order and unordered:
        raise click.UsageError("--keep-order and --unordered contradict each other")
    if (retry_failed or force) and journal_path is None:  # as --resume without --joblog
        raise click.UsageError(f"{'--retry-failed' if retry_failed else '--force'} goes with "
                               f"--journal FILE: give it")
    if output == "-":
        output = None  # stdout, as without -o
    lines_file = arg_files[0] if arg_files else None
    from_stdin = not inputs and lines_file is None
    if from_stdin:
        inputs = _stdin_if_piped()
    for path in arg_files[1:]:  # GNU parallel: each -a is an input source of its own
        inputs += (ARG_FILES, path)
    fn = resolve_script(script, fn_name)
    call: Any = fn
    unreadable: list[str] = []  # directories of inputs that could not be read (on stderr)
    items: Inputs | StreamedInputs
    if header is not None:
        if max_args is not None and max_args > 1:
            raise click.UsageError("--header names one row's columns: it does not go with -N")
        items, names = collect_named_inputs(inputs, glob, lines_file, null=null, colsep=colsep,
                                            link=link, unreadable=unreadable, trim=trim)
        check_keyword_arguments(fn, names)
        call = NamedArguments(fn, names)
    elif inputs == ("-",) and lines_file is None and _may_stream(
            max_args, resume or resume_failed, journal_path, dry_run, dashboard, null, halt,
            cluster):
        try:
            items = stdin_inputs(colsep=colsep, trim=trim)  # waits for stdin's first line
        except KeyboardInterrupt:
            raise Interrupted() from None
    else:
        try:  # (stdin to its end, a big tree of directories)
            items = collect_inputs(inputs, glob, lines_file, null=null, colsep=colsep,
                                   link=link, unreadable=unreadable, trim=trim)
        except KeyboardInterrupt:
            raise Interrupted() from None
    if max_args is not None and max_args > 1:
        assert not isinstance(items, StreamedInputs)
        items = group_inputs(items, max_args)
    if items and header is None:
        first = _first_input(items)
        check_arguments(fn, len(first) if isinstance(first, tuple) else 1,
                        _arguments_given_by(max_args, colsep))
    seqs = None
    if resume or resume_failed:
        assert not isinstance(items, StreamedInputs)
        try:
            seqs, items = _resumed(items, joblog_path, journal_path, resume_failed, quiet,
                                   fn.describe())
        except JobLogOfOtherInputs as exc:
            if colsep is not None and trim is None:
                exc.message += ("; --colsep trims its columns as GNU parallel's does "
                                "(--trim rl): give --trim n for a log written by a procqueue "
                                "that did not")
            raise
    halt_policy = parse_halt(halt)
    pool_options = _pool_options(timeout, retries, no_pin, max_memory_per_child, memfree,
                                 concurrency, _rate_or_delay(rate, delay))
    call_options = _call_options(limits, key_from, key_concurrency)
    for path, flag in ((output, "--output"), (journal_path, "--journal"),
                       (trace_path, "--trace"), (joblog_path, "--joblog")):
        _check_writable(path, flag)
    if (output is None or joblog_path == "-") and sys.stdout is None:
        raise OutputUnusable("cannot write stdout: it is closed (give -o FILE)")
    if dashboard and cluster is not None:
        raise click.UsageError("--dashboard watches this machine's pool: not with --cluster")
    if cluster is not None:  # before the journal is opened: refused options create nothing
        jobs = _use_cluster(cluster, jobs, pool_options, call_options)
    if dry_run:  # every option checked, nothing created or started
        _check_script_loads(script, call)
        for item in items:
            click.echo(dry_run_text(item))
        sys.exit(EXIT_FAILURES if unreadable else EXIT_OK)
    if not items:  # as GNU parallel: nothing to do is no error (`find ... | procqueue map`)
        if not quiet:
            click.echo("procqueue: no inputs", err=True)
        sys.exit(EXIT_FAILURES if unreadable else EXIT_OK)
    joblog = None
    if joblog_path:  # first: an unwritable path stops the run before anything else is opened
        joblog = JobLog(_output_stream(joblog_path, append=seqs is not None),
                        fn.describe(), seqs)
        pool_options["on_event"] = joblog.on_event
    journal = None
    if journal_path:
        assert not isinstance(items, StreamedInputs)
        journal = _open_journal(journal_path, fn, items, retry_failed, force)
    if journal is not None:
        pool_options["journal"] = journal
    if trace_path:
        pool_options["trace"] = trace_path
    stream = _output_stream(output) if output else sys.stdout
    # A remote worker's stdout is not ours: its prints stay there.
    pool_options["initializer"] = WorkerStart(
        call, prints_to_stderr=output is None and "address" not in pool_options)
    output_name = f"--output {output!r}" if output else "stdout"
    watch = batch_dashboard(f"map {script}", _count(items), dashboard_host,
                            dashboard_port) if dashboard else None
    try:
        code = run(call, items, jobs, max_tasks_per_child, chunksize, not unordered, pool_options,
                   call_options, halt_policy, interrupt_grace, stream, quiet, stats, bar,
                   joblog, output_name, watch)
        if output:
            _close_output(stream, output_name)
        if joblog is not None:
            _close_output(joblog, "--joblog")
    except KeyboardInterrupt:  # while the pool starts or stops: no handler of ours yet
        raise Interrupted() from None
    except ImportError as exc:  # --cluster without the dask extra
        raise click.UsageError(str(exc)) from None
    except procqueue.InitializerError as exc:  # WorkerStart: the script does not load
        raise ScriptError(_script_failure(script, exc)) from None
    except procqueue.ProcqueueError as exc:  # the pool broke; one task's errors are records
        raise RunFailed(str(exc)) from None
    finally:
        if output:
            _close_quietly(stream)  # closed above, or an error is on its way already
        if joblog is not None:  # closed above, or an error is on its way already (said once)
            _close_quietly(joblog)
        if journal is not None:
            journal.close()
    sys.exit(EXIT_FAILURES if unreadable and code == EXIT_OK else code)


NO_INPUT = "give at least one INPUT (a file, a directory, or -), or pipe inputs into stdin"


def _arguments_given_by(max_args: int | None, colsep: str | None) -> str | None:
    """What gives the function its arguments, for check_arguments' message (None: the input
    sources)."""
    if max_args is not None and max_args > 1:
        return f"-N {max_args} gives it {{count}} per call"
    if colsep is not None:  # the columns, whether of one input source or of several
        return (f"the first input's columns (--colsep {colsep!r}) give it {{count}} per call "
                "(one argument per column)")
    return None


def _may_stream(max_args: int | None, resuming: bool, journal_path: str | None,
                dry_run: bool, dashboard: bool, null: bool, halt: str | None,
                cluster: str | None) -> bool:
    """Whether a run of stdin's lines may start before stdin ends (cli.inputs.stdin_inputs):
    not where the inputs must all be known first (-N's groups, a resumed run's or a journal's
    count, --dry-run's list, the dashboard's total, a --halt percentage), nor with -0 (its
    inputs may hold newlines) or --cluster."""
    percent = halt is not None and "%" in halt
    return (max_args in (None, 1) and not resuming and journal_path is None and not dry_run
            and not dashboard and not null and not percent and cluster is None)


def _first_input(items: "Inputs | StreamedInputs") -> Any:
    return items.first if isinstance(items, StreamedInputs) else items[0]


def _count(items: "Inputs | StreamedInputs") -> int:
    assert not isinstance(items, StreamedInputs)
    return len(items)


def _check_script_loads(script: str, call: Any) -> None:
    """--dry-run: import the script here, as each worker would (its prints to stderr: stdout
    holds the list of inputs); a script that fails to import is the usage error a run gives."""
    try:
        with contextlib.redirect_stdout(sys.stderr):
            WorkerStart(call)()
    except (Exception, SystemExit) as exc:  # (sys.exit at a script's top level too)
        # the script's own frames: procqueue's loading and the import machinery say nothing
        ours = (os.path.dirname(procqueue.__file__), os.path.dirname(__file__))
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None and (
                tb.tb_frame.f_code.co_filename.startswith(ours)
                or tb.tb_frame.f_code.co_filename.startswith("<frozen ")):
            tb = tb.tb_next
        text = "".join(traceback.format_exception(exc.with_traceback(tb))).rstrip()
        raise ScriptError(f"script {script!r} failed to load:\n{text}") from None


def _script_failure(script: str, error: BaseException) -> str:
    """The message of a script that fails to load in the workers: its traceback, once."""
    cause = error.__cause__
    remote = cause.__cause__ if cause is not None else None
    traceback = getattr(remote, "tb_text", None) or (
        f"{type(cause).__name__}: {cause}" if cause is not None else str(error))
    return f"script {script!r} failed to load in the workers:\n{traceback.rstrip()}"


def _close_output(stream: TextIO | JobLog, output_name: str) -> None:
    try:
        stream.close()
    except OSError as exc:  # its last records (or joblog lines) could not be flushed
        raise OutputUnusable(f"cannot write {output_name}: {exc.strerror or exc}") from None


def _close_quietly(stream: TextIO | JobLog) -> None:
    try:
        stream.close()
    except (OSError, ValueError):  # (ValueError: a second close of a file that failed)
        pass


def _check_writable(path: str | None, flag: str) -> None:
    """An output path that cannot be written is a usage error before any work (and under
    --dry-run): an existing file must be writable, a new one's directory must exist."""
    if path is None or path == "-":
        return
    if os.path.isdir(path):
        raise OutputUnusable(f"cannot write {flag} {path!r}: it is a directory")
    if os.path.exists(path):
        if not os.access(path, os.W_OK):
            raise OutputUnusable(f"cannot write {flag} {path!r}: permission denied")
        return
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise OutputUnusable(f"cannot write {flag} {path!r}: no directory {directory!r}")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OutputUnusable(f"cannot write {flag} {path!r}: permission denied in "
                             f"{directory!r}")


def _stdin_if_piped() -> tuple[str, ...]:
    """No INPUT given: as GNU parallel (`find . -name '*.csv' | parallel job`), one input per
    line of stdin, unless it is a terminal (then a usage error, not a wait for typing)."""
    if sys.stdin is None or sys.stdin.isatty():
        raise click.UsageError(NO_INPUT)
    return ("-",)


class JobLogOfOtherInputs(click.ClickException):
    """--resume with a --joblog whose Command for a Seq is not the input at that position."""

    exit_code = EXIT_USAGE


def _resumed(items: Inputs, joblog_path: str | None, journal_path: str | None,
             failed_too: bool, quiet: bool, command: str) -> tuple[list[int], Inputs]:
    """--resume / --resume-failed: the inputs an earlier run's joblog does not show done, and
    their Seq (position among all the inputs) for the log.  As GNU parallel, the log says
    which inputs ran by their position; inputs that are not those the log was written for
    are refused (JobLogOfOtherInputs) rather than silently matched by position."""
    if joblog_path is None:
        raise click.UsageError("--resume and --resume-failed read --joblog FILE: give it")
    if journal_path is not None:
        raise click.UsageError("--resume goes with --joblog; a --journal run resumes by itself")
    jobs = logged_jobs(joblog_path)
    _check_same_inputs(jobs, items, command, joblog_path)
    done = {job.seq for job in jobs if job.ok or not failed_too}
    seqs = [i + 1 for i in range(len(items)) if i + 1 not in done]
    if done and not quiet:
        click.echo(f"procqueue: {len(items) - len(seqs)} of {len(items)} inputs are done "
                   f"in {joblog_path}: skipped", err=True)
    return seqs, cast(Inputs, [items[seq - 1] for seq in seqs])


def _check_same_inputs(jobs: list[LoggedJob], items: Inputs, command: str, path: str) -> None:
    """Each logged Seq's Command must be the input at that position now (the function's name
    may differ: a script given by another path).  A log written before the arguments were
    quoted matches in its unquoted form too."""
    for job in sorted(jobs):
        if job.seq > len(items):
            continue
        item = items[job.seq - 1]
        now = joblog_command(command, item)[len(command) + 1:]
        unquoted = unquoted_joblog_command(command, item)[len(command) + 1:]
        if not (_logs_input(job.command, command, now)
                or _logs_input(job.command, command, unquoted)):
            logged = job.command.removeprefix(command + " ")
            raise JobLogOfOtherInputs(
                f"--resume: the inputs changed since {path} was written: Seq {job.seq} is "
                f"{logged!r} there but {now!r} now (give the same inputs, or another --joblog)")


def _logs_input(logged: str, command: str, arguments: str) -> bool:
    """Whether a logged Command is `command` and `arguments`, or another name of the function
    (another path to the script) and `arguments`."""
    if logged.startswith(command + " "):
        return logged[len(command) + 1:] == arguments
    return logged.endswith(" " + arguments)


def _output_stream(path: str, append: bool = False) -> TextIO:
    """Where the run's lines go: '-' is stdout, as in GNU parallel; a file is opened at its
    first line (OpenedAtFirstWrite)."""
    if path == "-":
        return sys.stdout
    return cast(TextIO, OpenedAtFirstWrite(path, append))


class JournalUnusable(click.ClickException):
    exit_code = EXIT_USAGE


def _open_journal(path: str, fn: Any, items: Inputs, retry_failed: bool, force: bool
                  ) -> procqueue.Journal:
    try:
        journal = procqueue.Journal.open(
            path, function_identity=function_identity(fn),
            former_identities=(format_1_function_identity(fn),), force=force,
            retry_failed=retry_failed)
    except procqueue.JournalError as exc:  # busy, written by another script, not a journal
        raise JournalUnusable(str(exc)) from None
    done = sum(journal.lookup(key) is not None for key in procqueue.Journal.keys_of(items))
    if done:
        click.echo(f"resuming: {done} of {len(items)} inputs already done, "
                   f"{len(items) - done} to run", err=True)
    return journal


@cli.command("report", short_help="Make an HTML page of a --trace file.")
@click.argument("trace", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True),
              default="report.html", show_default=True, metavar="FILE",
              help="Where to write the page.")
@click.option("--title", default=None, metavar="TEXT",
              help="Page title [default: the trace's file name].")
def report_command(trace: str, output: str, title: str | None) -> None:
    """Turn a --trace file into one self-contained HTML page: per-worker timeline,
    concurrency, slowest inputs, failures and summary."""
    try:
        events = procqueue.load_trace(trace)
    except (ValueError, KeyError) as exc:
        raise click.ClickException(f"{trace} is not a procqueue trace: {exc}") from None
    page = procqueue.render_report(events, title or f"procqueue run: {os.path.basename(trace)}")
    with open(output, "w", encoding="utf-8") as f:
        f.write(page)
    click.echo(f"wrote {output} ({len(events)} task attempts)", err=True)


@cli.command("journal", short_help="Summarise a run journal, or export its records.")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--export", is_flag=True,
              help="Write every input's record to stdout as `procqueue map` wrote it (JSON "
                   "Lines, the input as given) [default: a summary].")
@click.option("--slowest", type=click.IntRange(min=0), default=10, show_default=True,
              metavar="N", help="List the N slowest inputs in the summary (0: none).")
def journal_command(path: str, export: bool, slowest: int) -> None:
    """Summarise a run journal (done, failed, slowest inputs), or --export its results."""
    try:
        with procqueue.Journal.read(path) as journal:
            if export:  # the records `procqueue map` wrote, the input as given
                for outcome in journal.outcomes():
                    sys.stdout.write(line_of(record_of(outcome)) + "\n")
            else:
                click.echo(str(journal.summary(slowest=slowest)))
    except procqueue.JournalError as exc:
        raise JournalUnusable(str(exc)) from None


def _pool_options(timeout: str | None, retries: int | None, no_pin: bool,
                  max_memory_per_child: str | None, memfree: str | None,
                  concurrency: int | None, rate: str | None) -> dict[str, Any]:
    options: dict[str, Any] = {"pin": not no_pin}
    if retries is not None:
        # As GNU parallel's --retries: any failed input runs again, not only a crash (the
        # pool's default, when the option is not given).  TaskTimeoutError is an Exception.
        options.update(retries=retries, retry_on=(Exception,))
    if timeout is not None:
        options["timeout"] = _parse_timeout(timeout)
    if max_memory_per_child:
        options["max_memory_per_child"] = max_memory_per_child
    if memfree:
        options["min_free_memory"] = memfree
    if concurrency:
        options["concurrency"] = concurrency
    if rate:
        options["rate"] = _parse(procqueue.Rate.parse, rate, "--rate")
    for name, value in options.items():  # as the pool will: bad values are usage errors now
        try:
            procqueue.Pool.check_options(**{name: value})
        except (ValueError, TypeError) as exc:
            message = str(exc).removeprefix(f"{name}: ")  # the flag is named instead
            raise click.BadParameter(message, param_hint=_POOL_OPTION_FLAGS.get(name)) from None
    return options


_POOL_OPTION_FLAGS = {"timeout": "--timeout", "max_memory_per_child": "--max-memory-per-child",
                      "min_free_memory": "--memfree", "concurrency": "--concurrency",
                      "retries": "--retries", "rate": "--rate"}


def _rate_or_delay(rate: str | None, delay: str | None) -> str | None:
    """--delay D is --rate 1/D: one start in any D seconds."""
    if delay is None:
        return rate
    if rate is not None:
        raise click.UsageError("give --rate or --delay, not both")
    if _ZERO_DURATION.fullmatch(delay):
        return None  # --delay 0: no delay, as in GNU parallel
    one_per = f"1/{delay.strip()}"
    try:
        procqueue.Rate.parse(one_per)
    except ValueError:
        raise click.BadParameter(f"{delay!r} is not seconds (optionally followed by ms, s, m "
                                 f"or h)", param_hint="--delay") from None
    return one_per


_ZERO_DURATION = re.compile(r"\s*(0+\.?0*|\.0+)\s*(ms|s|m|h)?\s*")


def _parse_timeout(text: str) -> float | str:
    """--timeout: seconds, a unit allowed as --delay's (1m, 500ms), or a percentage (300%)."""
    if text.strip().endswith("%"):
        return text.strip()
    try:
        seconds = _duration_s(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not seconds (optionally followed by ms, s, m "
                                 f"or h) or a percentage like 300%",
                                 param_hint="--timeout") from None
    if seconds <= 0:
        raise click.BadParameter("must be > 0", param_hint="--timeout")
    return seconds


def _duration_s(text: str) -> float:
    """Seconds: a number (as float() reads it: what --timeout took before it took units), or
    one followed by ms, s, m or h, read by Rate.parse as --delay's and --rate's periods are,
    so the options agree on units.  ValueError for anything else."""
    try:
        return float(text)
    except ValueError:
        pass
    if _ZERO_DURATION.fullmatch(text):
        return 0.0  # (Rate.parse refuses a period of 0: the caller says what is wrong)
    if not re.match(r"\s*\.?\d", text):  # Rate.parse reads a bare "m" as 1 m
        raise ValueError(f"{text!r} has no number")
    return procqueue.Rate.parse(f"1/{text.strip()}").period_s


# Pool options that exist only on this machine's processes (shared memory, /proc): refused
# with --cluster rather than silently dropped.  (--journal and --trace are written here, by
# the pool's front end, from the Dask workers' outcomes and events.)
_LOCAL_ONLY = {"max_memory_per_child": "--max-memory-per-child", "min_free_memory": "--memfree",
               "limit": "--limit"}


def _use_cluster(cluster: str, jobs: int | None, pool_options: dict[str, Any],
                 call_options: dict[str, Any]) -> int | None:
    """--cluster: a Dask scheduler address, or local:N (a LocalCluster of N processes).
    Changes the options in place; returns the worker count to ask for."""
    given = set(pool_options) | set(call_options)
    refused = [flag for name, flag in _LOCAL_ONLY.items() if name in given]
    if isinstance(pool_options.get("timeout"), str):
        refused.append("--timeout N%")
    if refused:
        raise click.UsageError(f"{', '.join(refused)} cannot be used with --cluster "
                               "(they need this machine's worker processes)")
    pool_options.pop("pin", None)  # Dask places its own workers
    kind, colon, count = cluster.partition(":")
    if kind == "local":
        pool_options["backend"] = "dask"
        if not colon:
            return jobs
        if not count.isdigit() or int(count) < 1:
            raise click.BadParameter(f"{cluster!r}: say local:N with N >= 1",
                                     param_hint="--cluster")
        if jobs is not None and jobs != int(count):
            raise click.BadParameter(f"{cluster} and -j {jobs} disagree", param_hint="--cluster")
        return int(count)
    if "://" not in cluster and not colon:
        raise click.BadParameter(f"{cluster!r}: give tcp://HOST:PORT or local:N",
                                 param_hint="--cluster")
    pool_options["address"] = cluster
    return jobs


def _call_options(limits: tuple[str, ...], key_from: str | None,
                  key_concurrency: int | None) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if len(limits) > 1:
        raise click.BadParameter("one --limit per run", param_hint="--limit")
    if limits:
        options["limit"] = _parse(procqueue.Limit.parse, limits[0], "--limit")
    if key_from:
        options["key"] = _key_function(key_from)
        options["key_concurrency"] = key_concurrency or 1
    elif key_concurrency:
        raise click.BadParameter("needs --key-from", param_hint="--key-concurrency")
    return options


def _key_function(expression: str) -> Callable[[str], Any]:
    try:
        code = compile(expression, "<--key-from>", "eval")
    except SyntaxError as exc:
        raise click.BadParameter(f"{expression!r}: {exc.msg}", param_hint="--key-from") from None
    unknown = sorted(_free_names(expression) - KEY_NAMES - set(dir(builtins)))
    if unknown:
        raise click.BadParameter(f"{expression!r} uses {', '.join(map(repr, unknown))}: the "
                                 f"input is x (os may be used too)", param_hint="--key-from")
    return lambda x: eval(code, {"os": os}, {"x": x})  # the user's own expression


KEY_NAMES = {"x", "os"}  # the names a --key-from expression sees, besides the builtins


def _free_names(expression: str) -> set[str]:
    """The names an expression reads that it does not bind itself (comprehension variables,
    lambda arguments, := targets)."""
    tree = ast.parse(expression, mode="eval")
    read, bound = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    return read - bound


def _parse(parse: Callable[[str], Any], text: str, hint: str) -> Any:
    try:
        return parse(text)
    except (ValueError, TypeError) as exc:
        raise click.BadParameter(str(exc), param_hint=hint) from None


def run(fn: Any, items: "Inputs | StreamedInputs", jobs: int | None,
        max_tasks_per_child: int | None,
        chunksize: int | None, ordered: bool, pool_options: dict[str, Any],
        call_options: dict[str, Any], halt: HaltPolicy | None, grace_s: float | None,
        stream: TextIO, quiet: bool, stats: bool, bar: bool = False,
        joblog: JobLog | None = None, output_name: str = "stdout",
        dashboard: procqueue.Dashboard | None = None) -> int:
    """Run the batch; returns the exit code."""
    # (None: stdin's lines, still coming; no percentage goes with them, see _may_stream)
    total = None if isinstance(items, StreamedInputs) else len(items)
    progress = Progress(total, sys.stderr,
                        enabled=(bar or sys.stderr.isatty()) and not quiet)
    # Records and the bar on one terminal: each record clears the bar's line first.
    writer = RecordWriter(stream, before_write=progress.clear
                          if progress.enabled and _same_terminal(stream, sys.stderr) else None)
    if joblog is not None:  # a line logged says its record is out: --resume skips its input
        joblog.lines.follows = writer
    output_error: OSError | None = None
    failing_output = output_name  # what output_error was met writing
    interrupts = Interrupts(progress, grace_s)
    # The local pool halts the call itself, as soon as a task ends (not when its record comes
    # up in input order); Dask takes no halt=, so there this loop counts and cancels.
    pool_halts = halt is not None and "backend" not in pool_options \
        and "address" not in pool_options
    if pool_halts:
        assert halt is not None
        call_options = {**call_options,
                        "halt": str(halt if total is None else halt.of_total(total))}
    halted = False
    failed = never_ran = done = 0
    stopped = 0  # inputs the halt cancelled or killed (never_ran among them)
    started = time.monotonic()
    pool_options, events = _recording_events(pool_options) if stats else (pool_options, None)
    retries_used = 0
    pool_options = feeding(pool_options, dashboard)
    if "backend" not in pool_options and "address" not in pool_options:
        jobs = _workers_for(jobs, total)
    with _new_pool(jobs, max_tasks_per_child, pool_options) as pool, serving(dashboard, pool):
        progress.restarts = lambda: pool.stats().worker_restarts
        interrupts.running = lambda: pool.stats().tasks_running
        # Several input sources (GNU parallel's ::: a b ::: 1 2): a combination is a tuple,
        # and the function gets its parts as arguments, as the command would in parallel.
        star = bool(items) and isinstance(_first_input(items), tuple)
        outcomes = pool.imap_outcomes(fn, items, ordered=ordered, chunksize=chunksize,
                                      star=star, **call_options)
        interrupts.install(outcomes)
        try:
            for outcome in outcomes:
                if isinstance(outcome.error, procqueue.InitializerError):
                    raise outcome.error  # the script does not load: no input can run
                done += 1
                record = record_of(outcome)
                try:
                    writer.write(record)  # may turn a non-JSON result into the record's error
                    if joblog is not None:
                        failing_output = "--joblog"
                        joblog.write(outcome, recorded_ok=record["ok"])
                        failing_output = output_name
                except OSError as exc:  # the reader went away, the disk is full: stop now
                    output_error = exc
                    outcomes.cancel(kill_running=True)
                    break
                progress.update(record["ok"])
                retries_used += max(outcome.attempts - 1, 0)
                if not record["ok"]:
                    failed += 1
                    never_ran += outcome.attempts == 0
                    cancelled = isinstance(outcome.error, procqueue.TaskCancelledError) \
                        or procqueue.is_retry_stopped(outcome.error)
                    if cancelled and halt is not None and not halted \
                            and interrupts.signal is None:
                        halted = True  # the pool's halt: its first cancelled input
                        _note_halt(progress, halt)
                    stopped += halted and cancelled
                ran_failed, succeeded = failed - never_ran, done - failed
                if not pool_halts and halt is not None and not halted \
                        and halt.reached(ran_failed, succeeded, done if total is None else total):
                    halted = True
                    _note_halt(progress, halt)
                    outcomes.cancel(kill_running=halt.now)
            if total is None and pool_halts and halt is not None and not halted \
                    and halt.reached(failed - never_ran, done - failed, done):
                halted = True  # stdin's lines ended at the halt, none was left to cancel
                _note_halt(progress, halt)
        finally:
            try:
                writer.close()
            except OSError as exc:
                output_error = output_error or exc
            interrupts.restore()
        pool_stats = pool.stats()
    progress.close()
    if output_error is not None:
        return _output_failed(output_error, failing_output)
    total = done if total is None else total
    if never_ran and (halted or interrupts.signal is not None):
        click.echo(f"procqueue: {never_ran} of {total} inputs never ran (their records "
                   "have attempts 0 and error TaskCancelledError)", err=True)
    wall_s = time.monotonic() - started
    if events is not None:  # --stats
        _print_stats(total, failed, never_ran, retries_used, pool_stats, wall_s, events)
    if interrupts.signal is not None:
        return EXIT_BY_SIGNAL[interrupts.signal]
    if halted and halt is not None and halt.kind == "success":
        return EXIT_OK  # what was looked for was found (GNU parallel exits 0 then)
    if halted and halt is not None and halt.kind != "fail":
        # The inputs a done= halt stopped are what the user asked for: exit 0 then, unless
        # some input failed on its own.
        failed -= stopped
    return EXIT_FAILURES if failed else EXIT_OK


def _output_failed(error: OSError, output_name: str) -> int:
    """The records could not be written.  A reader that went away (`procqueue map ... | head`)
    ends the run quietly, as it ends any filter (EXIT_EPIPE); anything else (a full disk) is
    said in one line."""
    if isinstance(error, BrokenPipeError):
        # Python would report the failed flush of stdout at exit: send it nowhere instead.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_EPIPE
    raise OutputUnusable(f"cannot write {output_name}: {error.strerror or error}")


def _same_terminal(a: TextIO, b: TextIO) -> bool:
    try:
        return a.isatty() and b.isatty() and os.path.samestat(os.fstat(a.fileno()),
                                                               os.fstat(b.fileno()))
    except (OSError, ValueError):
        return False


def _note_halt(progress: Progress, halt: HaltPolicy) -> None:
    progress.note(f"procqueue: --halt {halt} reached: "
                  f"{'killing' if halt.now else 'finishing'} running tasks; "
                  "inputs not started are reported as cancelled")


def _recording_events(pool_options: dict[str, Any]
                       ) -> tuple[dict[str, Any], list[procqueue.TaskEvent]]:
    """--stats: also collect the task events, from which the efficiency is computed as in the
    HTML report (procqueue.utilisation)."""
    events: list[procqueue.TaskEvent] = []
    listener = pool_options.get("on_event")  # --joblog's

    def record(event: procqueue.TaskEvent) -> None:
        events.append(event)
        if listener is not None:
            listener(event)

    return {**pool_options, "on_event": record}, events


def _print_stats(total: int, failed: int, never_ran: int, retries: int,
                 pool_stats: procqueue.PoolStats, wall_s: float,
                 events: list[procqueue.TaskEvent]) -> None:
    lines = [
        f"tasks:           {total}",
        f"succeeded:       {total - failed}",
        f"failed:          {failed - never_ran}",
        f"not run:         {never_ran}",
        f"retries:         {retries}",
        f"worker restarts: {pool_stats.worker_restarts}",
        f"workers:         {pool_stats.processes}",
        f"wall time:       {wall_s:.2f} s (the whole run, starting the workers included)",
    ]
    use = procqueue.utilisation(events)
    lines += [
        f"task span:       {use.span_s:.2f} s (first task start to last task end)",
        f"busy time:       {use.busy_s:.2f} s (every task attempt, on {use.workers} worker(s))",
        f"efficiency:      {use.efficiency:.0%} (busy time / (workers that ran tasks "
        "x task span), as in `procqueue report`)",
    ]
    click.echo("\n".join(lines), err=True)


def main() -> None:
    forgiving_stderr()  # a message that cannot be written must not fail the run
    _import_from_the_working_directory()
    cli(prog_name="procqueue")


def _import_from_the_working_directory() -> None:
    """A `module:NAME` (map's SCRIPT, a queue's stored function) is found in the directory the
    command runs in, as `python -m` and `python -c` find it, as uvicorn and celery do; an
    installed console script's path starts with its own bin directory instead.  Last, not
    first as there: a directory named like an installed package (a procqueue checkout) must
    not shadow it in the fork server and the workers.  Absolute, so that the workers (which
    inherit the path) find it wherever they run."""
    here = os.getcwd()
    if here not in sys.path:
        sys.path.append(here)


if __name__ == "__main__":
    main()
