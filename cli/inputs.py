"""The inputs of a run: files of directories (recursively, sorted), files, stdin lines, and
GNU parallel's `::: literal inputs` and `:::: files of inputs`."""

from __future__ import annotations

import fnmatch
import os
import sys
from pathlib import Path
from typing import Iterable, TextIO

import click


class InputError(click.ClickException):
    """An input path that does not exist (exit code 2)."""

    exit_code = 2


def collect_inputs(inputs: Iterable[str], glob: str | None = None,
                   lines_file: str | None = None, stdin: TextIO | None = None,
                   null: bool = False) -> list[str]:
    """Every input item, as a string, in order: a directory gives its files (recursively,
    sorted, filtered by `glob`), a file gives itself, '-' gives stdin's lines, and
    `lines_file` the lines of that file.  After ':::' the specs are inputs themselves, after
    '::::' files of inputs, as in GNU parallel.  With `null`, stdin and files of inputs hold
    NUL-separated items (`find -print0`), kept exactly, newlines included."""
    items: list[str] = []
    mode = "paths"  # GNU parallel's separators switch it: ':::' literal inputs, '::::' files
    for spec in inputs:
        if spec in (LITERALS, ARG_FILES):
            mode = "literal" if spec == LITERALS else "arg-files"
        elif mode == "literal":
            items.append(spec)
        elif mode == "arg-files":
            items += _lines_of(spec, null, stdin)
        elif spec == "-":
            items += _items(stdin or sys.stdin, null)
        elif os.path.isdir(spec):
            items += _files_under(spec, glob)
        elif os.path.exists(spec):
            items.append(spec)
        else:
            raise InputError(f"input not found: {spec!r}")
    if lines_file is not None:
        items += _lines_of(lines_file, null, stdin, what="--lines file")
    return items


LITERALS = ":::"  # what follows are the inputs themselves, not paths (GNU parallel)
ARG_FILES = "::::"  # what follows are files of inputs, one per line (GNU parallel)


def _lines_of(path: str, null: bool, stdin: TextIO | None,
              what: str = "file of inputs") -> list[str]:
    if path == "-":
        return _items(stdin or sys.stdin, null)
    try:
        with open(path, encoding="utf-8", newline="" if null else None) as f:
            return _items(f, null)
    except OSError as exc:
        raise InputError(f"cannot read {what} {path!r}: {exc.strerror}") from None


def _items(stream: TextIO, null: bool) -> list[str]:
    if null:
        return [item for item in stream.read().split("\0") if item]
    return [line.rstrip("\r\n") for line in stream if line.strip()]


def _files_under(directory: str, glob: str | None) -> list[str]:
    found = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in files:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, directory)
            if glob is None or fnmatch.fnmatch(name, glob) or fnmatch.fnmatch(relative, glob):
                found.append(path)
    return sorted(found, key=lambda p: Path(p).parts)
