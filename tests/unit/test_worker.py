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


def test_an_item_a_free_thread_takes_at_once_is_not_waiting():
    # Two requests reach an idle engine together: the first starts, the second waits, and
    # a queue of one has room for it, also before the thread has woken up to take the first.
    worker = Worker(queue_size=1)
    worker.set_concurrency(2)
    gate = threading.Event()
    with worker._turn:  # no thread can take anything yet
        running = [worker.submit(gate.wait, Priority.USER) for _ in range(2)]
        waiting = worker.submit(lambda: "third", Priority.USER)
        with pytest.raises(Busy):
            worker.submit(lambda: None, Priority.USER)
    gate.set()
    assert [f.result(5) for f in running] == [True, True] and waiting.result(5) == "third"
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


def test_cancelled_items_do_not_count_as_waiting():
    """Hovers cancelled while a long answer holds the engine no longer fill the queue."""
    worker = Worker(queue_size=2)
    gate = threading.Event()
    worker.submit(gate.wait, Priority.USER)
    time.sleep(0.05)
    stop = threading.Event()
    worker.submit(lambda: None, Priority.HOVER, stop)
    future = worker.submit(lambda: None, Priority.HOVER)
    with pytest.raises(Busy):
        worker.submit(lambda: None, Priority.USER)
    stop.set()  # cancelled through its request's stop event
    future.cancel()  # cancelled through its future (asyncio.wrap_future does this)
    assert worker.waiting == 0
    later = [worker.submit(lambda: "ran", Priority.USER) for _ in range(2)]
    gate.set()
    assert [f.result(5) for f in later] == ["ran", "ran"]
    worker.close()


@pytest.mark.parametrize("round_", range(10))
def test_priorities_hold_with_more_threads_than_the_limit(round_):
    """After a reload from a batching engine (8 threads) to a one-at-a-time engine, the idle
    threads must not each grab an item and race for the one turn: the most urgent starts first."""
    worker = Worker()
    worker.set_concurrency(8)
    worker.set_concurrency(1)
    gate = threading.Event()
    worker.submit(gate.wait, Priority.USER)
    time.sleep(0.02)
    order = []
    futures = [worker.submit(lambda: order.append("hover"), Priority.HOVER),
               worker.submit(lambda: order.append("action"), Priority.USER)]
    time.sleep(0.02)
    gate.set()
    for future in futures:
        future.result(5)
    assert order == ["action", "hover"]
    worker.close()


@pytest.mark.parametrize("round_", range(10))
def test_a_reload_closes_the_old_engine_before_loading_the_new(round_):
    """Two LOAD items (close the old engine, load the new one) run alone and in order, even
    with several idle threads: two models are never in GPU memory at once."""
    worker = Worker()
    worker.set_concurrency(8)
    gate = threading.Event()
    worker.submit(gate.wait, Priority.USER)
    time.sleep(0.02)
    order = []
    close = worker.submit(lambda: (time.sleep(0.01), order.append("close")), Priority.LOAD)
    load = worker.submit(lambda: order.append("load"), Priority.LOAD)
    time.sleep(0.02)
    gate.set()
    close.result(5)
    load.result(5)
    assert order == ["close", "load"]
    worker.close()


def test_close_stops_running_work_and_refuses_new():
    worker = Worker()
    stop = threading.Event()
    started = threading.Event()
    running = worker.submit(lambda: (started.set(), stop.wait(5), "stopped")[2], Priority.USER, stop)
    waiting = worker.submit(lambda: "ran", Priority.USER)
    started.wait(5)
    worker.close()
    assert running.result(5) == "stopped" and waiting.cancelled()
    assert worker.submit(lambda: None, Priority.USER).cancelled()


def test_close_without_waiting_then_wait_idle():
    """``shutdown`` closes without waiting (its item stops on its own); ``wait_idle`` waits."""
    worker = Worker()
    gate = threading.Event()
    running = worker.submit(gate.wait, Priority.USER)
    while not running.running():
        time.sleep(0.001)
    started = time.monotonic()
    worker.close(wait=0)
    assert time.monotonic() - started < 0.5
    assert worker.wait_idle(0.05) is False  # still inside its item
    gate.set()
    assert worker.wait_idle(5) is True
    assert running.result(1) is True

