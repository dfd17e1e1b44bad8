"""The engine's worker threads: priorities, a bounded queue, cancellation before start."""

import threading
import time

import pytest

from lsp_server.engine.worker import Busy, Priority, Worker


def test_items_run_by_priority_then_arrival():
    worker = Worker()
    gate = threading.Event()
    order = []
    worker.submit(gate.wait, Priority.USER)  # occupies the thread while the others queue up
    futures = [
        worker.submit(lambda: order.append("hover"), Priority.HOVER),
        worker.submit(lambda: order.append("user-1"), Priority.USER),
        worker.submit(lambda: order.append("background"), Priority.BACKGROUND),
        worker.submit(lambda: order.append("user-2"), Priority.USER),
    ]
    gate.set()
    for future in futures:
        future.result(5)
    assert order == ["user-1", "user-2", "hover", "background"]
    worker.close()


def test_a_full_queue_refuses_at_once():
    worker = Worker(queue_size=2)
    gate = threading.Event()
    worker.submit(gate.wait, Priority.USER)
    time.sleep(0.05)  # the first item is running, not waiting
    worker.submit(lambda: None, Priority.USER)
    worker.submit(lambda: None, Priority.USER)
    with pytest.raises(Busy) as error:
        worker.submit(lambda: None, Priority.USER)
    assert "2 requests" in str(error.value)
    gate.set()
    worker.close()


def test_cancelled_before_start_never_runs():
    worker = Worker()
    gate = threading.Event()
    worker.submit(gate.wait, Priority.USER)
    cancelled = threading.Event()
    ran = []
    future = worker.submit(lambda: ran.append(1), Priority.USER, cancelled)
    cancelled.set()
    gate.set()
    with pytest.raises(Exception):
        future.result(5)
    assert ran == []
    worker.close()


def test_concurrency_runs_items_side_by_side_but_loads_alone():
    worker = Worker()
    worker.set_concurrency(3)
    both = threading.Barrier(3, timeout=5)
    futures = [worker.submit(both.wait, Priority.USER) for _ in range(3)]
    for future in futures:
        future.result(5)  # a barrier of 3 only opens if all three ran at once
    active = []
    lock = threading.Lock()

    def job(name):
        with lock:
            active.append(name)
        time.sleep(0.05)
        with lock:
            active.append(f"/{name}")

    jobs = [worker.submit(lambda: job("a"), Priority.USER), worker.submit(lambda: job("load"), Priority.LOAD)]
    for future in jobs:
        future.result(5)
    load_start = active.index("load")
    assert active[load_start + 1] == "/load"  # nothing ran while loading
    worker.close()
