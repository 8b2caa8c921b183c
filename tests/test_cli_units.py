"""Pure parts of the CLI: input enumeration, script checks, records, halt policies."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading

import click
import pytest

import procqueue
from procqueue.cli.inputs import InputError, collect_inputs, collect_named_inputs, group_inputs
from procqueue.cli.main import JobsType, _parse_timeout, parse_halt
from procqueue import HaltPolicy
from procqueue.cli.output import line_of, record_of
from procqueue.cli.script import (ScriptError, ScriptFunction, check_arguments,
                                  check_keyword_arguments, resolve_script)


def test_directories_are_walked_recursively_and_sorted(tmp_path):
    for name in ["b.txt", "a.txt", "z/c.txt", "z/d.log", "y/e.txt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    found = collect_inputs([str(tmp_path)], glob="*.txt")
    assert [p[len(str(tmp_path)) + 1:] for p in found] == ["a.txt", "b.txt", "y/e.txt",
                                                            "z/c.txt"]


def test_stdin_and_lines_file(tmp_path):
    lines = tmp_path / "list"
    lines.write_text("one\n\ntwo\n")
    got = collect_inputs(["-"], lines_file=str(lines), stdin=io.StringIO("x\ny\n"))
    assert got == ["x", "y", "one", "two"]


def test_empty_and_whitespace_only_lines_are_skipped_as_the_readme_says(tmp_path):
    # GNU parallel runs them as inputs; the README says which are skipped here: keep it so
    table = tmp_path / "list"
    table.write_text("a\n\n  \n\t\nb\r\n\r\n")
    assert collect_inputs(["::::", str(table)]) == ["a", "b"]
    assert collect_inputs(["-"], stdin=io.StringIO("a\n \nb\n")) == ["a", "b"]
    assert collect_inputs(["-"], stdin=io.StringIO("a\0\0 \0b\0"), null=True) == ["a", "b"]
    assert collect_inputs([":::", "", " ", "x"]) == ["", " ", "x"]  # words are kept as given
    # linked sources keep them, so that line i stays paired with line i
    assert collect_inputs(["::::", str(table), "::::+", str(table)])[1:4] == [
        ("", ""), ("  ", "  "), ("\t", "\t")]


def test_gnu_parallel_separators_give_literal_inputs_and_files_of_inputs(tmp_path):
    (tmp_path / "list").write_text("one\n\ntwo\n")
    assert collect_inputs([":::", "a b", "no-such-path"]) == ["a b", "no-such-path"]
    assert collect_inputs(["::::", str(tmp_path / "list")]) == ["one", "two"]
    with pytest.raises(InputError, match="cannot read file of inputs"):
        collect_inputs(["::::", str(tmp_path / "missing")])


def test_several_input_sources_give_every_combination_as_gnu_parallel_does(tmp_path):
    # parallel echo ::: a b ::: 1 2  ->  a 1, a 2, b 1, b 2 (the first source varies slowest)
    (tmp_path / "f.txt").write_text("x")
    (tmp_path / "list").write_text("one\n\ntwo\n")
    assert collect_inputs([":::", "a", "b", ":::", "1", "2"]) == [
        ("a", "1"), ("a", "2"), ("b", "1"), ("b", "2")]
    got = collect_inputs([str(tmp_path / "f.txt"), ":::", "a", "::::", str(tmp_path / "list")])
    assert got == [(str(tmp_path / "f.txt"), "a", "one"), (str(tmp_path / "f.txt"), "a", "two")]
    assert collect_inputs([":::", "a", "b", ":::"]) == []  # an empty source: no combination


def test_linked_input_sources_pair_up_as_many_as_the_shorter_has():
    # parallel echo ::: a b c :::+ 1 2 3  ->  a 1, b 2, c 3
    assert collect_inputs([":::", "a", "b", "c", ":::+", "1", "2", "3"]) == [
        ("a", "1"), ("b", "2"), ("c", "3")]
    # parallel echo ::: a b c :::+ 1 2  ->  a 1, b 2 (no wrapping: that is --link's)
    assert collect_inputs([":::", "a", "b", "c", ":::+", "1", "2"]) == [
        ("a", "1"), ("b", "2")]
    assert collect_inputs([":::", "x", "y", ":::", "a", "b", ":::+", "1", "2"]) == [
        ("x", "a", "1"), ("x", "b", "2"), ("y", "a", "1"), ("y", "b", "2")]


def test_link_pairs_every_source_one_to_one_as_gnu_parallel_link():
    # parallel --link echo ::: a b c ::: 1 2  ->  a 1, b 2, c 1 (the shorter wraps around)
    assert collect_inputs([":::", "a", "b", "c", ":::", "1", "2"], link=True) == [
        ("a", "1"), ("b", "2"), ("c", "1")]
    assert collect_inputs([":::", "a", "b", ":::", "1", "2", ":::", "x", "y"], link=True) == [
        ("a", "1", "x"), ("b", "2", "y")]
    assert collect_inputs([":::", "a", "b"], link=True) == ["a", "b"]


def test_header_names_the_columns_of_every_source_as_gnu_parallel_header(tmp_path):
    # parallel --header : --colsep , echo {name} {size} {unit} :::: table.csv ::: unit kg g
    (tmp_path / "table.csv").write_text("name,size\nalpha,3\nbeta,5\n")
    rows, names = collect_named_inputs(["::::", str(tmp_path / "table.csv"), ":::", "unit",
                                        "kg", "g"], colsep=",")
    assert names == ("name", "size", "unit")
    assert rows == [("alpha", "3", "kg"), ("alpha", "3", "g"), ("beta", "5", "kg"),
                    ("beta", "5", "g")]
    assert collect_named_inputs([":::", "a\tb", "1\t2"]) == ([("1", "2")], ("a", "b"))
    for inputs, message in [([":::", "not-a-name", "x"], "not a Python identifier"),
                            ([":::", "a,a", "1,2"], "repeat"),
                            ([":::", "a", ":::"], "source 2 is empty")]:
        with pytest.raises(InputError, match=message):
            collect_named_inputs(inputs, colsep=",")


def test_header_columns_must_fit_the_functions_keyword_arguments(tmp_path):
    script = tmp_path / "job.py"
    script.write_text("def both(name, size):\n    pass\n"
                      "def extra(name, size, *, unit='kg', **more):\n    pass\n"
                      "def strict(name):\n    pass\n"
                      "def needs(name, size, unit):\n    pass\n"
                      "def positional(a, /, name, size):\n    pass\n"
                      "def defaulted(a=0, /, *, name, size):\n    pass\n")
    names = ("name", "size")
    check_keyword_arguments(resolve_script(str(script), "both"), names)
    check_keyword_arguments(resolve_script(str(script), "extra"), names)
    with pytest.raises(ScriptError, match="takes no 'size'"):
        check_keyword_arguments(resolve_script(str(script), "strict"), names)
    with pytest.raises(ScriptError, match="needs 'unit'"):
        check_keyword_arguments(resolve_script(str(script), "needs"), names)
    with pytest.raises(ScriptError, match="needs 'a'"):
        check_keyword_arguments(resolve_script(str(script), "positional"), names)
    check_keyword_arguments(resolve_script(str(script), "defaulted"), names)


def test_max_args_groups_consecutive_inputs_and_keeps_columns_together():
    assert group_inputs(["a", "b", "c", "d", "e"], 2) == [("a", "b"), ("c", "d"), ("e",)]
    assert group_inputs(["a", "b"], 5) == [("a", "b")]
    assert group_inputs([("a", "1"), ("b", "2"), ("c", "3")], 2) == [
        ("a", "1", "b", "2"), ("c", "3")]
    assert group_inputs([], 3) == []


def test_colsep_splits_every_input_into_columns_as_gnu_parallel_does(tmp_path):
    # parallel --colsep , echo {2} {1} :::: pairs.csv
    (tmp_path / "pairs.csv").write_text("a,1\nb,2,extra\n")
    assert collect_inputs(["::::", str(tmp_path / "pairs.csv")], colsep=",") == [
        ("a", "1"), ("b", "2", "extra")]
    assert collect_inputs([":::", "x y", "z", ":::", "1\t2"], colsep=r"\s+") == [
        ("x", "y", "1", "2"), ("z", "1", "2")]  # the columns of each source, in order
    assert collect_inputs([":::", "a;b", ":::+", "1"], colsep=";") == [("a", "b", "1")]
    with pytest.raises(InputError, match="not a regular expression") as info:
        collect_inputs([":::", "a"], colsep="(")
    assert info.value.exit_code == 2


def test_colsep_trims_each_column_as_gnu_parallels_trim_rl_unless_trim_says_otherwise(tmp_path):
    # parallel --colsep , echo '[{1}]' '[{2}]' :::: spaced.csv  ->  [foo] [1], [bar] [2]
    (tmp_path / "spaced.csv").write_text("foo, 1\nbar ,\t2 \n")
    table = ["::::", str(tmp_path / "spaced.csv")]
    assert collect_inputs(table, colsep=",") == [("foo", "1"), ("bar", "2")]
    assert collect_inputs(table, colsep=",", trim="n") == [("foo", " 1"), ("bar ", "\t2 ")]
    assert collect_inputs(table, colsep=",", trim="l") == [("foo", "1"), ("bar ", "2 ")]
    assert collect_inputs(table, colsep=",", trim="r") == [("foo", " 1"), ("bar", "\t2")]
    # without --colsep nothing is trimmed, unless --trim says so (every argument then)
    assert collect_inputs([":::", " a "]) == [" a "]
    assert collect_inputs([":::", " a "], trim="lr") == ["a"]
    assert collect_inputs([":::", " a ", ":::", "b "], trim="rl") == [("a", "b")]


def test_header_names_are_trimmed_as_the_columns_are():
    rows, names = collect_named_inputs([":::", " name , size ", " ab , 2 "], colsep=",")
    assert names == ("name", "size") and rows == [("ab", "2")]
    with pytest.raises(InputError, match="' size' is not a Python identifier"):
        collect_named_inputs([":::", "name, size", "ab,2"], colsep=",", trim="n")


def test_null_separated_inputs_are_kept_exactly(tmp_path):
    (tmp_path / "list0").write_text("p\0q r\0")
    got = collect_inputs(["-"], null=True, stdin=io.StringIO("line\nbreak.txt\0 spaced \0\0"))
    assert got == ["line\nbreak.txt", " spaced "]
    assert collect_inputs(["::::", str(tmp_path / "list0")], null=True) == ["p", "q r"]


def test_missing_input_is_a_usage_error(tmp_path):
    with pytest.raises(InputError) as info:
        collect_inputs([str(tmp_path / "nope")])
    assert info.value.exit_code == 2


def test_script_is_checked_without_running_it(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("raise SystemExit('never run at check time')\n"
                      "def process(x):\n    return x\nhelper = lambda x: x\n")
    fn = resolve_script(str(script), None)
    assert fn == ScriptFunction("process", path=str(script.resolve()))
    with pytest.raises(ScriptError, match="helper, process"):
        resolve_script(str(script), "missing")


def test_script_function_loads_once_and_skips_main_block(tmp_path):
    script = tmp_path / "t.py"
    script.write_text("CALLS = []\ndef process(x):\n    CALLS.append(x)\n    return len(CALLS)\n"
                      "if __name__ == '__main__':\n    raise SystemExit('main ran')\n")
    fn = ScriptFunction("process", path=str(script))
    assert [fn("a"), fn("b")] == [1, 2]  # one module, imported once


@pytest.mark.parametrize("text,failed,succeeded,total,reached", [
    ("soon,fail=2", 1, 5, 10, False), ("soon,fail=2", 2, 0, 10, True),
    ("now,fail=10%", 1, 9, 20, False), ("now,fail=10%", 2, 0, 20, True),
    ("now,success=1", 3, 0, 10, False), ("now,success=1", 0, 1, 10, True),
    ("soon,success=50%", 0, 4, 10, False), ("soon,success=50%", 9, 5, 10, True),
    ("soon,done=3", 1, 1, 10, False), ("soon,done=3", 2, 1, 10, True),
    ("1", 0, 7, 10, False), ("1", 1, 0, 10, True), ("2", 1, 0, 10, True),
])
def test_halt_policy(text, failed, succeeded, total, reached):
    assert parse_halt(text).reached(failed, succeeded, total) is reached


def test_halt_percentages_become_counts_of_the_inputs():
    assert str(parse_halt("now,fail=10%").of_total(25)) == "now,fail=3"
    assert str(parse_halt("soon,success=1%").of_total(10)) == "soon,success=1"
    assert str(parse_halt("soon,done=4")) == "soon,done=4"


def test_gnu_parallel_numeric_halt_forms():
    assert HaltPolicy.parse("0") is None
    assert HaltPolicy.parse("1") == HaltPolicy(now=False, kind="fail", count=1)
    assert HaltPolicy.parse("2") == HaltPolicy(now=True, kind="fail", count=1)
    assert HaltPolicy.parse("-1") == HaltPolicy(now=False, kind="success", count=1)
    assert HaltPolicy.parse("-2") == HaltPolicy(now=True, kind="success", count=1)
    assert HaltPolicy.parse("50%") == HaltPolicy(now=False, kind="fail", percent=50.0)


@pytest.mark.parametrize("text", ["later,fail=1", "soon,fail=0", "now,fail=0%", "now,fail=150%",
                                  "soon,failures=1", "soon", "3", "now,success=", "-3",
                                  "150%"])
def test_bad_halt_policy(text):
    assert parse_halt(None) is None and parse_halt("never") is None
    with pytest.raises(click.BadParameter):
        parse_halt(text)


def test_record_of_failure_and_non_json_result():
    err = ValueError("boom")
    err.__cause__ = procqueue.RemoteTraceback("Traceback...\nValueError: boom\n")
    rec = record_of(procqueue.TaskOutcome(0, "in", False, None, err, 1, 0.5, 42))
    assert rec["error"] == {"type": "ValueError", "message": "boom",
                            "traceback": "Traceback...\nValueError: boom\n"}
    rec = record_of(procqueue.TaskOutcome(0, "in", True, {1, 2}, None, 1, 0.1, 42))
    line = line_of(rec)
    assert not rec["ok"] and rec["error"]["type"] == "ResultNotJSONSerializable"
    assert '"ResultNotJSONSerializable"' in line and '"result"' not in line


def test_progress_bar_shows_failures_and_restarts():
    from procqueue.cli.progress import Progress

    out = io.StringIO()
    bar = Progress(4, out, enabled=True, restarts=lambda: 2)
    for ok in (True, False, True, True):
        bar.update(ok)
    bar.close()
    last = out.getvalue().split("\r\x1b[K")[-1]
    assert "4/4" in last and "failed: 1" in last and "restarts: 2" in last



def test_progress_without_a_total_counts_what_is_done():
    # stdin's lines still coming (a streamed run): no total, so no bar, fraction or eta
    from procqueue.cli.progress import Progress

    out = io.StringIO()
    bar = Progress(None, out, enabled=True, restarts=lambda: 0)
    for ok in (True, False, True):
        bar.update(ok)
        bar.clear()  # as a record written to the same terminal does: the next update draws
    last = out.getvalue().split("\r\x1b[K")[-2]
    assert last.startswith("3 done") and "failed: 1" in last and "eta" not in last

# ---- script checks: what the parent can tell from the source alone ----------------------------

@pytest.mark.parametrize("source", [
    ("try:\n    from fast import process\nexcept ImportError:\n"
     "    def process(x):\n        return x\n"),
    "import sys\nif sys.platform == 'linux':\n    def process(x):\n        return x\n",
    "with open(__file__):\n    process = len\n",
    "import functools\nprocess = functools.partial(print)\n",
])
def test_a_function_bound_in_a_top_level_block_is_found(tmp_path, source):
    script = tmp_path / "s.py"
    script.write_text(source)
    assert resolve_script(str(script), None).name == "process"


def test_missing_function_lists_callables_not_modules_or_values(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("import os\nfrom json import dumps\nLIMIT = 3\n"
                      "class Job:\n    pass\ndef run(x):\n    return x\n")
    with pytest.raises(ScriptError, match=r"callables: Job, dumps, run \(choose") as info:
        resolve_script(str(script), None)
    assert info.value.exit_code == 2
    with pytest.raises(ScriptError, match="'LIMIT' .* is not a function"):
        resolve_script(str(script), "LIMIT")


def test_star_import_or_module_getattr_defers_the_check_to_the_worker(tmp_path):
    star = tmp_path / "star.py"
    star.write_text("from os.path import *\n")
    fn = resolve_script(str(star), "basename")
    assert fn("a/b.txt") == "b.txt"
    missing = resolve_script(str(star), "nothere")  # cannot be told from the source
    with pytest.raises(TypeError, match="defines no 'nothere'"):
        missing("x")


def test_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\ndef process(x:\n")
    with pytest.raises(ScriptError, match=r"bad\.py:2: '\(' was never closed"):
        resolve_script(str(bad), None)


def test_file_colon_function_and_module_colon_function(tmp_path, monkeypatch):
    script = tmp_path / "job.py"
    script.write_text("def score(x):\n    return 1\n")
    assert resolve_script(f"{script}:score", None) == ScriptFunction(
        "score", path=str(script.resolve()))
    with pytest.raises(ScriptError, match="no top-level function 'other'"):
        resolve_script(f"{script}:other", None)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_script("job:score", None) == ScriptFunction("score", module="job")
    with pytest.raises(ScriptError, match="no top-level function 'other'"):
        resolve_script("job:other", None)
    with pytest.raises(ScriptError, match="cannot find module 'no_such_module_pq'"):
        resolve_script("no_such_module_pq:f", None)


# ---- records and the writer --------------------------------------------------------------------

def test_nan_result_is_that_inputs_error_so_every_line_is_strict_json():
    rec = record_of(procqueue.TaskOutcome(0, "in", True, {"x": float("nan")}, None, 1, 0.1, 42))
    line = line_of(rec)
    assert "NaN" not in line and rec["error"]["type"] == "ResultNotJSONSerializable"


class _NumpyLike:
    """What the writer looks at in a numpy scalar or array: a dtype and tolist()."""

    def __init__(self, value):
        self.dtype, self._value = "int64", value

    def tolist(self):
        return self._value


def test_numpy_scalars_and_arrays_are_written_as_numbers_and_lists():
    result = {"sum": _NumpyLike(6), "values": _NumpyLike([1, 2, 3])}
    rec = record_of(procqueue.TaskOutcome(0, "in", True, result, None, 1, 0.1, 42))
    assert json.loads(line_of(rec))["result"] == {"sum": 6, "values": [1, 2, 3]}
    holding_an_object = _NumpyLike([object()])  # a numpy object array: still not JSON
    rec = record_of(procqueue.TaskOutcome(0, "in", True, holding_an_object, None, 1, 0.1, 42))
    line_of(rec)
    assert rec["error"]["type"] == "ResultNotJSONSerializable"


class _FlushSpy(io.StringIO):
    """Remembers what had been written at each flush; the second flush on may fail."""

    def __init__(self, fail_from: int | None = None) -> None:
        super().__init__()
        self.flushes: list[str] = []
        self.flushed = threading.Event()
        self.fail_from = fail_from

    def flush(self) -> None:
        if self.fail_from is not None and len(self.flushes) >= self.fail_from:
            raise BrokenPipeError(32, "Broken pipe")
        self.flushes.append(self.getvalue())
        self.flushed.set()


def test_a_record_is_flushed_without_waiting_for_the_next_one():
    from procqueue.cli.output import RecordWriter

    stream = _FlushSpy()
    writer = RecordWriter(stream, interval_s=0.5)
    writer.write({"input": "a", "ok": True, "result": 1})  # flushed at once: none before
    stream.flushed.clear()
    writer.write({"input": "b", "ok": True, "result": 2})  # within 0.5 s: left to the flusher
    assert stream.flushed.wait(5.0)  # no further write() needed
    assert len(stream.flushes[-1].splitlines()) == 2
    writer.close()
    assert [json.loads(line)["input"] for line in stream.getvalue().splitlines()] == ["a", "b"]


def test_a_flush_error_is_raised_by_close_not_lost():
    from procqueue.cli.output import RecordWriter

    writer = RecordWriter(_FlushSpy(fail_from=1), interval_s=3600)
    writer.write({"input": "a", "ok": True, "result": 1})  # the one flush that works
    writer.write({"input": "b", "ok": True, "result": 2})
    with pytest.raises(BrokenPipeError):
        writer.close()



def test_a_joblog_line_reaches_its_file_only_after_the_records_before_it():
    # --resume skips what the joblog lists: a line out before its record (each had its own
    # flush timer) left inputs with no record anywhere after a SIGKILL or a full disk.
    from procqueue.cli.output import LineWriter, RecordWriter

    records_stream, log_stream = _FlushSpy(), _FlushSpy()
    writer = RecordWriter(records_stream, interval_s=3600)
    log = LineWriter(log_stream, interval_s=0.0)  # flushes every line at once
    log.follows = writer
    for i in range(5):
        writer.write({"input": str(i), "ok": True, "result": i})
        log.write_line(f"{i}\n")
        assert len(records_stream.getvalue().splitlines()) == i + 1
    writer.close()
    log.close()
    assert log_stream.getvalue().splitlines() == [str(i) for i in range(5)]


def test_a_joblog_line_is_never_written_once_the_records_output_failed():
    from procqueue.cli.output import LineWriter, RecordWriter

    log_stream = _FlushSpy()
    writer = RecordWriter(_FlushSpy(fail_from=2), interval_s=3600)
    log = LineWriter(log_stream, interval_s=0.0)
    log.follows = writer
    writer.write({"input": "a", "ok": True, "result": 1})  # out (the first flush)
    log.write_line("a\n")  # (the second)
    writer.write({"input": "b", "ok": True, "result": 2})
    log.write_line("b\n")  # the records' flush for it fails
    log.write_line("c\n")
    log.close()
    assert log_stream.getvalue() == "a\n"
    with pytest.raises(BrokenPipeError):  # the records' error is the records writer's to say
        writer.close()


def test_records_reach_a_write_through_stream_together_not_one_write_each():
    # PYTHONUNBUFFERED=1 (common in containers) makes stdout write each write() through: a
    # write(2) per record, 200,000 records in 3.2 s instead of 1.9.
    from procqueue.cli.output import RecordWriter

    class WriteCounter(io.StringIO):
        writes = 0

        def write(self, text: str) -> int:
            self.writes += 1
            return super().write(text)

    stream = WriteCounter()
    writer = RecordWriter(stream, interval_s=3600)
    for i in range(100):
        writer.write({"input": str(i), "ok": True, "result": i})
    writer.close()
    assert stream.writes == 2  # the first record at once, the other 99 at the close
    assert [json.loads(line)["result"] for line in stream.getvalue().splitlines()] == list(
        range(100))

@pytest.mark.parametrize("text,cpus,jobs", [
    ("3", 8, 3), ("0", 8, 8), ("50%", 8, 4), ("100%", 2, 2), ("10%", 2, 1), ("+1", 8, 9),
    ("-2", 8, 6), ("-20", 8, 1),
])
def test_jobs_take_gnu_parallel_forms(monkeypatch, text, cpus, jobs):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cpus)))
    assert JobsType().convert(text, None, None) == jobs


@pytest.mark.parametrize("text", ["many", "1.5", "-1.5", "%"])
def test_bad_jobs_are_usage_errors(text):
    with pytest.raises(click.BadParameter):
        JobsType().convert(text, None, None)


@pytest.mark.parametrize("text,timeout", [
    ("2.5", 2.5), ("1m", 60.0), ("500ms", 0.5), ("0.5s", 0.5), ("2h", 7200.0), (" 1 m ", 60.0),
    ("300%", "300%"),
])
def test_timeout_takes_the_units_delay_takes_or_a_percentage(text, timeout):
    assert _parse_timeout(text) == timeout


@pytest.mark.parametrize("text,message", [
    ("0s", "must be > 0"), ("0", "must be > 0"), ("-1m", "not seconds"), ("m", "not seconds"),
    ("5x", "not seconds"),
])
def test_bad_timeouts_are_usage_errors(text, message):
    with pytest.raises(click.BadParameter, match=message):
        _parse_timeout(text)


ARITIES = """
import functools
def one(a): ...
def two(a, b): ...
def some(a, b=1): ...
def many(a, *rest): ...
def keyword_only(a, *, b=2): ...
@functools.lru_cache
def decorated(a): ...
def rebound(a): ...
rebound = functools.partial(two, 1)
def alternative(a): ...
if functools:
    def alternative(a, b): ...
"""


@pytest.mark.parametrize("name, ok, refused", [
    ("one", [1], [2]), ("two", [2], [1, 3]), ("some", [1, 2], [3]), ("many", [1, 2, 5], []),
    ("keyword_only", [1], [2]), ("decorated", [1, 2, 3], []), ("rebound", [1, 2], []),
    ("alternative", [1, 2], []),
])
def test_a_function_that_cannot_take_one_argument_per_input_source_is_a_usage_error(
        tmp_path, name, ok, refused):
    script = tmp_path / "arities.py"
    script.write_text(ARITIES)
    fn = ScriptFunction(name, path=str(script))
    for count in ok:  # (decorated, rebound, defined twice: the source does not say)
        check_arguments(fn, count)
    for count in refused:
        with pytest.raises(ScriptError, match=f"{name} takes .* positional argument"):
            check_arguments(fn, count)
    check_arguments(ScriptFunction(name, module="json"), 7)  # a module: left to the call


def test_directory_files_are_sorted_component_by_component(tmp_path):
    # "sub/d.txt" before "sub-x/c.txt": by path components, not as plain strings ('-' < '/')
    for name in ["z.txt", "a.txt", "sub/d.txt", "sub-x/c.txt", "sub2/b.txt", "sub/e/f.txt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    got = [os.path.relpath(p, tmp_path) for p in collect_inputs([str(tmp_path)])]
    assert got == ["a.txt", "sub/d.txt", "sub/e/f.txt", "sub-x/c.txt", "sub2/b.txt", "z.txt"]


# The command ends with os._exit once it has finished (the interpreter's teardown of the
# modules a pool imports was a fifth of a one-input run): what it printed must still come out,
# with its exit code, and a run that left a thread going must still end the ordinary way.
FAST_EXIT = """\
import atexit, sys, threading
from procqueue.cli import _exit_without_teardown
atexit.register(lambda: sys.stdout.write("exit handler ran\\n"))
sys.stdout.write("printed, not flushed\\n")
if sys.argv[1] == "thread":
    release = threading.Event()
    worker = threading.Thread(target=lambda: (release.wait(30), print("thread finished")))
    worker.start()
    _exit_without_teardown(SystemExit(3))
    release.set()
    worker.join()
    print("ordinary exit")
    sys.exit(3)
_exit_without_teardown(SystemExit(4))
print("never printed")
"""


@pytest.mark.timeout(60)
def test_the_command_exits_at_once_with_its_output_flushed_and_exit_handlers_run():
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    run = subprocess.run([sys.executable, "-c", FAST_EXIT, "alone"], capture_output=True,
                         text=True, timeout=50, env=buffered)
    assert run.returncode == 4, run.stderr
    assert run.stdout == "printed, not flushed\nexit handler ran\n"


@pytest.mark.timeout(60)
def test_a_command_that_leaves_a_thread_running_ends_the_ordinary_way():
    run = subprocess.run([sys.executable, "-c", FAST_EXIT, "thread"], capture_output=True,
                         text=True, timeout=50)
    assert run.returncode == 3, run.stderr
    lines = run.stdout.splitlines()
    assert lines == ["printed, not flushed", "thread finished", "ordinary exit",
                     "exit handler ran"]
