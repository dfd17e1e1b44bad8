"""Reading JSON-RPC frames robustly, and the LSP rules pygls leaves to the server author.

pygls 2.1's own reader breaks for good on a lowercase ``content-length``, allocates whatever
Content-Length claims, and gives no reply to malformed JSON or malformed params. This reader:
header names in any case and order, extra headers ignored; a frame without a usable length, or
larger than ``max_message_bytes``, is skipped (its body discarded in small pieces) and the stream
goes on; a body that is not JSON gets -32700, a request whose params do not fit the method's type
gets -32602 naming the field. :class:`StarChatProtocol` answers requests before ``initialize``
with -32002, a second ``initialize`` and requests after ``shutdown`` with -32600, and never puts
tracebacks or local paths into error replies.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Awaitable, Callable, Protocol

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


class ByteReader(Protocol):
    def readline(self) -> Awaitable[bytes]: ...

    def readexactly(self, n: int) -> Awaitable[bytes]: ...


class StarChatProtocol(LanguageServerProtocol):
    _initialize_received = False
    required_token: str | None = None  # TCP beyond loopback: initializationOptions.token must match

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.documents: dict[str, Document] = {}

    # The open documents live here rather than in pygls's workspace, whose incremental edits
    # re-split the whole text (and split lines where LSP does not).
    @lsp_method(types.TEXT_DOCUMENT_DID_OPEN)
    def lsp_text_document__did_open(self, params: types.DidOpenTextDocumentParams):
        item = params.text_document
        self.documents[item.uri] = Document(item.uri, item.text, item.version, item.language_id)
        yield from self._user_handler(types.TEXT_DOCUMENT_DID_OPEN, params)

    @lsp_method(types.TEXT_DOCUMENT_DID_CHANGE)
    def lsp_text_document__did_change(self, params: types.DidChangeTextDocumentParams):
        document = self.documents.get(params.text_document.uri)
        if document is not None:
            encoding = str(getattr(self.workspace.position_encoding, "value", None) or "utf-16")
            for change in params.content_changes:
                if isinstance(change, types.TextDocumentContentChangePartial):
                    start, end = change.range.start, change.range.end
                    document.apply(change.text, Pos(start.line, start.character), Pos(end.line, end.character), encoding)
                else:
                    document.apply(change.text)
            document.version = params.text_document.version
        yield from self._user_handler(types.TEXT_DOCUMENT_DID_CHANGE, params)

    @lsp_method(types.TEXT_DOCUMENT_DID_CLOSE)
    def lsp_text_document__did_close(self, params: types.DidCloseTextDocumentParams):
        self.documents.pop(params.text_document.uri, None)
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
    """The header block of the next frame; ``None`` at the end of the stream."""
    headers: dict[bytes, bytes] = {}
    while True:
        line = await reader.readline()
        if not line:
            return None
        line = line.strip()
        if not line:
            if headers:
                return headers
            continue  # blank lines between frames
        name, sep, value = line.partition(b":")
        if sep:
            headers[name.strip().lower()] = value.strip()


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
        except asyncio.LimitOverrunError as exc:  # an absurdly long header line: drop it
            await self._stream.readexactly(exc.consumed)
            return b"X-Dropped: 1\r\n"

    async def readexactly(self, n: int) -> bytes:
        head, self._pending = self._pending[:n], self._pending[n:]
        if len(head) == n:
            return head
        try:
            return head + await self._stream.readexactly(n - len(head))
        except asyncio.IncompleteReadError as exc:
            return head + exc.partial
