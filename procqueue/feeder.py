"""The local pool's feeder: a lazy call's inputs, as the window has room, become tasks and
blocks (submission.py) posted to the supervisor; the loop itself is input_feed.InputFeed,
shared with the Dask backend.

The supervisor hears OpenJob before the first input and CloseJob after the last, so it knows
when a lazy call has all its tasks.  Big arguments copied ahead are bounded too
(ArgumentMemory, see pool.py).
"""

from __future__ import annotations

import threading
from typing import Any, Iterable

from .inbox import CloseJob, OpenJob
from .input_feed import FeedWatch, InputFeed, Inputs
from .pool_journal import JournaledCall
from .program_fork import note_thread_ending
from .results import ResultStream
from .submission import Submitter
from .tasks import Job


def new_feed_watch() -> FeedWatch:
    """The watch of a pool's iterator-fed calls (see input_feed.FeedWatch)."""
    return FeedWatch(thread_ending=note_thread_ending)


def start_feeder(submitter: Submitter, job: Job, stream: ResultStream, iterable: Iterable[Any],
                 journal: JournaledCall | None = None, whole_chunks: int = 1,
                 wait_for_whole_chunks: bool = False, watch: FeedWatch | None = None
                 ) -> InputFeed:
    """Open the call in the supervisor and start its feeder thread (see InputFeed); returns
    the feed (InputFeed.stop_taking, for a cancel)."""
    submitter.post(OpenJob(job))
    feeder = Feeder(submitter, job, stream, iterable, journal, whole_chunks,
                    wait_for_whole_chunks, watch)
    thread = threading.Thread(target=feeder.run, name=f"procqueue-feeder-{job.id}",
                              daemon=True)
    thread.start()
    return feeder.feed


class Feeder:
    """What a local call's inputs become on their way to the supervisor."""

    def __init__(self, submitter: Submitter, job: Job, stream: ResultStream,
                 iterable: Iterable[Any], journal: JournaledCall | None,
                 whole_chunks: int, wait_for_whole_chunks: bool,
                 watch: FeedWatch | None) -> None:
        self.submitter = submitter
        self.job = job
        self.journal = journal
        self._blocks: bool | None = None  # may its inputs travel as blocks (asked once)
        self.feed = InputFeed(
            stream, iterable, self._submit, lambda: submitter.post(CloseJob(job)),
            count_known=None if journal is None else journal.journal.set_total,
            room=submitter.argument_memory.room, whole_chunks=whole_chunks,
            wait_for_whole_chunks=wait_for_whole_chunks, watch=watch)

    def run(self) -> None:
        """The feeder thread."""
        try:
            self.feed.run()
        finally:
            note_thread_ending()

    def _submit(self, first: int, items: Inputs) -> None:
        submitter = self.submitter
        if self._blocks is None:
            self._blocks = submitter.blocks_allowed(self.job, self.journal)
        for group, errors in submitter.groups(self.job, first, items, self.journal,
                                              self._blocks):
            submitter.post_group(group, errors)
