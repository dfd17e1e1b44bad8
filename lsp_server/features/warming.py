"""Speculative work: 0.75 s (``WARM_DELAY``) after a document is opened or last edited, the
engine computes the prompt prefix every request on it starts with (system prompt, path, the
whole file: ``prompts.requests.document_prefix``), so that the first code action or chat on it,
and its first hover when the file fits ``hoverContextTokens`` too, computes only its own part
(expected on an H200 from its measured prefill times, not yet measured this way: about 14 ms
instead of about 98 ms to the first token of a hover on a 2K-token file).

A warm-up is the lowest-priority work there is: it starts only while no request generates,
stops before its next chunk when one arrives or the document changes again (what it computed
by then stays, and it goes on later), never shows in the editor (no progress, no status;
``$/logTrace`` says what it did), and never takes the place of a cache an explicit request
filled (``Engine.warm``). Only the document touched last is warmed; setting ``warmCache``
turns it off."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from lsprotocol import types

from ..engine import Busy, EngineError, warm
from ..prompts.requests import document_prefix, prompt_budget
from ..server import StarChatServer, looks_secret

log = logging.getLogger(__name__)

WARM_DELAY = 0.75  # seconds after the last didOpen/didChange


class Warmer:
    def __init__(self, server: StarChatServer):
        self.server = server
        self._uri: str | None = None  # the document touched last
        self._timer: asyncio.TimerHandle | None = None
        self._running: asyncio.Task | None = None
        self._stop = threading.Event()  # of the warm-up running now
        self._warmed: tuple | None = None  # (uri, version, text hash, engine id, settings) of the last one done

    def touch(self, uri: str) -> None:
        """``uri`` was opened or changed: a running warm-up is out of date (it stops, keeping
        what it computed), and this one starts once the editor has been quiet for ``WARM_DELAY``."""
        if looks_secret(uri):
            return
        self._uri = uri
        self._stop.set()
        self._arm()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(WARM_DELAY, self._fire)

    def _fire(self) -> None:
        self._timer = None
        server = self.server
        ready = server.engine_ready
        if server.shutting_down or not server.settings.warm_cache or self._uri is None:
            return
        if ready is not None and ready.done() and ready.exception() is not None:
            return  # no engine: the next load's documents are touched again when edited
        if ready is None or not ready.done() or server.generating or self._running is not None:
            self._arm()  # later, when the model is loaded and nothing else runs
            return
        self._stop = threading.Event()
        self._running = server.run_in_background(self._warm(self._uri, ready.result(), self._stop))
        self._running.add_done_callback(lambda _: setattr(self, "_running", None))

    async def _warm(self, uri: str, engine, stop: threading.Event) -> None:
        server = self.server
        document = server.protocol.documents.get(uri)
        if document is None:
            return
        settings = server.settings
        text, _ = server.surrounding(uri, document.source)
        key = (uri, document.version, hash(text), id(engine), settings.system_prompt, settings.context_window,
               settings.max_new_tokens)
        if key == self._warmed:
            return
        path = server.relative_path(uri)
        budget = prompt_budget(settings.context_window, engine.context_window, settings.max_new_tokens)
        prefix = await asyncio.to_thread(document_prefix, server.prompt_format(engine), system=settings.system_prompt,
                                         budget=budget, text=text, path=path, language=document.language_id or "")
        if not prefix:
            server.trace(f"Warm-up of {path}: the file does not fit in a prompt whole; nothing to share")
            self._warmed = key
            return
        started = time.monotonic()
        try:
            held, computed = await warm(server.worker, engine, prefix, lambda: stop.is_set() or server.generating)
        except (Busy, EngineError) as exc:
            log.info("warm-up of %s failed: %s", path, exc)
            return
        elapsed = (time.monotonic() - started) * 1000
        done = f"Warm-up of {path}: {computed} of {len(prefix)} prompt tokens computed in {elapsed:.0f} ms"
        if held == len(prefix):
            self._warmed = key
            server.trace(done)
        elif stop.is_set() or server.generating:
            server.trace(done + " (stopped: the rest later)")
            self._arm()
        else:  # every cache it could go to holds an explicit request's work: not again for this version
            self._warmed = key
            server.trace(f"Warm-up of {path}: nothing kept (the engine's caches hold requests' work)")


def register(server: StarChatServer) -> None:
    warmer = Warmer(server)

    @server.feature(types.TEXT_DOCUMENT_DID_OPEN)
    def opened(ls: StarChatServer, params: types.DidOpenTextDocumentParams) -> None:
        warmer.touch(params.text_document.uri)

    @server.feature(types.TEXT_DOCUMENT_DID_CHANGE)
    def changed(ls: StarChatServer, params: types.DidChangeTextDocumentParams) -> None:
        warmer.touch(params.text_document.uri)

    @server.feature(types.NOTEBOOK_DOCUMENT_DID_OPEN)
    def notebook_opened(ls: StarChatServer, params: types.DidOpenNotebookDocumentParams) -> None:
        if params.cell_text_documents:
            warmer.touch(params.cell_text_documents[0].uri)

    @server.feature(types.NOTEBOOK_DOCUMENT_DID_CHANGE)
    def notebook_changed(ls: StarChatServer, params: types.DidChangeNotebookDocumentParams) -> None:
        cells = params.change.cells
        if cells is not None and cells.text_content:
            warmer.touch(cells.text_content[-1].document.uri)
