"""pytest-lsp against ``python -m lsp_server`` over stdio, with the real transformers engine on the
test model, once with Neovim's and once with VS Code's client capabilities."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_lsp
from lsprotocol import types
from pytest_lsp import ClientServerConfig, LanguageClient, client_capabilities

from lsp_server.testing import scenarios as sc
from lsp_server.text import Pos, offset_at, split_lines

from ..conftest import MODEL_DIR

SERVER = [sys.executable, "-m", "lsp_server", "--model", str(MODEL_DIR)]
# warm-ups off unless a test turns them on: they change what the engine's cache holds between a
# test's requests (the cache tests assert how much each request reuses)
GREEDY = {"temperature": 0, "warmCache": False}


class Editor:
    """The test's view of the client: open documents, captured edits, streamed pieces."""

    def __init__(self, client: LanguageClient, root: Path):
        self.client = client
        self.root = root
        self.applied: list[types.WorkspaceEdit] = []
        self.partials: dict[Any, list[str]] = {}
        self.versions: dict[str, int] = {}

        @client.feature(types.WORKSPACE_APPLY_EDIT)
        def apply_edit(params: types.ApplyWorkspaceEditParams) -> types.ApplyWorkspaceEditResult:
            self.applied.append(params.edit)
            return types.ApplyWorkspaceEditResult(applied=True)

        features = client.protocol.fm._features
        original_progress = features[types.PROGRESS]

        def progress(params: types.ProgressParams) -> None:
            value = params.value
            if isinstance(value, dict) and "delta" in value:  # a partial result
                self.partials.setdefault(params.token, []).append(value["delta"])
            else:
                original_progress(params)

        features[types.PROGRESS] = progress
        self.statuses: list[str] = []
        self.status_messages: list[str] = []

        self.traces: list[str] = []

        @client.feature(types.LOG_TRACE)
        def log_trace(params: types.LogTraceParams) -> None:
            self.traces.append(params.message)

        @client.feature("starchat/status")
        def status(params: Any) -> None:
            self.statuses.append(plain(params)["state"])
            self.status_messages.append(plain(params)["message"])

    def uri(self, name: str) -> str:
        return (self.root / name).as_uri()

    def open(self, name: str = "calc.py", text: str | None = None, language: str = sc.LANGUAGE) -> str:
        uri = self.uri(name)
        self.versions[uri] = 1
        self.client.text_document_did_open(
            types.DidOpenTextDocumentParams(
                text_document=types.TextDocumentItem(uri=uri, language_id=language, version=1, text=text if text is not None else sc.WORKSPACE_FILES[name])
            )
        )
        return uri

    def change(self, uri: str, text: str) -> None:
        self.versions[uri] += 1
        self.client.text_document_did_change(
            types.DidChangeTextDocumentParams(
                text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=self.versions[uri]),
                content_changes=[types.TextDocumentContentChangeWholeDocument(text=text)],
            )
        )

    async def cancel_mid_stream(self, request: "asyncio.Future", token: str) -> Exception:
        """Once ``token`` has streamed a few pieces, send $/cancelRequest for the request still
        in flight; returns the error the request ends with."""
        await wait_until(lambda: len(self.partials.get(token, [])) >= 3)
        msg_id = next(i for i, f in self.client.protocol._request_futures.items() if not f.done())
        self.client.protocol.notify(types.CANCEL_REQUEST, types.CancelParams(id=msg_id))
        try:
            await request
        except Exception as error:
            return error
        raise AssertionError("the request was not cancelled")

    async def request(self, method: str, params: Any, msg_id: str | None = None) -> Any:
        return await self.client.protocol.send_request_async(method, params, msg_id=msg_id)


def plain(value: Any) -> Any:
    """pygls hands custom payloads over as namedtuples; tests read them as JSON."""
    if hasattr(value, "_asdict"):
        return {k: plain(v) for k, v in value._asdict().items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def rng(span) -> types.Range:
    return types.Range(
        start=types.Position(line=span.start.line, character=span.start.character),
        end=types.Position(line=span.end.line, character=span.end.character),
    )


def apply_text_edits(text: str, edits: list[types.TextEdit]) -> str:
    """Apply LSP text edits (UTF-16 positions) the way an editor does: from the last to the first."""
    lines = split_lines(text)
    spans = []
    for edit in edits:
        start = offset_at(lines, Pos(edit.range.start.line, edit.range.start.character))
        end = offset_at(lines, Pos(edit.range.end.line, edit.range.end.character))
        spans.append((start, end, edit.new_text))
    for start, end, new_text in sorted(spans, reverse=True):
        text = text[:start] + new_text + text[end:]
    return text


async def start_session(client: LanguageClient, tmp_path: Path, spec: str, options: dict | None = None, experimental: Any = None,
                        trace: types.TraceValue | None = None) -> Editor:
    for name, text in sc.WORKSPACE_FILES.items():
        (tmp_path / name).write_text(text)
    capabilities = client_capabilities(spec)
    if experimental is not None:
        capabilities.experimental = experimental
    editor = Editor(client, tmp_path)
    editor.capabilities = capabilities
    started = time.monotonic()
    editor.init_result = await client.initialize_session(
        types.InitializeParams(
            capabilities=capabilities,
            root_uri=tmp_path.as_uri(),
            workspace_folders=[types.WorkspaceFolder(uri=tmp_path.as_uri(), name="ws")],
            initialization_options={**GREEDY, **(options or {})},
            trace=trace,
        )
    )
    editor.initialize_seconds = time.monotonic() - started
    return editor


# (client capabilities, engine): every feature under both editors' capabilities, and once more
# on the fast engine (its CPU path: the same step functions as on a GPU, without CUDA graphs)
SESSIONS = [("neovim", "auto"), ("visual-studio-code", "auto"), ("visual-studio-code", "fast")]


@pytest_lsp.fixture(config=ClientServerConfig(server_command=SERVER), params=SESSIONS,
                    ids=["neovim", "visual-studio-code", "fast-engine"])
async def lsp(lsp_client: LanguageClient, request, test_model, tmp_path):
    spec, engine = request.param
    lsp_client.editor = await start_session(lsp_client, tmp_path, spec, {"engine": engine})
    lsp_client.editor.engine = engine
    yield
    await lsp_client.shutdown_session()


@pytest.fixture
def editor(lsp: LanguageClient) -> Editor:
    """pytest-lsp fixtures hand over the client itself; the session rides on it."""
    return lsp.editor


async def wait_until(predicate, timeout: float = 30.0, interval: float = 0.02) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("timed out waiting for a condition")
        await asyncio.sleep(interval)
