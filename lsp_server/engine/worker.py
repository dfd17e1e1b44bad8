"""The threads that own the model: work runs there by priority, then arrival.

Generation never runs on the event loop nor on pygls's thread pool (which also reads stdin, so
a busy GPU there would keep ``$/cancelRequest`` from being read). An engine that batches
requests (``max_batch`` > 1) gets that many threads, each blocked in its request's ``generate``;
loading runs alone. A thread takes an item only when it may run it, so priorities hold and the
queue limit counts exactly what waits.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
from concurrent.futures import Future
from enum import IntEnum
from typing import Any, Callable

log = logging.getLogger(__name__)


class Priority(IntEnum):
    LOAD = 0
    USER = 1  # an explicit action: code action, command, chat
    HOVER = 2
    BACKGROUND = 3


class Busy(RuntimeError):
    def __init__(self, size: int):
        super().__init__(f"StarChat is busy: {size} requests are already waiting. Try again when one finishes.")
        self.size = size


class Worker:
    """Runs submitted work on its threads: at most ``limit`` items at once (the engine's batch),
    a LOAD item alone, by priority then arrival. A thread takes an item only when it can run
    it: the most urgent waiting item is always the next to start (no thread holds an item
    while it waits for its turn), and what waits is exactly what the queue limit counts."""

    def __init__(self, queue_size: int = 16, name: str = "starchat-engine"):
        self.queue_size = queue_size
        self._name = name
        self._heap: list[tuple[int, int, Callable[[], Any], Future, threading.Event | None]] = []
        self._order = itertools.count()
        self._turn = threading.Condition()
        self._limit = 1
        self._active = 0
        self._exclusive = False
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._stops: set[threading.Event] = set()  # of the items running now
        self.set_concurrency(1)

    def set_concurrency(self, limit: int) -> None:
        """How many items may run at once (threads are added, never removed: a thread beyond
        the limit only waits)."""
        with self._turn:
            self._limit = max(1, limit)
            while len(self._threads) < self._limit:
                thread = threading.Thread(target=self._run, name=f"{self._name}-{len(self._threads)}", daemon=True)
                self._threads.append(thread)
                thread.start()
            self._turn.notify_all()

    def submit(self, fn: Callable[[], Any], priority: Priority, cancelled: threading.Event | None = None) -> Future:
        """Queue ``fn``; past ``queue_size`` waiting items (a LOAD is always taken) raise
        ``Busy``. An item whose future is cancelled, or whose ``cancelled`` event is set,
        before it starts never runs and no longer counts as waiting."""
        future: Future = Future()
        with self._turn:
            if self._closed:
                future.cancel()
                return future
            if priority != Priority.LOAD and self._left_waiting() >= self.queue_size:
                raise Busy(self.queue_size)
            heapq.heappush(self._heap, (int(priority), next(self._order), fn, future, cancelled))
            self._turn.notify_all()
        return future

    @property
    def waiting(self) -> int:
        """Items waiting to start (cancelled ones not counted)."""
        with self._turn:
            return self._live_waiting()

    def close(self, wait: float = 3.0) -> None:
        """Stop what runs (each generation stops before its next step), drop what waits, and
        wait up to ``wait`` seconds for the threads to be idle (``wait_idle``): a thread inside
        torch when the interpreter exits can abort the process."""
        with self._turn:
            self._closed = True
            for stop in self._stops:
                stop.set()
            for _, _, _, future, cancelled in self._heap:
                if cancelled is not None:
                    cancelled.set()
                future.cancel()
            self._heap.clear()
            self._turn.notify_all()
        self.wait_idle(wait)

    def wait_idle(self, timeout: float) -> bool:
        """Blocking: wait up to ``timeout`` seconds until nothing runs; whether nothing does."""
        with self._turn:
            return self._turn.wait_for(lambda: self._active == 0, timeout=timeout)

    def _live_waiting(self) -> int:
        """(Under ``_turn``.) Drops the items cancelled while waiting; how many are left."""
        live = [item for item in self._heap if not _dropped(item)]
        if len(live) != len(self._heap):
            for item in self._heap:
                if _dropped(item):
                    item[3].cancel()
            heapq.heapify(live)
            self._heap = live
        return len(live)

    def _left_waiting(self) -> int:
        """(Under ``_turn``.) The live items that stay waiting once the free threads have taken
        what they may start now: an item submitted a moment ago to an idle engine is not waiting,
        even if its thread has not woken up yet."""
        left = self._live_waiting()
        active, exclusive = self._active, self._exclusive
        for item in sorted(self._heap):  # (priority, arrival, ...): never compares further
            if exclusive or active >= self._limit or (item[0] == Priority.LOAD and active):
                break
            active, exclusive, left = active + 1, item[0] == Priority.LOAD, left - 1
        return left

    def _take(self) -> tuple | None:
        """(Under ``_turn``.) The most urgent waiting item if it may start now, marked running."""
        while self._heap:
            item = self._heap[0]
            if _dropped(item):
                heapq.heappop(self._heap)
                item[3].cancel()
                continue
            alone = item[0] == Priority.LOAD
            if self._exclusive or self._active >= self._limit or (alone and self._active):
                return None  # nothing else starts before it
            heapq.heappop(self._heap)
            if not item[3].set_running_or_notify_cancel():
                continue
            self._active += 1
            self._exclusive = alone
            if item[4] is not None:
                self._stops.add(item[4])
            return item
        return None

    def _run(self) -> None:
        while True:
            with self._turn:
                while (item := self._take()) is None:
                    if self._closed:
                        return
                    self._turn.wait()
            _, _, fn, future, cancelled = item
            try:
                future.set_result(fn())
            except BaseException as exc:  # delivered to the waiting request
                future.set_exception(exc)
            finally:
                with self._turn:
                    self._active -= 1
                    self._exclusive = False
                    self._stops.discard(cancelled)  # type: ignore[arg-type]
                    self._turn.notify_all()


def _dropped(item: tuple) -> bool:
    """Cancelled before it started: its future, or its request's stop event."""
    future, cancelled = item[3], item[4]
    return future.cancelled() or (cancelled is not None and cancelled.is_set())
