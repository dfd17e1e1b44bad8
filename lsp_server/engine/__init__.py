"""Engines run the model; the server talks to them only through :func:`stream`."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Callable

from .base import Engine, EngineError, Generation, Sampling, StreamDecoder, TimedOut
from .worker import Busy, Priority, Worker

__all__ = ["Busy", "Engine", "EngineError", "Generation", "Priority", "Sampling", "TimedOut", "Worker", "load_engine", "stream",
           "warm"]


def load_engine(settings: Any, report: Callable[[str], None]) -> Engine:
    """Blocking: build the engine the settings name (runs on the worker thread)."""
    choice = getattr(settings, "engine", "auto")
    if choice in ("auto", "fast"):
        from .fast import FastEngine

        return FastEngine.load(settings, report, fallback=choice == "auto")
    from .local import TransformersEngine

    return TransformersEngine.load(settings, report)


async def stream(
    worker: Worker,
    engine: Engine,
    prompt_ids: list[int],
    sampling: Sampling,
    priority: Priority,
    on_text: Callable[[str], None] = lambda _: None,
    on_count: Callable[[int], None] = lambda _: None,
    time_limit: float | None = None,
    until: Callable[[str], bool] | None = None,
) -> Generation:
    """Generate on the worker thread, calling ``on_text`` on the event loop with each piece of
    text. Text that arrives while the loop is busy (several tokens from one speculative step,
    or a fast engine outrunning the editor) is joined into one piece: the loop is woken once
    per piece, not once per token. If the awaiting task is cancelled, the decoding loop stops
    before its next step and no ``on_text`` call happens after the cancellation. ``on_count``
    gets the number of tokens generated so far with each piece. ``time_limit``: seconds the
    generation may run once it has started (time waiting for the engine does not count);
    past it the engine stops before its next step and ``TimedOut`` is raised. ``until``: called
    on the worker thread with the text so far after each new piece; once it returns True the
    engine stops before its next step and the generation ends as "stop" (the caller has what
    it needs)."""
    loop = asyncio.get_running_loop()
    stop = threading.Event()
    enough = threading.Event()
    lock = threading.Lock()
    pending: list[str] = []
    count = 0

    def deliver() -> None:
        with lock:
            text = "".join(pending)
            pending.clear()
            tokens = count
        if text and not stop.is_set():
            on_count(tokens)
            on_text(text)

    def send(delta: str) -> None:
        with lock:
            wake = not pending  # else a deliver() is already on its way and takes this too
            pending.append(delta)
        if wake:
            loop.call_soon_threadsafe(deliver)

    def work() -> Generation:
        decoder = StreamDecoder(engine.tokenizer)
        started = time.monotonic()
        deadline = None if time_limit is None else started + time_limit
        first_token: float | None = None
        cached = 0

        def should_stop() -> bool:
            return stop.is_set() or enough.is_set() or (deadline is not None and time.monotonic() > deadline)

        def on_prompt(reused: int) -> None:
            nonlocal cached
            cached = reused

        def on_token(token: int) -> None:
            nonlocal count, first_token
            if first_token is None:
                first_token = time.monotonic() - started
            with lock:
                count += 1
            if delta := decoder.push(token):
                send(delta)
                if until is not None and until(decoder.text):
                    enough.set()

        ids, reason = engine.generate(prompt_ids, sampling, should_stop, on_token, priority=int(priority),
                                      on_prompt=on_prompt)
        if reason == "cancelled" and not stop.is_set() and deadline is not None and time.monotonic() > deadline:
            stop.set()  # nothing more goes to the editor
            raise TimedOut(time_limit)
        if tail := decoder.flush():
            send(tail)
        if reason == "cancelled" and enough.is_set() and not stop.is_set():
            reason = "stop"
        return Generation(decoder.text, reason, len(prompt_ids), len(ids), cached, first_token,
                          time.monotonic() - started)

    future = worker.submit(work, priority, stop)
    try:
        return await asyncio.wrap_future(future)
    finally:
        stop.set()


async def warm(worker: Worker, engine: Engine, prompt_ids: list[int], should_stop: Callable[[], bool]) -> tuple[int, int]:
    """Run ``engine.warm`` on the worker at the lowest priority (``Priority.BACKGROUND``): how
    many of the tokens the engine holds, and how many it computed. Cancelling the awaiting
    task stops it before its next chunk."""
    stop = threading.Event()
    future = worker.submit(lambda: engine.warm(prompt_ids, lambda: stop.is_set() or should_stop()), Priority.BACKGROUND, stop)
    try:
        return await asyncio.wrap_future(future)
    finally:
        stop.set()
