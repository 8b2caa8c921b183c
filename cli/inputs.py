"""The inputs of a run: files of directories (recursively, sorted), files, stdin lines, and
GNU parallel's `::: literal inputs` and `:::: files of inputs`."""

from __future__ import annotations

import fnmatch
import io
import itertools
import os
import re
import select
import sys
import time
from typing import Any, Callable, Iterable, Iterator, TextIO

import click


# One input source: strings; several (GNU parallel's ::: a b ::: 1 2): their combinations.
Inputs = list[str] | list[tuple[str, ...]]
Row = tuple[str, ...]  # one combination: an argument per source (or column)


# A run whose inputs are stdin's lines alone waits this long for stdin to end; if it has not,
# the run starts on the lines that came and takes the others as they come (GNU parallel's
# way with `tail -f log | parallel ...`), its inputs not counted beforehand.
STDIN_END_WAIT_S = 0.2


class InputError(click.ClickException):
    """An input path that does not exist, or inputs that cannot be read or split (exit code 2)."""

    exit_code = 2


def collect_inputs(inputs: Iterable[str], glob: str | None = None,
                   lines_file: str | None = None, stdin: TextIO | None = None,
                   null: bool = False, colsep: str | None = None, link: bool = False,
                   unreadable: list[str] | None = None, trim: str | None = None) -> Inputs:
    """Every input item, in order: a directory gives its files (recursively, sorted, filtered
    by `glob`), a file gives itself, '-' gives stdin's lines, and `lines_file` the lines of
    that file.  After ':::' the specs are inputs themselves, after '::::' files of inputs, as
    in GNU parallel.  With `null`, stdin and files of inputs hold NUL-separated items (`find
    -print0`), kept exactly, newlines included.

    As in GNU parallel, each ':::' or '::::' starts another input source, and several
    sources give every combination of their inputs (the first source varies slowest), as
    tuples: `::: a b ::: 1 2` is ('a', '1'), ('a', '2'), ('b', '1'), ('b', '2').  ':::+'
    and '::::+' link a source to the one before instead: their inputs pair up one to one, as
    many as the shorter source has; `link` (GNU parallel's --link) links every source so, a
    shorter source wrapping around.
    One source gives its items as strings.

    With `colsep` (a regular expression, GNU parallel's --colsep), every input is a row of
    columns split at it, and the function gets one argument per column (of every source).
    `trim` (GNU parallel's --trim: see TRIMS) strips whitespace around every argument (each
    column); None is parallel's default: "rl" with `colsep`, "n" without.

    A directory that cannot be read (as find, this is said on stderr) is added to
    `unreadable`: its files are not inputs, and the command must not end as if all were."""
    sources, linked = _gather_sources(inputs, glob, lines_file, stdin, null, link, unreadable)
    if len(sources) == 1 and colsep is None:
        strip = _trimmer(trim_of(trim, colsep))
        return sources[0] if strip is None else [strip(item) for item in sources[0]]
    split = _column_splitter(colsep, trim)
    return _combinations([[split(item) for item in source] for source in sources], linked,
                         wrap=link)


def _gather_sources(inputs: Iterable[str], glob: str | None, lines_file: str | None,
                    stdin: TextIO | None, null: bool, link: bool,
                    unreadable: list[str] | None = None
                    ) -> tuple[list[list[str]], list[bool]]:
    """The input sources (see collect_inputs), and which are linked to the one before.  Each
    file after '::::' is a source of its own, as in GNU parallel (`:::: f1 f2` combines them;
    after '::::+' each is linked to the one before).  Blank lines of stdin and of files of
    inputs are skipped, except in linked sources: there each line is kept (a blank one as an
    empty input), so that line i of one source stays paired with line i of the other."""
    sources: list[list[str]] = [[]]  # the first: INPUT paths, stdin, --lines
    linked = [False]
    lined = [True]  # holds lines of stdin or of files (not ::: words, kept as they are)
    mode = "paths"
    files = 0  # files of inputs after the last '::::'
    for spec in inputs:
        if spec in SEPARATORS:
            mode = "literal" if spec.rstrip("+") == LITERALS else "arg-files"
            sources.append([])
            linked.append(spec.endswith("+"))
            lined.append(mode == "arg-files")
            files = 0
        elif mode == "literal":
            sources[-1].append(spec)
        elif mode == "arg-files":
            if files:  # another file: another source, linked as the first after '::::+'
                sources.append([])
                linked.append(linked[-1])
                lined.append(True)
            files += 1
            sources[-1] += _lines_of(spec, null, stdin)
        elif spec == "-":
            sources[-1] += _items(stdin or sys.stdin, null)
        elif os.path.isdir(spec):
            sources[-1] += _files_under(spec, glob, unreadable)
        elif os.path.exists(spec):
            sources[-1].append(spec)
        else:
            raise InputError(f"input not found: {spec!r}")
    if lines_file is not None:
        sources[0] += _lines_of(lines_file, null, stdin, what="--lines file")
    if not any(map(str.strip, sources[0])) and len(sources) > 1:  # only ::: / :::: sources
        del sources[0], linked[0], lined[0]
    if link:
        linked = [False] + [True] * (len(sources) - 1)
    in_link = [here or (i + 1 < len(linked) and linked[i + 1]) for i, here in enumerate(linked)]
    sources = [[item for item in source if item.strip()] if lines and not kept else source
               for source, lines, kept in zip(sources, lined, in_link)]
    return sources, linked


def collect_named_inputs(inputs: Iterable[str], glob: str | None = None,
                         lines_file: str | None = None, stdin: TextIO | None = None,
                         null: bool = False, colsep: str | None = None, link: bool = False,
                         unreadable: list[str] | None = None, trim: str | None = None
                         ) -> tuple[list[Row], tuple[str, ...]]:
    """GNU parallel's --header: the first input of each source is its header, split into
    column names at `colsep` (a tab by default, as parallel's); the rows are the other
    inputs, combined as collect_inputs does, and the names are one per column, in order, for
    the function's keyword arguments.  The names are trimmed as the columns are (`trim`, as
    collect_inputs'): ` name , size ` names `name` and `size` under --colsep ,."""
    sources, linked = _gather_sources(inputs, glob, lines_file, stdin, null, link, unreadable)
    # (the default trim follows the --colsep given, not the tab that splits without one)
    split = _column_splitter(colsep if colsep is not None else "\t", trim_of(trim, colsep))
    names: list[str] = []
    for number, source in enumerate(sources, 1):
        if not source:
            raise InputError(f"--header: input source {number} is empty: it has no header")
        names += split(source[0])
    for name in names:
        if not name.isidentifier():
            raise InputError(f"--header: column name {name!r} is not a Python identifier, "
                             f"so it cannot name a keyword argument")
    if len(set(names)) != len(names):
        raise InputError(f"--header: column names repeat: {', '.join(names)}")
    rows = _combinations([[split(item) for item in source[1:]] for source in sources], linked,
                         wrap=link)
    return rows, tuple(names)


def group_inputs(items: Inputs, n: int) -> list[Row]:
    """GNU parallel's -N: every n consecutive inputs make one call's arguments (the last
    call gets what is left); an input that is already several arguments gives them all."""
    rows = [item if isinstance(item, tuple) else (item,) for item in items]
    return [sum(rows[start:start + n], ()) for start in range(0, len(rows), n)]


# GNU parallel's --trim: which ends of each argument lose their whitespace
TRIMS = {"n": None, "l": str.lstrip, "r": str.rstrip, "lr": str.strip, "rl": str.strip}


def trim_of(trim: str | None, colsep: str | None) -> str:
    """The --trim in force: the one given, else GNU parallel's default, "rl" with --colsep
    (its man page: --colsep implies --trim rl; `a, b` is 'a' and 'b'), "n" without."""
    if trim is not None:
        return trim
    return "rl" if colsep is not None else "n"


def _trimmer(trim: str) -> Callable[[str], str] | None:
    if trim not in TRIMS:
        raise InputError(f"--trim {trim!r}: give one of {', '.join(TRIMS)}")
    return TRIMS[trim]


def _column_splitter(colsep: str | None, trim: str | None = None
                     ) -> Callable[[str], tuple[str, ...]]:
    strip = _trimmer(trim_of(trim, colsep))
    if colsep is None:
        return (lambda item: (item,)) if strip is None else (lambda item: (strip(item),))
    try:
        pattern = re.compile(colsep)
    except re.error as exc:
        raise InputError(f"--colsep {colsep!r} is not a regular expression: {exc}") from None
    if strip is None:
        return lambda item: tuple(pattern.split(item))
    return lambda item: tuple(map(strip, pattern.split(item)))


def _combinations(sources: list[list[Row]], linked: list[bool], wrap: bool = False
                  ) -> list[Row]:
    groups: list[list[list[Row]]] = []  # sources linked together
    for source, link in zip(sources, linked):
        if link and groups:
            groups[-1].append(source)
        else:
            groups.append([source])
    rows = [_linked_rows(group, wrap) for group in groups]
    return [sum(parts, ()) for parts in itertools.product(*rows)]


def _linked_rows(group: list[list[Row]], wrap: bool) -> list[Row]:
    """Linked sources' rows, one to one.  As in GNU parallel, the shortest source decides
    how many (:::+, ::::+), or, with `wrap` (--link), the longest, the shorter ones starting
    over."""
    if not all(group):
        return []  # an empty source: no combination
    n = (max if wrap else min)(len(source) for source in group)
    return [sum((source[i % len(source)] for source in group), ()) for i in range(n)]


LITERALS = ":::"  # what follows are the inputs themselves, not paths (GNU parallel)
ARG_FILES = "::::"  # what follows are files of inputs, one per line (GNU parallel)
# each starts another input source; with '+', one linked to the source before it
SEPARATORS = (LITERALS, ARG_FILES, LITERALS + "+", ARG_FILES + "+")


def _lines_of(path: str, null: bool, stdin: TextIO | None,
              what: str = "file of inputs") -> list[str]:
    if path == "-":
        return _items(stdin or sys.stdin, null)
    try:
        # surrogateescape: a name that is not UTF-8 (find's output) passes through as on stdin
        with open(path, encoding="utf-8", errors="surrogateescape",
                  newline="" if null else None) as f:
            return _items(f, null)
    except OSError as exc:
        raise InputError(f"cannot read {what} {path!r}: {exc.strerror}") from None


def _items(stream: TextIO, null: bool) -> list[str]:
    """The inputs of a stream: NUL-separated ones (empty ones skipped), or every line, blank
    ones too (_gather_sources skips those where no source is linked)."""
    if null:
        return [item for item in stream.read().split("\0") if item]
    return [line.rstrip("\r\n") for line in stream]


def _lines(stream: Iterable[str]) -> Iterator[str]:
    """A stream's non-blank lines, without their line endings, as they are read."""
    return (line.rstrip("\r\n") for line in stream if line.strip())


def _files_under(directory: str, glob: str | None,
                 unreadable: list[str] | None = None) -> list[str]:
    found = []

    def cannot_read(error: OSError) -> None:
        path = error.filename or directory
        click.echo(f"procqueue: cannot read directory {path!r}: {error.strerror}", err=True)
        if unreadable is not None:
            unreadable.append(path)

    for root, dirs, files in os.walk(directory, onerror=cannot_read):
        dirs.sort()
        for name in files:
            path = os.path.join(root, name)
            if glob is None or fnmatch.fnmatch(name, glob) \
                    or fnmatch.fnmatch(os.path.relpath(path, directory), glob):
                found.append(path)
    # Component by component, as Path(...).parts would sort them, for a fraction of the cost
    # (20 -> 3 ms for 2,000 files, before the first worker can start).
    return sorted(found, key=lambda p: p.split(os.sep))


class StreamedInputs:
    """stdin's inputs as they come, for a run that starts before stdin ends: `first` (the first
    input, already read: the run's arity check looks at it) and the rest, read as the run takes
    them.  Iterated once."""

    def __init__(self, first: str | Row, rest: Iterator[str | Row]) -> None:
        self.first = first
        self._rest = rest

    def __iter__(self) -> Iterator[str | Row]:
        yield self.first
        yield from self._rest


def stdin_inputs(stdin: TextIO | None = None, colsep: str | None = None,
                 wait_s: float = STDIN_END_WAIT_S, trim: str | None = None
                 ) -> Inputs | StreamedInputs:
    """stdin's lines as inputs (as collect_inputs(['-']) gives them): all of them if stdin ends
    within `wait_s` (a finished command's output, a file), else StreamedInputs, its first input
    waited for (a producer that is still writing: the run starts on what came).  An empty stdin
    gives no inputs.  A stream without a file descriptor (a test's) is read to its end."""
    stream = stdin or sys.stdin
    try:
        fd = stream.fileno()
    except (OSError, ValueError, io.UnsupportedOperation):
        return collect_inputs(["-"], stdin=stream, colsep=colsep, trim=trim)
    head, ended = _read_for(fd, wait_s)
    text = io.TextIOWrapper(io.BufferedReader(_FdAfter(head, None if ended else fd)),
                            encoding=stream.encoding, errors=stream.errors)
    if ended:
        return collect_inputs(["-"], stdin=text, colsep=colsep, trim=trim)
    strip = _trimmer(trim_of(trim, colsep))
    lines: Iterator[str | Row]
    if colsep is not None:
        lines = map(_column_splitter(colsep, trim), _lines(text))
    else:
        lines = _lines(text) if strip is None else map(strip, _lines(text))
    first = next(lines, None)
    if first is None:
        return []
    return StreamedInputs(first, lines)


def _read_for(fd: int, wait_s: float) -> tuple[bytes, bool]:
    """What `fd` gives within `wait_s` (without waiting once it is at its end), and whether it
    ended."""
    data = bytearray()
    deadline = time.monotonic() + wait_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return bytes(data), False
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return bytes(data), True
        data += chunk


class _FdAfter(io.RawIOBase):
    """Bytes already read, then the rest of a file descriptor (None: nothing more)."""

    def __init__(self, head: bytes, fd: int | None) -> None:
        self._head = memoryview(head)
        self._fd = fd

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:  # a writable buffer (bytearray, memoryview)
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        if self._fd is None:
            return 0
        data = os.read(self._fd, len(buffer))
        buffer[:len(data)] = data
        return len(data)
