"""One JSON Lines record per input: what ran, and its result or its error."""

from __future__ import annotations

import json
import os
import shlex
import sys
import threading
import time
from typing import Any, Callable, NamedTuple, TextIO

import procqueue


def record_of(outcome: procqueue.TaskOutcome) -> dict[str, Any]:
    """The JSON record of one input (see line_of for results that are not JSON)."""
    record: dict[str, Any] = {"input": outcome.input, "ok": outcome.ok}
    if outcome.ok:
        record["result"] = outcome.value
    else:
        record["error"] = error_of(outcome.error)
    record["attempts"] = outcome.attempts
    record["seconds"] = round(outcome.seconds, 6)
    record["worker"] = outcome.pid
    return record


def _arguments(item: Any) -> tuple[str, ...]:
    """The arguments an input gives the function: a combination of several input sources
    (or columns) is a tuple of them."""
    return item if isinstance(item, tuple) else (str(item),)


def dry_run_text(item: Any) -> str:
    """An input as --dry-run shows it, on one line: each argument quoted as a shell would need
    it (shlex.quote: ['b c', '1'] is `'b c' 1`, as GNU parallel's dry run writes it), one
    holding a newline or another control character in bash's $'...' form, so that every
    call stays on a line of its own."""
    return " ".join(map(_shell_word, _arguments(item)))


def _shell_word(text: str) -> str:
    if text.isprintable():
        return shlex.quote(text)
    return _dollar_quoted(text)


def _logged_word(text: str) -> str:
    """An argument in the joblog's Command: as _shell_word, but a byte that is not UTF-8
    (surrogateescape: a file name from find) stays that byte, inside the quotes, as GNU
    parallel logs it; the log is written as bytes (OpenedAtFirstWrite)."""
    if all(c.isprintable() or _is_raw_byte(c) for c in text):
        return shlex.quote(text)
    return _dollar_quoted(text)


def _is_raw_byte(char: str) -> bool:
    return 0xDC80 <= ord(char) <= 0xDCFF


def _dollar_quoted(text: str) -> str:
    escaped = "".join(_C_ESCAPES.get(c, c if c.isprintable() else _hex_escape(c))
                      for c in text)
    return f"$'{escaped}'"


_C_ESCAPES = {"\\": "\\\\", "'": "\\'", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _hex_escape(char: str) -> str:
    code = ord(char)
    if _is_raw_byte(char):  # a byte that is not UTF-8 (surrogateescape): that byte
        code -= 0xDC00
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 \
        else f"\\U{code:08x}"


def line_of(record: dict[str, Any]) -> str:
    """The record as one JSON line.  A result that is not JSON-serialisable (NaN and infinity
    included: strict JSON has no such numbers) becomes that input's error (the record is
    changed in place), never a crash of the run.  numpy scalars and arrays (anything with a
    dtype and tolist()) are written as the numbers and lists they hold."""
    try:
        return json.dumps(record, allow_nan=False, default=_numpy_as_plain)
    except (TypeError, ValueError, OverflowError) as exc:
        value = record.pop("result", None)
        record["ok"] = False
        after = {key: record.pop(key) for key in ("attempts", "seconds", "worker")
                 if key in record}  # "error" goes where "result" was, as in every record
        record["error"] = {
            "type": "ResultNotJSONSerializable",
            "message": f"the result of type {type(value).__qualname__} is not "
                       f"JSON-serialisable: {exc}",
            "traceback": "",
        }
        record.update(after)
        return json.dumps(record, default=repr)


def _numpy_as_plain(value: Any) -> Any:
    """json's fallback for a value it cannot write: numpy's int64, float32, bool_ and arrays
    (without importing numpy) become Python numbers and lists; anything else stays an error."""
    if hasattr(value, "dtype") and callable(getattr(value, "tolist", None)):
        return value.tolist()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def error_of(error: BaseException | None) -> dict[str, Any]:
    if error is None:
        return {"type": "UnknownError", "message": "", "traceback": ""}
    cause = error.__cause__
    traceback = ""
    if isinstance(cause, procqueue.RemoteTraceback):  # procqueue's keep the bare text apart
        traceback = getattr(cause, "tb_text", None) or str(getattr(cause, "tb", ""))
    if not traceback and isinstance(error, procqueue.RemoteError):
        traceback = error.traceback_text
    message = getattr(error, "message", None) if isinstance(error, procqueue.TaskFailed) \
        else None
    if isinstance(error, procqueue.WorkerCrashedError):
        message = str(error)  # names the pid, exit code or signal
    elif isinstance(error, procqueue.RemoteError):
        message = error.remote_message  # what the task raised, without its type name again
    return {"type": _type_name(error), "message": message or str(error),
            "traceback": traceback}


def _type_name(error: BaseException) -> str:
    if isinstance(error, procqueue.RemoteError):
        return error.type_name
    cls = type(error)
    # (a script's own classes: the private name it is imported under says nothing)
    return cls.__qualname__ if cls.__module__ in ("builtins", "__main__") or \
        cls.__module__.startswith(("procqueue", "_procqueue_script_")) \
        else f"{cls.__module__}.{cls.__qualname__}"


FLUSH_INTERVAL_S = 0.1  # a written record reaches the file within about this time


class OpenedAtFirstWrite:
    """An output file opened (truncated, or appended to) at its first write, not before: a
    run that ends before any input ran (the script does not load in the workers, Ctrl-C at
    the start) leaves the file of an earlier run as it was.  The path was checked writable
    before the run (main._check_writable); an error opening it now is the first write's.
    Text that came from bytes (a file name, a line of input that is not UTF-8) is written as
    those bytes (surrogateescape), as GNU parallel writes them.  Appended to, a last line cut
    short by a run that was killed or met a full disk is dropped first, so that the lines
    appended start on lines of their own."""

    def __init__(self, path: str, append: bool = False) -> None:
        self.path = path
        self.append = append
        self._stream: TextIO | None = None

    def _opened(self) -> TextIO:
        if self._stream is None:
            if self.append:
                _drop_cut_last_line(self.path)
            self._stream = open(self.path, "a" if self.append else "w", encoding="utf-8",
                                errors="surrogateescape")
        return self._stream

    def write(self, text: str) -> int:
        return self._opened().write(text)

    def flush(self) -> None:
        if self._stream is not None:
            self._stream.flush()

    def tell(self) -> int:
        return self._opened().tell()

    def isatty(self) -> bool:
        return False

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()


def _drop_cut_last_line(path: str) -> None:
    """Truncate the file after its last newline (none: the file was not there)."""
    try:
        with open(path, "rb+") as file:
            end = file.seek(0, os.SEEK_END)
            start = max(end - 65536, 0)
            while end > 0:
                file.seek(start)
                newline = file.read(end - start).rfind(b"\n")
                if newline >= 0 or start == 0:
                    file.truncate(start + newline + 1)
                    return
                end, start = start, max(start - 65536, 0)
    except FileNotFoundError:
        pass


class LineWriter:
    """Writes whole lines to a stream.  A flush per line costs the CPU the workers need when
    tasks are tiny, so a line is flushed at once only if the previous flush is
    FLUSH_INTERVAL_S old; otherwise a background thread flushes it within FLUSH_INTERVAL_S,
    so the last line before a long task does not wait for the next one (and a run killed
    with SIGKILL leaves all but its last ~0.1 s on disk).  The lines wait here, not in the
    stream's buffer, which may write each through at once (PYTHONUNBUFFERED=1, common in
    containers: a write(2) per record, 200,000 records 3.2 s against 1.9).  A write error met
    by that thread (a closed pipe) is raised by the next write() or by close().
    A writer that `follows` another writes its lines only after the other's lines written
    before them are out, and never once the other failed (a joblog line says its record is
    out: --resume skips its input)."""

    def __init__(self, stream: TextIO, interval_s: float = FLUSH_INTERVAL_S,
                 before_write: Callable[[], None] | None = None) -> None:
        self.stream = stream
        self._interval_s = interval_s
        # A terminal shared with the progress bar: clear it, then show each line at once.
        self._before_write = before_write
        self._lock = threading.Lock()  # one of write_line() and the flusher at a time
        self._lines: list[str] = []  # written, not yet handed to the stream
        # time.monotonic() of the last flush; -inf so the first line is flushed at once even
        # when the clock (uptime on Linux) is younger than the interval
        self._flushed_at = float("-inf")
        self._error: OSError | None = None
        self.failed = False  # a write or flush failed: what it held may not be out
        self._done = False  # closed: every line is out (or failed), the stream may be closed
        self.follows: LineWriter | None = None
        self._closed = threading.Event()
        # Started by the first line left unflushed, not here: the pool made after this
        # writer forks its fork server from the program only while it has one thread.
        self._flusher: threading.Thread | None = None

    def write_line(self, line: str) -> None:
        """`line` ends with a newline."""
        with self._lock:
            self._raise_pending()
            if self._before_write is not None:
                self._before_write()
            self._lines.append(line)
            if self._before_write is not None \
                    or time.monotonic() - self._flushed_at >= self._interval_s:
                self._flush()
            elif self._flusher is None:
                self._flusher = threading.Thread(target=self._flush_periodically, daemon=True,
                                                 name="procqueue-cli-flush")
                self._flusher.start()

    def close(self) -> None:
        """Stop the flusher and flush the rest (the stream itself stays open)."""
        self._closed.set()
        if self._flusher is not None:
            self._flusher.join()
        with self._lock:
            self._raise_pending()
            self._flush()
            self._done = True

    def _flush_periodically(self) -> None:
        while not self._closed.wait(self._interval_s):
            with self._lock:
                if not self._lines or self._error is not None:
                    continue
                try:
                    self._flush()
                except OSError as exc:
                    self._error = exc

    def flush_before_follower(self) -> bool:
        """Flush what this writer holds, for a writer that `follows` it; False if it cannot be
        out (an error now or before, raised by this writer's next write or its close)."""
        with self._lock:
            if not self.failed and not self._done:
                try:
                    self._flush()
                except OSError as exc:
                    self._error = self._error or exc
            return not self.failed

    def _flush(self) -> None:  # with self._lock held
        if self.follows is not None and not self.follows.flush_before_follower():
            self._lines.clear()  # what they follow is not out: never say it is
            return
        lines, self._lines = self._lines, []
        self._flushed_at = time.monotonic()
        try:
            if lines:
                self.stream.write("".join(lines))
            self.stream.flush()
        except OSError:
            self.failed = True
            raise

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error


class RecordWriter(LineWriter):
    """Writes records as JSON Lines (line_of), flushed as LineWriter flushes."""

    def write(self, record: dict[str, Any]) -> None:
        self.write_line(line_of(record) + "\n")


class JobLog:
    """GNU parallel's --joblog: a tab-separated line per input that ran, in the order the
    records are written.  Exitval is 0 for a result, 1 for a raised exception (or a result the
    record could not hold), the code of a worker that exited or called sys.exit (1 for a
    message or none, as a shell's exit), 0 with Signal set for a worker killed by a signal (as
    parallel computes them from a wait status), -1 with Signal 15 for a timeout (parallel's
    kill); Command is the function and its arguments, quoted (joblog_command).  Inputs that
    never started have no line (parallel logs only jobs it ran), nor have those the run
    itself killed when it stopped (Ctrl-C, SIGTERM, a halt now: TaskCancelledError), as
    parallel does not log the jobs it kills so: --resume runs them again.  Lines are flushed
    as records are (LineWriter), each after its record (main.run: the log follows the
    records' writer), so a run killed with SIGKILL, or whose output failed, never logs an
    input whose record is not out."""

    HEADER = "Seq\tHost\tStarttime\tJobRuntime\tSend\tReceive\tExitval\tSignal\tCommand\n"

    def __init__(self, stream: TextIO, command: str, seqs: list[int] | None = None) -> None:
        if stream is sys.stdout and hasattr(stream, "reconfigure"):  # `--joblog -`
            stream.reconfigure(errors="surrogateescape")  # (records are ASCII: line_of)
        self.stream = stream
        self.command = command
        self.seqs = seqs  # a resumed run: the Seq (position among all inputs) of each input
        self.starts: dict[int, float] = {}  # input index -> wall start of its last attempt
        self.lines = LineWriter(stream)
        self._headed = False  # the header is written with the first line (OpenedAtFirstWrite)
        self._closed = False

    def on_event(self, event: procqueue.TaskEvent) -> None:
        """Pool(on_event=...): called in the supervisor thread before the outcome is out."""
        self.starts[event.index] = event.start_s

    def write(self, outcome: procqueue.TaskOutcome, recorded_ok: bool | None = None) -> None:
        """The line of `outcome`; `recorded_ok` is what its record says (a result that is not
        JSON made the record an error: the log must say so too, or --resume-failed would
        skip that input)."""
        if outcome.attempts == 0 or isinstance(outcome.error, procqueue.TaskCancelledError) \
                or procqueue.is_retry_stopped(outcome.error):
            self.starts.pop(outcome.index, None)
            # never ran, killed by the run's own stop, or stopped before its retry: --resume
            # runs it again
            return
        now = time.time()
        start = self.starts.pop(outcome.index, now - outcome.seconds)
        # A task that ends without a run time of its own: its time until it ended
        runtime = outcome.seconds or max(now - start, 0.0)
        exitval, signal_number = _exit_fields(outcome)
        if recorded_ok is False and outcome.ok:
            exitval = 1
        command = joblog_command(self.command, outcome.input)
        seq = self.seqs[outcome.index] if self.seqs is not None else outcome.index + 1
        if not self._headed:
            self._headed = True
            if self.stream is sys.stdout or _empty(self.stream):  # a resumed file is appended to
                self.lines.write_line(self.HEADER)
        self.lines.write_line(f"{seq}\t:\t{start:.3f}\t{runtime:8.3f}\t0\t0\t"
                              f"{exitval}\t{signal_number}\t{command}\n")

    def close(self) -> None:
        """Flush what is logged and close the log's stream (not stdout's: `--joblog -`); a
        second call does nothing."""
        if self._closed:
            return
        self._closed = True
        try:
            self.lines.close()
        finally:
            if self.stream is not sys.stdout:
                self.stream.close()


def _empty(stream: TextIO) -> bool:
    try:
        return stream.tell() == 0
    except OSError:  # not seekable: a pipe, /dev/stderr
        return True


def joblog_command(command: str, item: Any) -> str:
    """The Command column of `item`'s line: the function and the input's arguments, each
    quoted as --dry-run quotes it (`process 'a b' c`, as GNU parallel logs its commands), so
    that --resume sees where one argument ends: `'a b' c` is not `a 'b c'`.  A tab or a
    newline is written $'\t', keeping the line and its fields whole."""
    return f"{command} {' '.join(map(_logged_word, _arguments(item)))}"


def unquoted_joblog_command(command: str, item: Any) -> str:
    """The Command column as procqueue wrote it before it quoted the arguments: joined by
    spaces, a tab or a newline made a space.  --resume still accepts it for the same inputs,
    so that a log written then resumes (it cannot tell `a b` and `c` from `a` and `b c`)."""
    return f"{command} {' '.join(_arguments(item))}".replace("\t", " ").replace("\n", " ")


class LoggedJob(NamedTuple):
    """A line of a --joblog written by an earlier run."""

    seq: int  # position of the input among all the inputs, from 1
    ok: bool  # Exitval and Signal 0
    command: str  # the function and the input (joblog_command)


def logged_jobs(path: str) -> list[LoggedJob]:
    """The lines of a --joblog written by an earlier run, as GNU parallel's --resume reads
    them.  No file yet: none."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape",
                  newline="\n") as f:  # (a \r stays in its Command)
            # after the header; the last is empty, or a line cut short (a run killed, a
            # full disk): its input is not logged, and the line is dropped before appending
            lines = f.read().split("\n")[1:-1]
    except FileNotFoundError:
        return []
    jobs = []
    for line in lines:
        fields = line.split("\t")
        try:
            seq, exitval, signal_number = int(fields[0]), int(fields[6]), int(fields[7])
        except (IndexError, ValueError):
            continue  # not a job's line
        jobs.append(LoggedJob(seq, exitval == 0 and signal_number == 0,
                              "\t".join(fields[8:])))
    return jobs


def _exit_fields(outcome: procqueue.TaskOutcome) -> tuple[int, int]:
    error = outcome.error
    if outcome.ok:
        return 0, 0
    if isinstance(error, procqueue.WorkerCrashedError) and error.exitcode is not None:
        return (0, -error.exitcode) if error.exitcode < 0 else (error.exitcode, 0)
    if isinstance(error, procqueue.WorkerExitedError):
        code = error.code
        return (code if isinstance(code, int) and code > 0 else 1), 0
    if isinstance(error, procqueue.TaskTimeoutError):
        return -1, 15  # killed by --timeout, as parallel logs its kills
    return 1, 0


class ForgivingStderr:
    """The command's sys.stderr: a message that cannot be written (the terminal went away
    with a SIGHUP, the `tee` of `2>&1 | tee log` died at the Ctrl-C, the reader of --bar
    closed its end) is dropped, and so is every later one, instead of failing the run: its
    records and its exit code are what count.  Notes written in signal handlers, the progress
    bar, warnings and error messages all go through it (click.echo(err=True) too)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.failed = False  # a write failed: nothing more is written

    @property
    def encoding(self) -> str:
        return self.stream.encoding

    @property
    def errors(self) -> str | None:
        return self.stream.errors

    def write(self, text: str) -> int:
        if not self.failed:
            try:
                self.stream.write(text)
            except (OSError, ValueError):  # EIO, EPIPE; ValueError: closed
                self.failed = True
        return len(text)

    def flush(self) -> None:
        if not self.failed:
            try:
                self.stream.flush()
            except (OSError, ValueError):
                self.failed = True

    def isatty(self) -> bool:
        try:
            return not self.failed and self.stream.isatty()
        except (OSError, ValueError):
            return False

    def fileno(self) -> int:
        return self.stream.fileno()

    def writable(self) -> bool:
        return True

    @property
    def closed(self) -> bool:
        return False


def forgiving_stderr() -> None:
    """Make sys.stderr a ForgivingStderr.  A program started with stderr closed (`2>&-`, a
    daemon's; sys.stderr is None) writes its messages to /dev/null instead, put on file
    descriptor 2 first, so that no file the run opens later takes that number (what the
    workers would write to stderr would land in it)."""
    stream = sys.stderr
    if stream is None:
        stream = _devnull_as_stderr()
    if not isinstance(stream, ForgivingStderr):
        sys.stderr = ForgivingStderr(stream)  # type: ignore[assignment]


def _devnull_as_stderr() -> TextIO:
    try:
        os.fstat(2)
    except OSError:  # closed: /dev/null takes its place
        fd = os.open(os.devnull, os.O_WRONLY)
        if fd != 2:
            os.dup2(fd, 2)
            os.close(fd)
        return open(2, "w", closefd=False)
    return open(os.devnull, "w")  # (descriptor 2 is open, but not as sys.stderr)
