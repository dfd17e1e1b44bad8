"""A model of its own for inline completions (setting ``completionModel``), beside the chat model.

StarChat-beta keeps StarCoder's fill-in-the-middle tokens, but whether its chat fine-tune kept
the skill is not measured; a StarCoder-family base model (``bigcode/starcoderbase-1b`` … ``-7b``)
was trained for it, and a small one answers a keystroke sooner. It loads in the background when
the setting names one (with the chat model's ``device``, ``dtype``, ``engine`` and trust
settings), runs on a worker thread of its own (a completion never waits behind a chat answer),
and is closed when the setting changes or the server stops. Empty: the chat model completes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from lsprotocol import types

from .engine import Engine, EngineError, Priority, Worker, load_engine
from .prompts.fill import fill_format

if TYPE_CHECKING:
    from .server import StarChatServer

log = logging.getLogger(__name__)

# the chat model's settings a completion model is loaded with too
SHARED = ("device", "dtype", "engine", "fast_max_batch", "trust_remote_code", "allow_unsafe_weights")


class CompletionModel:
    def __init__(self, server: "StarChatServer"):
        self.server = server
        self.worker = Worker(server.settings.queue_size, name="starchat-completion")
        self.ready: asyncio.Future[Engine] | None = None  # None: no model of its own
        self._key: tuple | None = None
        self._engine: Engine | None = None

    def update(self) -> None:
        """Load, replace or drop the model the settings name (from the event loop)."""
        settings = self.server.settings
        self.worker.queue_size = settings.queue_size
        key = (settings.completion_model, *(getattr(settings, name) for name in SHARED)) if settings.completion_model else None
        if key == self._key:
            return
        self._key = key
        old, self._engine = self._engine, None
        if old is not None:
            self.worker.submit(old.close, Priority.LOAD)
        if key is None:
            self.ready = None
            return
        ready: asyncio.Future[Engine] = asyncio.get_running_loop().create_future()
        ready.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)  # no "never retrieved"
        self.ready = ready
        self.server.run_in_background(self._load(settings.replace(model=settings.completion_model, revision=None,
                                                                  quantization="none"), ready))

    async def _load(self, settings, ready: asyncio.Future) -> None:
        def work() -> Engine:
            engine = load_engine(settings, lambda message: log.info("completion model: %s", message))
            if fill_format(engine.tokenizer) is None:
                engine.close()
                raise EngineError(f"{settings.model} has no fill-in-the-middle tokens (<fim_prefix>, <fim_suffix>, "
                                  "<fim_middle>): it cannot complete at the cursor.")
            return engine

        try:
            engine = await asyncio.wrap_future(self.worker.submit(work, Priority.LOAD))
        except Exception as exc:
            message = str(exc) if isinstance(exc, EngineError) else f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, EngineError):
                log.exception("completion model load failed")
            message = f"Could not load the completion model {settings.model}: {message}"
            if ready is self.ready:
                ready.set_exception(EngineError(message))
                self.server.show_message(message, types.MessageType.Error)
            return
        if ready is not self.ready:  # the setting changed while it loaded
            self.worker.submit(engine.close, Priority.LOAD)
            return
        self._engine = engine
        self.worker.set_concurrency(getattr(engine, "max_batch", 1))
        ready.set_result(engine)
        self.server.trace(f"Completion model ready: {settings.model} ({engine.description})")

    @property
    def loading(self) -> bool:
        return self.ready is not None and not self.ready.done()

    def close(self, wait: float) -> None:
        self.worker.close(wait)
