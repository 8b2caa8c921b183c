"""The Future of submit(): concurrent.futures semantics, with its condition made only when
someone waits (tested without processes: the supervisor's side is starting()/deliver())."""
from __future__ import annotations

import concurrent.futures
import gc
import inspect
import sys
import threading

import pytest

from procqueue.results import TaskFuture


class Canceller:
    def __init__(self):
        self.calls = []

    def cancel_task(self, task, running):
        self.calls.append((task, running))


def bound_future():
    future, canceller = TaskFuture(), Canceller()
    future.cancel_via(canceller, "the task")
    return future, canceller


@pytest.mark.timeout(30)
def test_a_result_nobody_waited_for_is_there_and_the_future_then_works_as_any():
    future, _ = bound_future()
    assert not future.done() and not future.running()
    assert future.starting("the task")
    assert future.running()
    future.deliver("the task", True, 42)
    assert future.done() and not future.running() and not future.cancelled()
    assert future.result() == 42 and future.exception() is None
    assert not future.cancel()
    assert concurrent.futures.wait([future], timeout=5).done == {future}
    assert list(concurrent.futures.as_completed([future], timeout=5)) == [future]
    seen = []
    future.add_done_callback(lambda f: seen.append(f.result()))  # done: runs at once
    assert seen == [42]


@pytest.mark.timeout(30)
def test_an_error_is_raised_by_result_and_returned_by_exception():
    future, _ = bound_future()
    future.starting("the task")
    error = ValueError("bad input 7")
    future.deliver("the task", False, error)
    assert future.exception() is error
    with pytest.raises(ValueError, match="bad input 7"):
        future.result()


@pytest.mark.timeout(30)
def test_the_first_outcome_stands():
    future, _ = bound_future()
    future.starting("the task")
    future.deliver("the task", True, 1)
    future.deliver("the task", False, RuntimeError("late"))  # ignored, not raised
    assert future.result() == 1


@pytest.mark.timeout(30)
def test_set_result_on_a_cancelled_future_raises_instead_of_deadlocking():
    # Future.set_result formats the future (repr) while holding its lock when it raises;
    # the lock is not reentrant, so repr must not take it.
    future, _ = bound_future()
    assert future.cancel()
    with pytest.raises(concurrent.futures.InvalidStateError, match="cancelled"):
        future.set_result(1)
    assert "state=cancelled" in repr(future)


@pytest.mark.timeout(30)
def test_cancelled_while_queued_never_starts_and_tells_the_pool():
    future, canceller = bound_future()
    assert future.cancel()
    assert canceller.calls == [("the task", False)]
    assert future.cancelled() and future.done()
    assert not future.starting("the task")  # the task must not run
    future.deliver("the task", True, 1)  # a late outcome does not undo the cancel
    with pytest.raises(concurrent.futures.CancelledError):
        future.result()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["as_completed", "wait"])
def test_a_future_cancelled_while_queued_is_done_for_wait_and_as_completed(how):
    # The pool takes it out of its queue, so it never reaches set_running_or_notify_cancel()
    # through a start: cancel() itself must tell the waiters, or they wait forever
    future, _ = bound_future()
    other, _ = bound_future()
    other.starting("the task")
    other.deliver("the task", True, 1)
    assert future.cancel()
    if how == "as_completed":
        assert set(concurrent.futures.as_completed([future, other], timeout=5)) == {
            future, other}
    else:
        done, pending = concurrent.futures.wait([future, other], timeout=5)
        assert done == {future, other} and not pending
    assert not future.starting("the task")  # the supervisor's late look changes nothing


@pytest.mark.timeout(30)
def test_cancelling_a_running_future_asks_the_pool_to_kill_it():
    future, canceller = bound_future()
    future.starting("the task")
    waiter = threading.Thread(target=lambda: concurrent.futures.wait([future], timeout=10))
    waiter.start()
    assert future.cancel()
    waiter.join(10)
    assert not waiter.is_alive()
    assert canceller.calls == [("the task", True)] and future.cancelled()


@pytest.mark.timeout(30)
def test_a_retried_task_starts_again_whether_or_not_someone_waits():
    future, _ = bound_future()
    assert future.starting("the task") and future.starting("the task")
    waiting = threading.Thread(target=lambda: future.result(timeout=10))
    waiting.start()
    assert future.starting("the task")
    future.deliver("the task", True, 5)
    waiting.join(10)
    assert not waiting.is_alive() and future.result() == 5


def _first_line_of(function, text):
    lines, first = inspect.getsourcelines(function)
    return first + next(i for i, line in enumerate(lines) if text in line)


@pytest.mark.timeout(60)
def test_a_waiter_arriving_while_the_result_is_set_is_woken():
    # The interleaving the lazy condition must not lose, forced: the supervisor's thread
    # is stopped (by a tracer) just after it saw that the future has no condition and
    # before it sets the outcome; meanwhile a caller makes the condition and waits on it.
    # Setting the outcome must then wake it (or the caller must not have got that far).
    future = TaskFuture()
    future.starting("the task")
    pause_line = _first_line_of(TaskFuture._finish, "if self._state in _STARTABLE:")
    at_pause, resume = threading.Event(), threading.Event()

    def tracer(frame, event, arg):
        if frame.f_code is TaskFuture._finish.__code__:
            if event == "line" and frame.f_lineno == pause_line:
                at_pause.set()
                resume.wait(10)
            return tracer
        return None

    def supervisor():
        sys.settrace(tracer)
        try:
            future.deliver("the task", True, "the result")
        finally:
            sys.settrace(None)

    got = []
    setter = threading.Thread(target=supervisor)
    setter.start()
    assert at_pause.wait(10)
    # (A missed wake-up shows as the full timeout: Future.result looks at the state again
    # when its wait times out.)
    waiter = threading.Thread(target=lambda: got.append(future.result(timeout=40)), daemon=True)
    waiter.start()
    waiter.join(0.5)  # let it make the condition and wait, if it can
    resume.set()
    setter.join(10)
    waiter.join(10)
    assert not waiter.is_alive(), "the waiter was not woken when the result was set"
    assert got == ["the result"]


@pytest.mark.timeout(60)
def test_a_pending_future_is_one_object_for_the_garbage_collector():
    # What makes thousands of pending futures cheap: a plain Future with its lock,
    # condition, lists and hooks is ~10 objects that every full collection walks.
    gc.collect()
    before = len(gc.get_objects())
    canceller = Canceller()
    futures = [TaskFuture() for _ in range(2000)]
    for future in futures:
        future.cancel_via(canceller, "the task")
    for future in futures[::2]:
        future.starting("the task")
    gc.collect()
    per_future = (len(gc.get_objects()) - before) / len(futures)
    assert per_future < 1.1
    assert concurrent.futures.wait(futures[:3], timeout=0).not_done == set(futures[:3])
