"""Chunks: how the driver turns pending items into Dask tasks (worker_side.run_chunk).

_Dispatch holds the chunks in flight and the calls with items waiting for one.  Each round
the driver asks it to fill the room the cluster has (INFLIGHT_CHUNKS_PER_THREAD chunks per
Dask worker thread): the calls take turns (round robin), each turn one chunk of the size its
sizer gives, items whose key is at its cap stay behind.  An item submitted in a chunk moves
from QUEUED to DISPATCHED.  Only the driver thread calls it.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from typing import Any, Callable

from ...tasks import TaskState
from .items import Command, DaskJob, DaskTask, _Chunk, _ChunkDone
from .worker_side import run_chunk

INFLIGHT_CHUNKS_PER_THREAD = 2  # submitted chunks per worker thread: one running, one waiting
NTHREADS_REFRESH_S = 2.0  # how often the cluster's thread count is asked for (it may scale)


class _Dispatch:
    """The chunks in flight (by Dask key) and the calls whose items wait for a chunk."""

    def __init__(self, client: Any, token: str, post: Callable[[Command], None]) -> None:
        self.client = client
        self.token = token
        self.post = post  # the driver's inbox: a chunk's end comes back as _ChunkDone
        self.ready: deque[DaskJob] = deque()  # calls with pending items (round robin)
        self.inflight: dict[str, _Chunk] = {}
        self.chunk_ids = itertools.count(1)
        self.submitted = 0  # chunks submitted to Dask, ever
        self._nthreads = 0
        self._nthreads_at = -math.inf

    def mark_ready(self, call: DaskJob) -> None:
        if call.pending and call not in self.ready:
            self.ready.append(call)

    def threads(self) -> int:
        """The Dask worker threads of the cluster, as last asked (at least 1)."""
        return max(1, self._nthreads)

    def fill(self, drop: Callable[[DaskTask], None]) -> None:
        """Submit chunks until the cluster has its share in flight or no call has an item
        that may start; `drop` ends an item whose Future was cancelled while it waited."""
        if not self.ready:
            return  # idle: not even the cluster's thread count is asked for
        room = self._capacity() - len(self.inflight)
        while room > 0 and self.ready:
            call = self.ready.popleft()
            items = self._take_chunk(call, drop)
            if items:
                self._submit(call, items)
                room -= 1
                self.mark_ready(call)
            # else every waiting key is at its cap: a chunk that ends marks the call ready

    def forget(self, chunk: _Chunk) -> None:
        """The chunk is no longer in flight (done, lost, cancelled): its items' keys free."""
        self.inflight.pop(chunk.key, None)
        for item in chunk.items:
            item.chunk = None
            self._release_key(item)

    def _capacity(self) -> int:
        now = time.monotonic()
        if now - self._nthreads_at > NTHREADS_REFRESH_S:
            try:
                self._nthreads = sum(self.client.nthreads().values())
            except Exception:  # the scheduler is unreachable for a moment: keep the last count
                pass
            self._nthreads_at = now
        return INFLIGHT_CHUNKS_PER_THREAD * self.threads()

    def _take_chunk(self, call: DaskJob, drop: Callable[[DaskTask], None]) -> list[DaskTask]:
        """Up to the sizer's size of the call's items.  A chunk runs its items one at a time,
        so it holds one place per key it has items of, takes new places only up to its
        share (KeyedFifo.batch_share), then takes more items of the keys it holds."""
        threads = self.threads()
        size = call.sizer.next_size(len(call.pending), workers=threads)
        places = call.pending.batch_share(threads, INFLIGHT_CHUNKS_PER_THREAD) or size
        held: set[Any] = set()  # the keys whose place this chunk holds
        items: list[DaskTask] = []
        while len(items) < size:
            item = call.pending.pop() if len(held) < places else None
            if item is None and held:
                item = _next_of(call, held)
            if item is None:
                break
            if item.state.terminal:
                continue  # cancelled while it waited
            if item.isolate and items:
                call.pending.push(item, item.key, front=True)
                break  # an isolated item runs alone
            if not call.sink.starting(item):  # its Future was cancelled while queued
                drop(item)
                continue
            self._hold_key(item, held)
            items.append(item)
            if item.isolate:
                break
        return items

    def _hold_key(self, item: DaskTask, held: set[Any]) -> None:
        """Count the item's key as running from now to its chunk's end, once per chunk (its
        first item of the key holds the place: a chunk in flight may be running any of its
        items, one at a time)."""
        keyed = item.job.keyed
        if keyed is not None and item.key not in held:
            keyed.started(item.key)
            held.add(item.key)
            item.key_held = True

    def _release_key(self, item: DaskTask) -> None:
        keyed = item.job.keyed
        if item.key_held and keyed is not None:
            item.key_held = False
            keyed.finished(item.key)
            self.mark_ready(item.job)

    def _submit(self, call: DaskJob, items: list[DaskTask]) -> None:
        key = f"procqueue-{self.token}-{call.id}-{next(self.chunk_ids)}"
        payloads = [item.payload for item in items]
        future = self.client.submit(run_chunk, call.fn_id, call.fn_payload, int(call.kind),
                                    payloads, call.timeout_s, call.semaphores, call.rates,
                                    key=key, pure=False)
        chunk = _Chunk(key, call, items, future, time.time())
        for item in items:
            item.move(TaskState.DISPATCHED)
            item.attempts += 1
            item.chunk = chunk
        self.inflight[key] = chunk
        self.submitted += 1
        post = self.post
        future.add_done_callback(lambda f: post(_ChunkDone(f)))


def _next_of(call: DaskJob, keys: set[Any]) -> DaskTask | None:
    """The next pending item of any of `keys`, at its cap or not."""
    for key in keys:
        item = call.pending.pop_of(key)
        if item is not None:
            return item
    return None
