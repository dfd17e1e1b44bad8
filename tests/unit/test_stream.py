"""engine.stream(): text from the worker thread reaches the event loop in order, joined into
one piece when tokens come faster than the loop takes them (a fake engine: this is a unit test
of the hand-off, not of a model)."""

from __future__ import annotations

import asyncio
import threading
import time

from lsp_server.engine import Priority, Sampling, Worker, stream


class Letters:
    """Token i is the letter chr(97 + i % 26)."""

    def decode(self, ids, **_):
        return "".join(chr(97 + i % 26) for i in ids)


class FakeEngine:
    tokenizer = Letters()
    context_window = 1000
    description = "fake"

    def __init__(self, tokens, started=None, go=None):
        self.tokens, self.started, self.go = tokens, started, go

    def generate(self, prompt_ids, sampling, should_stop, on_token, priority=1, on_prompt=None):
        self.priority = priority
        if on_prompt is not None:
            on_prompt(len(prompt_ids) - 1)
        if self.started is not None:
            self.started.set()
            self.go.wait(5)
        for t in self.tokens:
            if should_stop():
                return [], "cancelled"
            on_token(t)
        return list(self.tokens), "stop"


async def test_pieces_arrive_in_order_and_join_when_the_loop_is_busy():
    worker = Worker()
    started, go = threading.Event(), threading.Event()
    engine = FakeEngine(list(range(200)), started, go)
    pieces: list[str] = []
    counts: list[int] = []
    task = asyncio.ensure_future(stream(worker, engine, [1], Sampling(), Priority.USER, pieces.append, counts.append))
    while not started.is_set():
        await asyncio.sleep(0.01)
    go.set()
    time.sleep(0.3)  # the event loop is busy while all 200 tokens are produced
    result = await task
    expected = "".join(chr(97 + i % 26) for i in range(200))
    assert result.text == "".join(pieces) == expected
    assert len(pieces) <= 2  # one wake-up for the burst (and at most one for the tail)
    assert counts[-1] == 200  # the token count still counts tokens, not pieces
    # a slow producer: every token is its own piece
    slow = FakeEngine([0, 1, 2])
    slow_generate = slow.generate

    def paced(prompt_ids, sampling, should_stop, on_token, priority=1, on_prompt=None):
        return slow_generate(prompt_ids, sampling, should_stop, lambda t: (on_token(t), time.sleep(0.05)), priority,
                             on_prompt)

    slow.generate = paced
    pieces.clear()
    result = await stream(worker, slow, [1, 2, 3], Sampling(), Priority.HOVER, pieces.append)
    assert pieces == ["a", "b", "c"]
    # what the engine reported, and the timings: the first token before the last of three paced ones
    assert (result.prompt_tokens, result.cached_tokens, result.completion_tokens) == (3, 2, 3)
    assert 0 <= result.first_token_s < result.seconds and result.seconds >= 0.1
    assert engine.priority == Priority.USER and slow.priority == Priority.HOVER  # the engine orders by it
    worker.close()


def test_each_generation_is_logged_in_one_line():
    from lsp_server.engine import Generation
    from lsp_server.server import _summary

    done = Generation("x", "stop", 1200, 45, cached_tokens=1100, first_token_s=0.09, seconds=1.25)
    assert _summary("Fix", done) == (
        "Fix: prompt 1200 tokens (1100 from the cache), 45 tokens in 1.25 s, the first after 90 ms "
        "(37.9 tokens/s after it), stop")
    nothing = Generation("", "cancelled", 30, 0, seconds=0.01)
    assert _summary("Hover", nothing) == "Hover: prompt 30 tokens (0 from the cache), 0 tokens in 0.01 s, cancelled"


async def test_until_stops_the_engine_and_the_generation_ends_as_stop():
    """``until`` sees the text so far; once it holds, the engine stops before its next token and
    the answer is a normal one (an inline completion that has its line)."""
    worker = Worker()
    engine = FakeEngine(list(range(200)))
    seen: list[str] = []

    def until(text: str) -> bool:
        seen.append(text)
        return text.endswith("e")

    result = await stream(worker, engine, [1], Sampling(), Priority.USER, until=until)
    assert result.text == "abcde" and result.finish_reason == "stop"
    assert seen == ["a", "ab", "abc", "abcd", "abcde"]
    worker.close()
