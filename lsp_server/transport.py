"""Reading JSON-RPC frames robustly, and the LSP rules pygls leaves to the server author.

pygls 2.1's own reader breaks for good on a lowercase ``content-length``, allocates whatever
Content-Length claims, and gives no reply to malformed JSON or malformed params. This reader:
header names in any case and order, extra headers ignored (and lines whose name is not an HTTP
token); a frame without a usable length, or larger than ``max_message_bytes``, is skipped (its
body discarded in small pieces) and the stream goes on; bytes left over by a frame whose length
was too short (or by junk) before the next ``Content-Length`` header are dropped, so one bad
frame loses nothing after it; a body that is not JSON gets -32700, a request whose params do not
fit the method's type gets -32602 naming the field. :class:`StarChatProtocol` answers requests
before ``initialize`` with -32002, a second ``initialize`` and requests after ``shutdown`` with
-32600, and never puts tracebacks or local paths into error replies; it applies each didChange
in the negotiated position encoding, whole or not at all, and ignores one for an older version.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import re
import socket
from contextvars import ContextVar
from typing import Any, Awaitable, Callable, Protocol, Sequence

import cattrs
from lsprotocol import types
from pygls.exceptions import JsonRpcException, JsonRpcInternalError, JsonRpcInvalidParams, JsonRpcInvalidRequest, JsonRpcParseError, JsonRpcServerNotInitialized
from pygls.protocol import LanguageServerProtocol, lsp_method
from pygls.protocol.json_rpc import RPCRequest

from .documents import Document
from .text import Pos

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_DISCARD_CHUNK = 1 << 20
_CONTENT_LENGTH = b"content-length:"
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # an HTTP header name (RFC 9110 token)
_KEEP_OF_LONG_LINE = 128  # the end of an over-long line is kept: the next header may start there


def position_encoding_name(encoding: Any) -> str:
    """The negotiated position encoding as the name :mod:`lsp_server.text` takes. pygls keeps it as
    a plain str (``"utf-8"``), not as a ``PositionEncodingKind``: both are accepted."""
    return str(getattr(encoding, "value", encoding) or "utf-16")


# The workDoneToken of the workspace/executeCommand request being served (in its task).
COMMAND_WORK_DONE_TOKEN: ContextVar[Any] = ContextVar("COMMAND_WORK_DONE_TOKEN", default=None)


class ByteReader(Protocol):
    def readline(self) -> Awaitable[bytes]: ...

    def readexactly(self, n: int) -> Awaitable[bytes]: ...


class StarChatProtocol(LanguageServerProtocol):
    _initialize_received = False
    required_token: str | None = None  # TCP beyond loopback: initializationOptions.token must match

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.documents: dict[str, Document] = {}
        self.notebooks: dict[str, list[str]] = {}  # a notebook's URI -> its cells' URIs in order
        self._watchers: dict[str, list[Callable[[], None]]] = {}

    def watch(self, uri: str, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` after each change to ``uri`` that was applied, and when it is closed
        (on the event loop, before the feature handlers see it). Returns the function that stops
        the watch."""
        self._watchers.setdefault(uri, []).append(callback)

        def stop() -> None:
            callbacks = self._watchers.get(uri, [])
            if callback in callbacks:
                callbacks.remove(callback)
            if not callbacks:
                self._watchers.pop(uri, None)

        return stop

    def _changed(self, uri: str) -> None:
        for callback in list(self._watchers.get(uri, ())):
            try:
                callback()
            except Exception:
                log.exception("a document watcher failed")

    def negotiated_encoding(self) -> str:
        """The position encoding of this session's client ("utf-16" before ``initialize``). A
        method, not a property: pygls reads every attribute of the protocol while it is built."""
        workspace = self._workspace
        return position_encoding_name(workspace.position_encoding if workspace is not None else None)

    # The open documents live here rather than in pygls's workspace, whose incremental edits
    # re-split the whole text (and split lines where LSP does not).
    @lsp_method(types.TEXT_DOCUMENT_DID_OPEN)
    def lsp_text_document__did_open(self, params: types.DidOpenTextDocumentParams):
        self._open([params.text_document])
        yield from self._user_handler(types.TEXT_DOCUMENT_DID_OPEN, params)

    @lsp_method(types.TEXT_DOCUMENT_DID_CHANGE)
    def lsp_text_document__did_change(self, params: types.DidChangeTextDocumentParams):
        if self._change(params):
            yield from self._user_handler(types.TEXT_DOCUMENT_DID_CHANGE, params)

    # Notebooks (LSP 3.17 notebook sync): each cell is a document of its own in ``documents``;
    # prompts about a cell show the notebook's other cells around it (server.surrounding).
    @lsp_method(types.NOTEBOOK_DOCUMENT_DID_OPEN)
    def lsp_notebook_document__did_open(self, params: types.DidOpenNotebookDocumentParams):
        notebook = params.notebook_document
        self._open(params.cell_text_documents)
        self.notebooks[notebook.uri] = [cell.document for cell in notebook.cells]
        yield from self._user_handler(types.NOTEBOOK_DOCUMENT_DID_OPEN, params)

    @lsp_method(types.NOTEBOOK_DOCUMENT_DID_CHANGE)
    def lsp_notebook_document__did_change(self, params: types.DidChangeNotebookDocumentParams):
        cells = params.change.cells
        order = self.notebooks.get(params.notebook_document.uri)
        if cells is None or order is None:
            return
        if cells.structure is not None:
            change = cells.structure.array
            order[change.start : change.start + change.delete_count] = [cell.document for cell in change.cells or ()]
            self._close(cells.structure.did_close or ())
            self._open(cells.structure.did_open or ())
        for content in cells.text_content or ():
            self._change(types.DidChangeTextDocumentParams(text_document=content.document, content_changes=content.changes))
        yield from self._user_handler(types.NOTEBOOK_DOCUMENT_DID_CHANGE, params)

    @lsp_method(types.NOTEBOOK_DOCUMENT_DID_CLOSE)
    def lsp_notebook_document__did_close(self, params: types.DidCloseNotebookDocumentParams):
        self.notebooks.pop(params.notebook_document.uri, None)
        self._close(params.cell_text_documents)
        yield from self._user_handler(types.NOTEBOOK_DOCUMENT_DID_CLOSE, params)

    def notebook_of(self, uri: str) -> str | None:
        """The URI of the synced notebook that holds cell ``uri``, if any."""
        return next((notebook for notebook, cells in self.notebooks.items() if uri in cells), None)

    def _open(self, items: Sequence[types.TextDocumentItem]) -> None:
        for item in items:
            self.documents[item.uri] = Document(item.uri, item.text, item.version, item.language_id)

    def _close(self, items: Sequence[types.TextDocumentIdentifier]) -> None:
        for item in items:
            self.documents.pop(item.uri, None)
            self._changed(item.uri)

    def _change(self, params: types.DidChangeTextDocumentParams) -> bool:
        """Apply a didChange to the document and tell its watchers; False when it was ignored."""
        document = self.documents.get(params.text_document.uri)
        if document is not None and not self._apply_changes(document, params):
            return False
        self._changed(params.text_document.uri)
        return True

    def _apply_changes(self, document: Document, params: types.DidChangeTextDocumentParams) -> bool:
        """Apply one didChange whole or not at all; False when it was ignored."""
        version = params.text_document.version
        if document.version is not None and version is not None and version < document.version:
            # LSP versions only increase: a change for an older version is out of order or replayed
            log.warning("ignored a didChange for version %s: the document is at version %s", version, document.version)
            return False
        edits: list[tuple[str, Pos | None, Pos | None]] = []
        for change in params.content_changes:
            if isinstance(change, types.TextDocumentContentChangePartial):
                start, end = change.range.start, change.range.end
                edits.append((change.text, Pos(start.line, start.character), Pos(end.line, end.character)))
            else:
                edits.append((change.text, None, None))
        # Checked before the first edit, so that a bad change leaves the document as it was (the only
        # position Document.apply refuses is a negative one; others are clamped to the text).
        if any(pos is not None and (pos.line < 0 or pos.character < 0) for _, start, end in edits for pos in (start, end)):
            log.warning("ignored a didChange for version %s: a range has a negative position", version)
            return False
        encoding = self.negotiated_encoding()
        try:
            for text, start, end in edits:
                document.apply(text, start, end, encoding)
        except Exception:
            # Not expected after the check above; a half-edited copy would give wrong answers
            # silently, a forgotten one says so (the editor must reopen it).
            log.exception("a didChange failed part-way: the document is dropped")
            self.documents.pop(document.uri, None)
            self._changed(document.uri)
            return False
        document.version = version
        return True

    def end_session(self) -> list[asyncio.Future]:
        """Forget the client whose connection ended (TCP serves one after another): the next one
        starts uninitialized (its ``initialize`` is checked again, token included) with no open
        document. Its requests still running are cancelled; the server's requests still waiting
        for its answer fail (their callers go on without it). Returns the tasks to wait for, so
        that their replies go to the old writer, not to the next client."""
        pending = {msg_id: future for msg_id, future in self._request_futures.items() if not future.done()}
        outgoing = set(self._result_types)  # ids of the server's own requests
        self._request_futures.clear()
        self._result_types.clear()
        for msg_id, future in pending.items():
            if msg_id in outgoing and not isinstance(future, asyncio.Future):
                future.set_exception(ConnectionResetError("the client disconnected"))
            else:
                future.cancel()
        self._initialize_received = False
        self._shutdown = False
        self.documents = {}
        self.notebooks = {}
        return [future for future in pending.values() if isinstance(future, asyncio.Future)]

    @lsp_method(types.WORKSPACE_EXECUTE_COMMAND)
    async def lsp_workspace__execute_command(self, params: types.ExecuteCommandParams) -> Any:
        """As pygls's, but the command runs in the request's own task. pygls runs it as a step of
        a generator under an id of its own, which ``$/cancelRequest`` never reaches: the editor
        got its cancellation reply while the model went on and the edit was applied anyway. The
        request's ``workDoneToken`` reaches the command's progress (``COMMAND_WORK_DONE_TOKEN``):
        pygls hands a command its arguments only."""
        from pygls.protocol.language_server import _prepare_command_arguments

        if (handler := self.fm.commands.get(params.command)) is None:
            raise JsonRpcInvalidParams.of(ValueError(f"Command name {params.command!r} is not defined"))
        try:
            args, kwargs = _prepare_command_arguments(handler, params, self._converter)
        except Exception as exc:
            raise JsonRpcInvalidParams.of(exc) from None
        COMMAND_WORK_DONE_TOKEN.set(params.work_done_token)  # this task's own context
        result = handler(*args, **kwargs)
        return await result if inspect.isawaitable(result) else result

    @lsp_method(types.EXIT)
    def lsp_exit(self, params: None = None):
        """Only the feature's handler: it ends the process over stdio and the session over TCP
        (features/lifecycle.py). pygls's would end the process in every case."""
        yield from self._user_handler(types.EXIT, params)

    @lsp_method(types.TEXT_DOCUMENT_DID_CLOSE)
    def lsp_text_document__did_close(self, params: types.DidCloseTextDocumentParams):
        self._close([params.text_document])
        yield from self._user_handler(types.TEXT_DOCUMENT_DID_CLOSE, params)

    def _user_handler(self, method: str, params: Any):
        if (handler := self.fm.features.get(method)) is not None:
            yield handler, (params,), None

    def handle_message(self, message: Any) -> None:
        if isinstance(message, RPCRequest):
            method = message.method
            error: JsonRpcException | None = None
            if self._shutdown and method != types.EXIT:
                error = JsonRpcInvalidRequest(f"The server is shut down; {method} is refused.")
            elif method == types.INITIALIZE:
                if self._initialize_received:
                    error = JsonRpcInvalidRequest("initialize was already received.")
                elif self.required_token is not None and not _token_matches(message.params, self.required_token):
                    error = JsonRpcInvalidRequest("This server needs initializationOptions.token.")
                else:
                    self._initialize_received = True
            elif not self._initialize_received:
                error = JsonRpcServerNotInitialized(f"{method} before initialize.")
            if error is not None:
                self._send_response(message.id, error=error.to_response_error())
                return
        super().handle_message(message)

    def _handle_response(self, msg_id: Any, result: Any = None, error: Any = None) -> None:
        """A reply to one of the server's requests. pygls sets it on the request's future even
        when the server stopped waiting (a chat cancelled while it asked the client for a
        progress token), which raised InvalidStateError: such a reply is dropped."""
        future = self._request_futures.get(msg_id)
        if future is not None and future.done():
            self._request_futures.pop(msg_id, None)
            log.debug("dropped the reply to %s: nothing waits for it any more", msg_id)
            return
        super()._handle_response(msg_id, result, error)

    def _send_response(self, msg_id: Any, result: Any = None, error: Any = None) -> None:
        if error is not None:
            error.data = None  # pygls puts the traceback here
            if error.code == JsonRpcInternalError.CODE:  # its message may hold paths: the log has it
                log.error("internal error for request %s: %s", msg_id, error.message)
                error.message = "Internal error in starchat-lsp; the server log has the details."
        super()._send_response(msg_id, result, error)

    def reply_error(self, msg_id: Any, error: JsonRpcException) -> None:
        if msg_id is None:  # JSON-RPC wants "id": null, which the converter would leave out
            self._send_data({"jsonrpc": "2.0", "id": None, "error": {"code": error.code, "message": error.message}})
        else:
            self._send_response(msg_id, error=error.to_response_error())


def _token_matches(params: Any, token: str) -> bool:
    import hmac

    options = getattr(params, "initialization_options", None)
    given = options.get("token") if isinstance(options, dict) else None
    return isinstance(given, str) and hmac.compare_digest(given.encode(), token.encode())


async def _read_headers(reader: ByteReader) -> dict[bytes, bytes] | None:
    """The header block of the next frame; ``None`` at the end of the stream.

    Bytes before a ``Content-Length`` header on its line are what a frame whose length was too
    short left of its body, or junk without a line break: they are dropped, with what was read
    of the block so far, and the frame starts at the header (else the leftover would hide every
    later header: no later message read). Lines whose name is not a token are ignored."""
    headers: dict[bytes, bytes] = {}
    while True:
        line = await reader.readline()
        if not line:
            return None
        at = line.lower().rfind(_CONTENT_LENGTH)
        if at > 0 and line[:at].strip():
            log.warning("skipped %d bytes before a Content-Length header", at)
            line, headers = line[at:], {}
        line = line.strip()
        if not line:
            if headers:
                return headers
            continue  # blank lines between frames
        name, sep, value = line.partition(b":")
        name = name.strip()
        if sep and _TOKEN.fullmatch(name):
            headers[name.lower()] = value.strip()


async def _discard(reader: ByteReader, length: int) -> None:
    while length > 0:
        piece = await reader.readexactly(min(length, _DISCARD_CHUNK))
        if not piece:
            return
        length -= len(piece)


async def serve(protocol: StarChatProtocol, reader: ByteReader, max_message_bytes: Callable[[], int]) -> None:
    """Read frames until the stream ends, handing each message to ``protocol``."""
    while True:
        headers = await _read_headers(reader)
        if headers is None:
            return
        try:
            length = int(headers.get(b"content-length", b""))
            if length < 0:
                raise ValueError
        except ValueError:
            log.warning("skipped a frame without a valid Content-Length")
            continue
        if length > max_message_bytes():
            log.warning("skipped a %d-byte message (limit %d)", length, max_message_bytes())
            await _discard(reader, length)
            continue
        body = await reader.readexactly(length)
        if len(body) < length:
            return
        # A body cut short by its sender swallows the next frame's header: give that frame back.
        cut = body.find(b"Content-Length:", 1)
        if cut < 0:
            cut = body.lower().find(b"content-length:", 1)
        if cut > 0 and hasattr(reader, "unread") and not _is_json(body):
            reader.unread(body[cut:])
            body = body[:cut]
        handle_body(protocol, body)


def _is_json(body: bytes) -> bool:
    try:
        json.loads(body)
        return True
    except (ValueError, UnicodeDecodeError):
        return False


def handle_body(protocol: StarChatProtocol, body: bytes) -> None:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        protocol.reply_error(None, JsonRpcParseError("The message is not valid JSON."))
        return
    if not isinstance(data, dict) or data.get("jsonrpc") != "2.0" or not (isinstance(data.get("method"), str) or "id" in data):
        msg_id = data.get("id") if isinstance(data, dict) else None
        protocol.reply_error(msg_id, JsonRpcInvalidRequest("Not a JSON-RPC 2.0 message."))
        return
    try:
        message = protocol.structure_message(data)
    except JsonRpcException as exc:
        cause = exc.__cause__
        detail = "; ".join(cattrs.transform_error(cause, path="params")) if isinstance(cause, cattrs.BaseValidationError) else str(exc)
        if "id" in data and "method" in data:
            protocol.reply_error(data["id"], JsonRpcInvalidParams(f"Invalid params for {data['method']}: {detail}"))
        else:
            log.warning("dropped a malformed message: %s", detail)
        return
    try:
        protocol.handle_message(message)
    except Exception:
        log.exception("failed to handle a message")
        if "id" in data and "method" in data:
            protocol.reply_error(data["id"], JsonRpcException("The server failed to handle this request."))


class StreamReaderAdapter:
    """asyncio.StreamReader with ``readexactly`` that returns what it has at the end of the
    stream, and ``unread`` to put bytes back (a truncated body's successor)."""

    def __init__(self, stream: asyncio.StreamReader):
        self._stream = stream
        self._pending = b""

    def unread(self, data: bytes) -> None:
        self._pending = data + self._pending

    async def readline(self) -> bytes:
        if self._pending:
            line, sep, rest = self._pending.partition(b"\n")
            if sep:
                self._pending = rest
                return line + sep
            self._pending = b""
            return line + await self.readline()
        try:
            return await self._stream.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            return exc.partial
        except asyncio.LimitOverrunError as exc:  # an absurdly long line: drop it but for its end,
            # where a body's leftover may run into the next frame's Content-Length header
            dropped = await self._stream.readexactly(exc.consumed)
            self._pending = dropped[-_KEEP_OF_LONG_LINE:]
            return b"X-Dropped: 1\r\n"

    async def readexactly(self, n: int) -> bytes:
        head, self._pending = self._pending[:n], self._pending[n:]
        if len(head) == n:
            return head
        try:
            return head + await self._stream.readexactly(n - len(head))
        except asyncio.IncompleteReadError as exc:
            return head + exc.partial


class DiscardWriter:
    """Where replies go once their client is gone (the requests it left running, cancelled)."""

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass


def keep_alive(sock: socket.socket | None) -> None:
    """TCP keep-alive on a client's socket, so that a peer gone without closing (a machine
    switched off, a dropped tunnel) ends its connection in minutes and frees the server."""
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 15), ("TCP_KEEPCNT", 4)):
            if hasattr(socket, name):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    except OSError:
        log.debug("TCP keep-alive not set", exc_info=True)
