"""The server's side of warm-ups (features/warming.py): when they start, stop and go on. The
engine is a fake here (its own warm-up is tested in test_fast_engine.py and
test_generate_engine.py, and the whole path end to end in tests/e2e/test_features.py)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from lsp_server.documents import Document
from lsp_server.features import warming
from lsp_server.setup import create_server
from lsp_server.testing import scenarios as sc


class SlowEngine:
    """Computes one token per ``step`` seconds until told to stop; holds what it computed."""

    context_window = 2048
    description = "fake"

    def __init__(self, tokenizer, step: float = 0.002):
        self.tokenizer = tokenizer
        self.step = step
        self.held: list[int] = []
        self.calls: list[tuple[int, int]] = []  # (held, computed) of each call
        self.started = threading.Event()

    def warm(self, prompt_ids, should_stop):
        self.started.set()
        done = len(self.held) if prompt_ids[: len(self.held)] == self.held else 0
        start = done
        while done < len(prompt_ids) and not should_stop():
            threading.Event().wait(self.step)
            done += 1
        self.held = list(prompt_ids[:done])
        self.calls.append((done, done - start))
        return done, done - start


@pytest.fixture
async def server(tokenizer, monkeypatch):
    monkeypatch.setattr(warming, "WARM_DELAY", 0.05)
    server = create_server()
    server.relative_path = lambda uri: "calc.py"
    engine = SlowEngine(tokenizer)
    ready = asyncio.get_running_loop().create_future()
    ready.set_result(engine)
    server.engine_ready, server.engine = ready, engine
    server.protocol.documents["file:///calc.py"] = Document("file:///calc.py", sc.CALC_PY, 1, "python")
    yield server
    server.close(wait=1)


async def wait_for(predicate, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


async def test_a_warm_up_stopped_by_a_request_goes_on_once_it_is_done(server):
    warmer, engine = warming.Warmer(server), server.engine
    warmer.touch("file:///calc.py")
    await asyncio.to_thread(engine.started.wait, 5)
    await asyncio.sleep(0.02)
    server._generating = 1  # a request arrives: the warm-up stops before its next chunk
    await wait_for(lambda: engine.calls)
    (held, computed), = engine.calls
    assert 0 < held == computed
    await asyncio.sleep(0.3)
    assert len(engine.calls) == 1  # nothing starts while the request generates
    server._generating = 0
    await wait_for(lambda: len(engine.calls) == 2)
    total, rest = engine.calls[1]
    assert rest == total - held  # from where it stopped
    await asyncio.sleep(0.3)
    assert len(engine.calls) == 2  # done: not again for this version


async def test_a_newer_edit_stops_the_running_warm_up(server):
    warmer, engine = warming.Warmer(server), server.engine
    engine.step = 0.02
    warmer.touch("file:///calc.py")
    await asyncio.to_thread(engine.started.wait, 5)
    document = server.protocol.documents["file:///calc.py"]
    document.apply("# edited\n", None, None, "utf-16")
    document.version = 2
    warmer.touch("file:///calc.py")
    await wait_for(lambda: engine.calls)
    held, _ = engine.calls[0]
    assert held < 20  # stopped early, not run to the end of the old version
    await wait_for(lambda: len(engine.calls) == 2)
    assert engine.held and engine.calls[1][0] == len(engine.held)


async def test_no_warm_up_without_the_setting_or_for_a_secret_file(server):
    warmer, engine = warming.Warmer(server), server.engine
    server.protocol.documents["file:///.env"] = Document("file:///.env", "TOKEN=1\n", 1, "")
    warmer.touch("file:///.env")
    await asyncio.sleep(0.3)
    assert engine.calls == []
    server.settings = server.settings.replace(warm_cache=False)
    warmer.touch("file:///calc.py")
    await asyncio.sleep(0.3)
    assert engine.calls == []
