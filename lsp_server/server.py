"""The language server object: settings, the engine and its worker, in-flight work. No handlers
here; :mod:`lsp_server.setup` registers them."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable
from urllib.parse import unquote, urlsplit

import attrs
from lsprotocol import types
from pygls.exceptions import JsonRpcException, JsonRpcInternalError, JsonRpcRequestCancelled
from pygls.io_ import StdoutWriter
from pygls.lsp.server import LanguageServer
from pygls.protocol import JsonRPCNotification, JsonRPCRequestMessage, default_converter
from pygls.uris import to_fs_path

from . import __version__
from .completion_model import CompletionModel
from .config import Settings, merge, reloads_model
from .engine import Busy, Engine, EngineError, Generation, Priority, Sampling, Worker, load_engine, stream
from .prompts import PromptFormat, format_for
from .prompts.cells import join_cells
from .prompts.fill import FillFormat, fill_format
from .protocol import STATUS, StatusParams
from .transport import COMMAND_WORK_DONE_TOKEN, StarChatProtocol, StreamReaderAdapter, serve

log = logging.getLogger(__name__)


def make_converter():
    """pygls's converter, except that custom methods' params stay plain JSON (pygls turns them
    into namedtuples); the handlers structure them into the typed payloads of protocol.py."""
    converter = default_converter()

    def keep_params(obj: dict, cls: type) -> Any:
        return cls(**{field.name: obj.get(field.name) for field in attrs.fields(cls)})

    converter.register_structure_hook(JsonRPCRequestMessage, keep_params)
    converter.register_structure_hook(JsonRPCNotification, keep_params)
    return converter


_SECRET_NAMES = re.compile(r"(^|/)(\.env(\..*)?|\.netrc|\.pgpass|id_(rsa|dsa|ecdsa|ed25519)(\.pub)?|credentials(\.json)?)$|\.(pem|key|p12|pfx|jks|keystore)$")


def looks_secret(uri: str) -> bool:
    return bool(_SECRET_NAMES.search(uri.split("?")[0].lower()))


class RequestFailed(JsonRpcException):
    """LSP 3.17 RequestFailed: the request was valid but could not be done; the message says why."""

    CODE = -32803


# Every notebook, every cell (markdown cells reach prompts as comments, see surrounding()).
NOTEBOOK_SYNC = types.NotebookDocumentSyncOptions(
    notebook_selector=[types.NotebookDocumentFilterWithCells(notebook="*", cells=[types.NotebookCellLanguage(language="*")])])


class StarChatServer(LanguageServer):
    def __init__(self, settings: Settings | None = None):
        super().__init__("starchat-lsp", __version__, protocol_cls=StarChatProtocol, converter_factory=make_converter,
                         notebook_document_sync=NOTEBOOK_SYNC)
        self.base_settings = settings or Settings()  # defaults + command line
        self.settings = self.base_settings
        self.init_options: Any = None
        self.worker = Worker(self.settings.queue_size)
        self.completion_model = CompletionModel(self)
        self.engine: Engine | None = None  # the loaded one, closed on reload
        self.engine_ready: asyncio.Future[Engine] | None = None
        self.configured = asyncio.Event()  # set once `initialized` has gathered the settings
        self._pulls = 0  # settings pulls under way (didChangeConfiguration)
        self._settled = asyncio.Event()  # set while none is
        self._settled.set()
        self.converter = self.protocol._converter
        self.hover_cache: OrderedDict[tuple, types.Hover | None] = OrderedDict()
        self.proposed_completions: OrderedDict[str, Any] = OrderedDict()  # by URI (features/inline_completion.py)
        self._background: set[asyncio.Task] = set()
        self.shutting_down = False
        self.serving_tcp = False
        self.last_status: tuple[str, str] | None = None
        self.loaded_settings: Settings | None = None  # those of the last load started (needs_load)
        self._generating = 0  # requests inside generate(): the status is "ready" when none is
        self._format: PromptFormat | None = None
        self._format_engine: Engine | None = None
        self._fill_format: FillFormat | None = None
        self._fill_engine: Engine | None = None

    # ---- settings -------------------------------------------------------------------------
    def apply_settings(self, init: Any, live: Any = None) -> None:
        """Recompute settings from the command line, the editor's ``initializationOptions`` and
        its configuration (``live``: pulled, or pushed by didChangeConfiguration), where a setting
        given as null is the command line's (VS Code: a setting reset is back to the default, also
        when initializationOptions set it). Tells the user about bad values."""
        settings, problems = merge(self.base_settings, init)
        settings, found = merge(settings, live, unset=self.base_settings)
        problems += found
        for problem in problems:
            self.show_message(problem, types.MessageType.Warning)
        self.settings = settings
        self.worker.queue_size = settings.queue_size
        if self.configured.is_set():  # else `initialized` loads it, with the editor's settings
            self.completion_model.update()

    def needs_load(self) -> bool:
        """Whether the settings need a model other than the one loaded (or being loaded): none
        yet, or one loaded with other model settings (an editor's change, or a TCP editor
        connecting with its own)."""
        return self.engine_ready is None or reloads_model(self.loaded_settings, self.settings)

    async def pulling_settings(self, pull: Callable[[], Any]) -> Any:
        """Run ``pull`` (the editor's settings, after didChangeConfiguration); requests that
        arrive meanwhile wait for it (``settled_settings``), so that a request sent right after
        a settings change runs with the new settings."""
        self._pulls += 1
        self._settled.clear()
        try:
            return await pull()
        finally:
            self._pulls -= 1
            if not self._pulls:
                self._settled.set()

    async def settled_settings(self) -> Settings:
        """The settings, once no pull of the editor's is under way."""
        await self._settled.wait()
        return self.settings

    # ---- engine ---------------------------------------------------------------------------
    def start_loading(self) -> None:
        """Load (or reload) the model in the background; requests wait for it."""
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[Engine] = loop.create_future()
        ready.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)  # no "never retrieved"
        self.engine_ready = ready
        self.loaded_settings = self.settings
        self.run_in_background(self._load(self.settings, ready))

    async def _load(self, settings: Settings, ready: asyncio.Future) -> None:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        self.status("loading", f"Loading {settings.model}")
        async with WorkDone(self, "StarChat: loading the model") as progress:
            old, self.engine = self.engine, None
            if old is not None:
                self.worker.submit(old.close, Priority.LOAD)

            def work() -> Engine:
                engine = load_engine(settings, lambda msg: loop.call_soon_threadsafe(progress.report, msg))
                try:
                    format_for(engine.tokenizer)
                except ValueError as exc:  # a model that cannot be prompted as a chat model
                    engine.close()
                    raise EngineError(f"{settings.model} cannot be used: {exc}") from None
                return engine

            try:
                engine = await asyncio.wrap_future(self.worker.submit(work, Priority.LOAD))
            except Exception as exc:
                message = str(exc) if isinstance(exc, EngineError) else f"Could not load {settings.model}: {type(exc).__name__}: {exc}"
                if not isinstance(exc, EngineError):
                    log.exception("model load failed")
                if ready is not self.engine_ready:
                    ready.set_exception(_Superseded())
                    return
                ready.set_exception(EngineError(message))
                self.status("error", message)
                self.show_message(message, types.MessageType.Error)
                return
        if ready is not self.engine_ready:  # settings changed while loading: waiters move on
            self.worker.submit(engine.close, Priority.LOAD)
            ready.set_exception(_Superseded())
            return
        self.engine = engine
        self.worker.set_concurrency(getattr(engine, "max_batch", 1))
        ready.set_result(engine)
        log.info("model ready in %.1f s: %s", time.monotonic() - started, engine.description)
        self.status("ready", f"Ready: {engine.description}")

    async def ready_engine(self) -> Engine:
        """The loaded engine; waits (bounded, with progress) while the client finishes
        initializing and the model loads (again, if settings changed meanwhile)."""
        await self.settled_settings()
        ready = self.engine_ready
        if ready is None or not ready.done():
            async with WorkDone(self, "StarChat: waiting for the model to load"):
                try:
                    async with asyncio.timeout(self.settings.load_timeout):
                        await self.configured.wait()
                        while not (ready := self.engine_ready).done() or isinstance(ready.exception(), _Superseded):
                            await asyncio.wait([ready])
                except TimeoutError:
                    raise RequestFailed(
                        f"The model is still loading after {self.settings.load_timeout:.0f} s (setting loadTimeout)."
                    ) from None
        assert ready is not None
        if ready.exception() is not None:
            raise RequestFailed(str(ready.exception()))
        return ready.result()

    def prompt_format(self, engine: Engine) -> PromptFormat:
        """How to prompt the loaded model (looked up once per engine: the vocabulary is large)."""
        if self._format_engine is not engine:
            self._format, self._format_engine = format_for(engine.tokenizer), engine
        return self._format

    def fill_format(self, engine: Engine) -> FillFormat | None:
        """How to prompt ``engine``'s model to fill in the middle; None when it cannot."""
        if self._fill_engine is not engine:
            self._fill_format, self._fill_engine = fill_format(engine.tokenizer), engine
        return self._fill_format

    async def completion_engine(self) -> tuple[Engine, Worker]:
        """The model that fills in the middle and its worker: the completion model when
        ``completionModel`` names one (waiting while it loads), else the chat model."""
        ready = self.completion_model.ready
        if ready is None:
            return await self.ready_engine(), self.worker
        try:
            return await ready, self.completion_model.worker
        except EngineError as exc:
            raise RequestFailed(str(exc)) from None

    async def generate(
        self,
        prompt_ids: list[int],
        *,
        title: str,
        priority: Priority = Priority.USER,
        max_new_tokens: int | None = None,
        work_done_token: Any = None,
        on_text: Callable[[str], None] | None = None,
        until: Callable[[str], bool] | None = None,
        quiet: bool = False,
        engine: tuple[Engine, Worker] | None = None,
    ) -> Generation:
        """Run the model with progress (``work_done_token``, else a command request's own, else
        one the server creates; ``quiet``: only the client's own token, and no "generating"
        status: for work as frequent as typing); cancelling the calling task stops the decoding
        loop. ``until``: see :func:`engine.stream`. ``engine``: another model and its worker
        (the completion model) instead of the chat model."""
        if work_done_token is None:
            work_done_token = COMMAND_WORK_DONE_TOKEN.get()
        model, worker = engine if engine is not None else (await self.ready_engine(), self.worker)
        sampling = Sampling.from_settings(self.settings, max_new_tokens)
        async with WorkDone(self, title, token=work_done_token, cancellable=True, create=not quiet) as progress:
            streamed = 0

            def on_count(tokens: int) -> None:
                nonlocal streamed
                streamed = tokens
                progress.report(_tokens(tokens), throttle=True)

            def on_piece(delta: str) -> None:
                if on_text is not None:
                    on_text(delta)

            if not quiet:
                self.status("generating", title)
            self._generating += 1
            try:
                generation = await stream(worker, model, prompt_ids, sampling, priority, on_piece, on_count,
                                          time_limit=self.settings.request_timeout, until=until)
            except (Busy, EngineError) as exc:
                progress.end_message = f"Failed after {_tokens(streamed)}"
                raise RequestFailed(str(exc)) from None
            except asyncio.CancelledError:
                progress.end_message = f"Stopped after {_tokens(streamed)}"
                self.trace(f"{title}: {progress.end_message.lower()}")
                raise
            finally:
                self._generating -= 1
                ready = self.engine_ready
                if self._generating == 0 and ready is not None and ready.done() and not ready.exception():
                    if self.last_status != (status := ("ready", f"Ready: {ready.result().description}")):
                        self.status(*status)
            if generation.finish_reason == "cancelled":  # stopped by shutdown: no half answer
                raise JsonRpcRequestCancelled("The server is shutting down; the request was stopped.")
            progress.end_message = _tokens(generation.completion_tokens)
            self.trace(_summary(title, generation))
            return generation

    @property
    def generating(self) -> bool:
        """Whether a request is inside ``generate`` (read from the engine's threads too)."""
        return self._generating > 0

    # ---- documents ------------------------------------------------------------------------
    def open_document(self, uri: str):
        """The editor's copy of a document. Only documents the editor opened are read: the server
        never goes to the disk for a URI it was sent; files that look like secrets are refused."""
        if looks_secret(uri):  # first: clients need not send such files at all
            raise RequestFailed("This file looks like it holds secrets (keys, .env); StarChat does not read it.")
        document = self.protocol.documents.get(uri)
        if document is None:
            raise RequestFailed("The document is not open in the editor (send textDocument/didOpen first).")
        return document

    def surrounding(self, uri: str, text: str) -> tuple[str, int]:
        """The code a prompt shows around document ``uri`` whose text is ``text``, and where
        ``text`` starts in it: the document itself, or for a notebook cell the notebook's cells
        of its language with its markdown cells as comments (``prompts.cells.join_cells``), with
        ``text`` in the cell's place."""
        notebook = self.protocol.notebook_of(uri)
        if notebook is None or uri not in self.protocol.documents:
            return text, 0
        documents = [self.protocol.documents.get(cell) for cell in self.protocol.notebooks[notebook]]
        cells = [document for document in documents if document is not None]
        at = next(i for i, document in enumerate(cells) if document.uri == uri)
        return join_cells([(document.language_id, document.text) for document in cells], at, text)

    def relative_path(self, uri: str) -> str:
        """The document's name in prompts: its path in the workspace folder that holds it, else
        its file name. A document that is not a file (VS Code's ``untitled:Untitled-1``, a
        notebook cell, a remote file) is matched with the folders by URI, else named by the last
        part of its URI's path; no line breaks or backticks from its escapes reach the prompt.
        A cell of a synced notebook is named as its notebook."""
        if (notebook := self.protocol.notebook_of(uri)) is not None:
            return self.relative_path(notebook)
        folders = [*self.workspace.folders.values(),
                   *([types.WorkspaceFolder(self.workspace.root_uri, "root")] if self.workspace.root_uri else [])]
        path = to_fs_path(uri)
        if path is None:
            parts = urlsplit(uri)
            name = parts.path.rstrip("/").rpartition("/")[2]
            for folder in folders:
                base = urlsplit(folder.uri)
                root = base.path.rstrip("/") + "/"
                if (base.scheme, base.netloc) == (parts.scheme, parts.netloc) and parts.path.startswith(root):
                    name = parts.path[len(root):]
                    break
            return re.sub(r"[\x00-\x1f\x7f`]", "", unquote(name))
        for folder in folders:
            root = to_fs_path(folder.uri)
            if root and Path(path).is_relative_to(root):
                return Path(path).relative_to(root).as_posix()
        return Path(path).name

    @property
    def position_encoding(self) -> str:
        return self.protocol.negotiated_encoding()

    # ---- talking to the user --------------------------------------------------------------
    def show_message(self, message: str, kind: types.MessageType = types.MessageType.Info) -> None:
        if not self.shutting_down:
            self.window_show_message(types.ShowMessageParams(type=kind, message=message))

    def trace(self, message: str) -> None:
        """Log ``message``, and send it as ``$/logTrace`` when the client asked for a trace
        (``trace`` in ``initialize``, or ``$/setTrace``: "messages" or "verbose")."""
        log.info("%s", message)
        if self.protocol.trace not in (None, types.TraceValue.Off) and not self.shutting_down:
            self.log_trace(types.LogTraceParams(message=message))

    def status(self, state: str, message: str) -> None:
        self.last_status = (state, message)  # told again to an editor that connects later (TCP)
        if not self.shutting_down:
            self.protocol.notify(STATUS, StatusParams(state=state, message=message))  # type: ignore[arg-type]

    def report_server_error(self, error: Exception, source: Any) -> None:
        """Errors outside a request are logged; the user hears only about what they can act on."""
        expected = isinstance(error, JsonRpcException) and not isinstance(error, JsonRpcInternalError)
        log.log(logging.INFO if expected else logging.ERROR, "%s: %s", getattr(source, "__name__", source), error)

    def experimental(self, name: str) -> Any:
        """A flag from the client's ``capabilities.experimental.starchat`` object."""
        experimental = self.client_capabilities.experimental
        if isinstance(experimental, dict) and isinstance(experimental.get("starchat"), dict):
            return experimental["starchat"].get(name)
        return None

    async def watch_editor(self, pid: int, every: float = 2.0) -> None:
        """Exit when the editor process that started us is gone (LSP ``processId``)."""
        while True:
            await asyncio.sleep(every)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                log.warning("the editor (process %d) is gone: exiting", pid)
                self.leave(1)
            except PermissionError:
                pass  # alive, owned by someone else

    def run_in_background(self, coroutine: Any) -> asyncio.Task:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)

        def done(finished: asyncio.Task) -> None:
            self._background.discard(finished)
            if not finished.cancelled() and finished.exception() is not None:
                log.error("background task failed", exc_info=finished.exception())

        task.add_done_callback(done)
        return task

    # ---- transports -----------------------------------------------------------------------
    def start_io(self, stdin: Any = None, stdout: Any = None) -> None:
        """Serve on stdin/stdout. The end of stdin means the editor is gone: the server exits."""
        self.protocol.set_writer(StdoutWriter(stdout or sys.stdout.buffer))
        try:
            asyncio.run(self._serve_stream(stdin or sys.stdin.buffer))
        except BrokenPipeError:
            log.warning("the editor closed the connection")
        finally:
            self.close()

    async def _serve_stream(self, stdin: Any) -> None:
        loop = asyncio.get_running_loop()
        stream = asyncio.StreamReader()

        fd = stdin.fileno()

        def pump() -> None:
            """A thread of its own (never blocked by engine work) reading the raw descriptor: a
            buffered reader's lock held at interpreter exit would abort the process."""
            try:
                while chunk := os.read(fd, 1 << 16):
                    loop.call_soon_threadsafe(stream.feed_data, chunk)
            except (OSError, RuntimeError):  # closed, or the loop is gone
                pass
            try:
                loop.call_soon_threadsafe(stream.feed_eof)
            except RuntimeError:
                pass

        threading.Thread(target=pump, name="starchat-stdin", daemon=True).start()
        await serve(self.protocol, StreamReaderAdapter(stream), lambda: self.settings.max_message_bytes)
        log.info("stdin closed: exiting")
        self.leave(0 if self.protocol._shutdown else 1)

    def start_tcp(self, host: str, port: int) -> None:
        """Serve TCP, one editor connection at a time: a connection made while another stays open
        for one more second is closed (the open one keeps the server; the second lets an editor
        reconnect before the end of its old connection has been seen). When the editor
        disconnects, its session is forgotten (requests cancelled, documents dropped) and the
        next connection starts afresh: it must ``initialize`` again, with the token when one is
        required. ``shutdown`` and ``exit`` end a session too, not the process: the model stays
        loaded for the next editor (an editor's restart or reload is a reconnection). The process
        ends on SIGINT or SIGTERM."""
        from .transport import DiscardWriter, keep_alive

        self.serving_tcp = True  # the editor did not start this process: its processId is not watched
        free = asyncio.Event()  # no editor connected
        free.set()
        previous: asyncio.Future | None = None  # the last session's end, awaited before the next begins

        async def forget(pending: list[asyncio.Future]) -> None:
            if pending:
                _, left = await asyncio.wait(pending, timeout=10)
                if left:
                    log.warning("%d requests of the last connection did not stop in 10 s", len(left))
            await asyncio.sleep(0)  # their replies, to the discarding writer

        async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal previous
            peer = writer.get_extra_info("peername")
            # an editor reconnecting may get here before the end of its old connection is seen
            deadline = asyncio.get_running_loop().time() + 1.0
            while not free.is_set():  # again after waking: another connection may have taken it
                try:
                    await asyncio.wait_for(free.wait(), deadline - asyncio.get_running_loop().time())
                except TimeoutError:
                    log.warning("refused a TCP connection from %s: another editor is connected", peer)
                    writer.close()
                    return
            free.clear()
            try:
                if previous is not None:
                    await previous
                keep_alive(writer.get_extra_info("socket"))
                log.info("editor connected from %s", peer)
                self.protocol.set_writer(writer)  # type: ignore[arg-type]
                await serve(self.protocol, StreamReaderAdapter(reader), lambda: self.settings.max_message_bytes)
            except ConnectionError:
                pass
            finally:
                writer.close()
                self.protocol.set_writer(DiscardWriter())
                log.info("editor at %s disconnected: waiting for the next connection", peer)
                pending = self.protocol.end_session()
                self.init_options = None
                self.configured.clear()
                self.hover_cache.clear()
                previous = asyncio.ensure_future(forget(pending))
                free.set()

        async def main() -> None:
            server = await asyncio.start_server(connection, host, port)
            log.info("serving on %s", ", ".join(str(s.getsockname()) for s in server.sockets))
            async with server:
                await server.serve_forever()

        try:
            asyncio.run(main())
        except KeyboardInterrupt:  # Ctrl-C: the way to stop a TCP server
            log.info("interrupted: exiting")
            self.leave(0)
        finally:
            self.close()

    def leave(self, code: int) -> None:
        """End the process now. Interpreter finalization is skipped on purpose: a model load or a
        decoding step still inside torch's C++ when Python finalizes aborts the process."""
        self.close()
        logging.shutdown()
        try:
            sys.stdout.flush()
        finally:
            os._exit(code)

    def close(self, wait: float = 3.0) -> None:
        """Stop all work and send nothing more; wait up to ``wait`` seconds for the engine's
        threads to stop."""
        if self.shutting_down:
            return
        self.shutting_down = True
        for task in list(self._background):
            task.cancel()
        self.worker.close(wait)
        self.completion_model.close(wait)


def _tokens(count: int) -> str:
    return f"{count} token{'s' if count != 1 else ''}"


def _summary(title: str, g: Generation) -> str:
    """One log line per generation: what the prompt cost and how fast the answer came."""
    first = f", the first after {g.first_token_s * 1000:.0f} ms" if g.first_token_s is not None else ""
    decoding = g.seconds - (g.first_token_s or 0.0)
    rate = f" ({(g.completion_tokens - 1) / decoding:.1f} tokens/s after it)" if g.completion_tokens > 1 and decoding > 0 else ""
    return (f"{title}: prompt {g.prompt_tokens} tokens ({g.cached_tokens} from the cache), "
            f"{_tokens(g.completion_tokens)} in {g.seconds:.2f} s{first}{rate}, {g.finish_reason}")


class _Superseded(Exception):
    """A load whose settings changed before it finished; a newer load replaces it."""


class WorkDone:
    """Work-done progress for one piece of work: the client's token if it sent one, else a token
    the server creates when the client supports that. Cancelling from the client's progress UI
    cancels the task that owns this progress."""

    def __init__(self, server: StarChatServer, title: str, token: Any = None, cancellable: bool = False,
                 create: bool = True):
        self.server = server
        self.create = create
        self.title = title
        self.token = token
        self.cancellable = cancellable
        self.end_message: str | None = None  # the outcome, sent with the end
        self._last_report = 0.0

    async def __aenter__(self) -> "WorkDone":
        progress = self.server.work_done_progress
        window = self.server.client_capabilities.window
        if self.token is None and self.create and window is not None and window.work_done_progress:
            token = f"starchat-{uuid.uuid4().hex[:12]}"
            try:
                await asyncio.wait_for(progress.create_async(token), 10)
                self.token = token
            except Exception:
                log.debug("client did not accept a progress token")
        if self.token is None:
            return self
        progress.begin(self.token, types.WorkDoneProgressBegin(title=self.title, cancellable=self.cancellable))
        if self.cancellable:
            task = asyncio.current_task()
            loop = asyncio.get_running_loop()
            assert task is not None

            def on_cancel(future: Any) -> None:
                if future.cancelled():
                    loop.call_soon_threadsafe(task.cancel)

            progress.tokens[self.token].add_done_callback(on_cancel)
        return self

    def report(self, message: str, throttle: bool = False) -> None:
        if self.token is None or self.server.shutting_down:
            return
        now = time.monotonic()
        if throttle and now - self._last_report < 0.2:
            return
        self._last_report = now
        self.server.work_done_progress.report(self.token, types.WorkDoneProgressReport(message=message))

    async def __aexit__(self, *exc_info: Any) -> None:
        if self.token is None or self.server.shutting_down:
            return
        self.server.work_done_progress.end(self.token, types.WorkDoneProgressEnd(message=self.end_message))
        self.server.work_done_progress.tokens.pop(self.token, None)
