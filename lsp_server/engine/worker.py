"""The one thread that owns the model: work runs there by priority, then arrival.

Generation never runs on the event loop nor on pygls's thread pool (which also reads stdin, so
a busy GPU there would keep ``$/cancelRequest`` from being read).
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
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        self._waiting = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

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

    def close(self) -> None:
        self._queue.put((-1, -1, None, None, None))

    def _run(self) -> None:
        while True:
            _, _, fn, future, cancelled = self._queue.get()
            if fn is None:
                return
            with self._lock:
                self._waiting -= 1
            if (cancelled is not None and cancelled.is_set()) or not future.set_running_or_notify_cancel():
                if not future.done():
                    future.cancel()
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # delivered to the waiting request
                future.set_exception(exc)
