"""The threads that own the model: work runs there by priority, then arrival.

Generation never runs on the event loop nor on pygls's thread pool (which also reads stdin, so
a busy GPU there would keep ``$/cancelRequest`` from being read). An engine that batches
requests (``max_batch`` > 1) gets that many threads, each blocked in its request's ``generate``;
loading runs alone.
"""

from __future__ import annotations

import itertools
import logging
import queue
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
    def __init__(self, queue_size: int = 16, name: str = "starchat-engine"):
        self.queue_size = queue_size
        self._name = name
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        self._waiting = 0
        self._lock = threading.Lock()
        self._turn = threading.Condition()
        self._limit = 1
        self._active = 0
        self._exclusive = False
        self._threads: list[threading.Thread] = []
        self._stops: set[threading.Event] = set()  # of the items running now
        self.set_concurrency(1)

    def set_concurrency(self, limit: int) -> None:
        """How many items may run at once (threads are added, never removed)."""
        with self._turn:
            self._limit = max(1, limit)
            self._turn.notify_all()
        while len(self._threads) < self._limit:
            thread = threading.Thread(target=self._run, name=f"{self._name}-{len(self._threads)}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def submit(self, fn: Callable[[], Any], priority: Priority, cancelled: threading.Event | None = None) -> Future:
        with self._lock:
            if priority != Priority.LOAD and self._waiting >= self.queue_size:
                raise Busy(self.queue_size)
            self._waiting += 1
        future: Future = Future()
        self._queue.put((int(priority), next(self._order), fn, future, cancelled))
        return future

    @property
    def waiting(self) -> int:
        return self._waiting

    def close(self, wait: float = 3.0) -> None:
        """Stop what runs (each generation stops before its next step), drop what waits, and
        wait a little for the threads to be idle: a thread inside torch when the interpreter
        exits can abort the process."""
        with self._turn:
            for stop in self._stops:
                stop.set()
        while True:
            try:
                _, _, fn, future, cancelled = self._queue.get_nowait()
            except queue.Empty:
                break
            if cancelled is not None:
                cancelled.set()
            if future is not None:
                future.cancel()
        for _ in self._threads:
            self._queue.put((-1, -1, None, None, None))
        with self._turn:
            self._turn.wait_for(lambda: self._active == 0, timeout=wait)

    def _run(self) -> None:
        while True:
            priority, _, fn, future, cancelled = self._queue.get()
            if fn is None:
                return
            with self._lock:
                self._waiting -= 1
            if (cancelled is not None and cancelled.is_set()) or not future.set_running_or_notify_cancel():
                if not future.done():
                    future.cancel()
                continue
            alone = priority == Priority.LOAD
            with self._turn:
                while self._exclusive or self._active >= self._limit or (alone and self._active):
                    self._turn.wait()
                self._active += 1
                self._exclusive = alone
                if cancelled is not None:
                    self._stops.add(cancelled)
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
