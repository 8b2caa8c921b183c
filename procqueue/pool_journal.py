"""A pool's journal (Pool(journal=...)), as its map and imap calls use it: the local pool's
and the Dask backend's, which both keep it in the front end (Pool._open_run_records).

The journal itself (journal.py: SQLite, sqlite3 and json) loads only when a pool first uses
one.  A journaled call reports the outcomes journaled by an earlier run instead of running
their inputs again, and commits each new outcome before its sink sees it:

    input ──► JournaledCall.replayed ──► journaled already: its stored outcome, replayed
                                     └─► not yet: submitted; its outcome goes to the
                                         JournalingSink, committed, then to the call's sink
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any, Callable, Protocol

from .chunking import ChunkSizer

if TYPE_CHECKING:  # loaded when a pool first uses a journal: sqlite3 and json cost ~6 ms
    from .journal import Journal


class JournaledWork(Protocol):
    """What JournaledCall changes of a call: where its outcomes go and how its batches are
    sized (a local pool's Job, or a DaskPool's call)."""

    sink: Any
    sizer: ChunkSizer


class JournaledCall:
    """One map/imap call of a journaled pool: which inputs are done already, and the sink
    that commits the others' outcomes before reporting them (put in place of the call's
    own, before its first input is submitted)."""

    def __init__(self, journal: Journal, work: JournaledWork) -> None:
        from .journal import BATCH_WORK_S, InputKeys, JournalingSink

        self.journal = journal
        # Short batches: what a worker finished is sent at a batch's end, and lost until then.
        work.sizer = work.sizer.with_target(BATCH_WORK_S)
        self.input_keys = InputKeys()  # a repeated input is a task of its own each time
        self.keys: dict[int, str] = {}
        self.sink = JournalingSink(work.sink, journal,
                                   key_of_task=lambda t: self.keys.pop(t.index))
        work.sink = self.sink

    def replayed(self, index: int, item: Any) -> bool:
        """Report the journaled outcome of `item` (the call's next input, in input order) if
        it has one (True), else remember its key for the outcome to come (False)."""
        key = self.input_keys.next_key(item)
        stored = self.journal.lookup(key)
        if stored is None:
            self.keys[index] = key
            return False
        self.sink.replay(index, item, stored)
        return True


class JournalHolder:
    """The pool's journal: a Journal the caller passed (theirs to close), or a path opened
    at the first map/imap call (the function's identity is known only then) and closed with
    the pool."""

    def __init__(self, journal: "str | os.PathLike[str] | Journal | None") -> None:
        self.path: str | None = None
        self.journal: Journal | None = None
        if journal is not None:
            from .journal import Journal

            if isinstance(journal, Journal):
                self.journal = journal
            else:
                self.path = os.fspath(journal)
        self.owned = False
        self.lock = threading.Lock()

    def for_call(self, func: Callable[..., Any], work: JournaledWork) -> JournaledCall | None:
        """The journal of one call of `func` (None: the pool has none), opening the pool's
        journal at its first call; `work` is then journaled (see JournaledCall)."""
        if self.path is None and self.journal is None:
            return None
        with self.lock:
            if self.journal is None:
                assert self.path is not None
                from .journal import Journal, format_1_function_identity, function_identity

                self.journal = Journal.open(
                    self.path, function_identity=function_identity(func),
                    former_identities=(format_1_function_identity(func),))
                self.owned = True
        return JournaledCall(self.journal, work)

    def close(self) -> None:
        with self.lock:
            if self.owned and self.journal is not None:
                self.journal.close()
                self.owned = False
