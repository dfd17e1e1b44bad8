"""Incremental edits on open documents: the same text as a whole re-split, in bounded time."""

import asyncio
import random

from lsprotocol import types

from lsp_server.documents import Document
from lsp_server.text import Pos, offset_at, position_at, split_lines


def reference_apply(text: str, start: Pos, end: Pos, new: str, encoding: str) -> str:
    lines = split_lines(text)
    a, b = offset_at(lines, start, encoding), offset_at(lines, end, encoding)
    return text[:a] + new + text[b:]


import pytest


@pytest.mark.parametrize("chunk_chars", [4, 16, 1 << 15])
def test_random_edits_match_the_reference(chunk_chars):
    rng = random.Random(chunk_chars)
    alphabet = ["a", "b", " ", "\n", "\r\n", "\r", "😀", "中", "\x0c", "\u2028", "\x85"]
    for encoding in ("utf-16", "utf-8", "utf-32"):
        text = "".join(rng.choice(alphabet) for _ in range(200))
        doc = Document("file:///a", text, chunk_chars=chunk_chars)
        for _ in range(300):
            lines = split_lines(doc.text)
            line = rng.randrange(len(lines) + 1)
            start = Pos(line, rng.randrange(6))
            end = Pos(line + rng.randrange(3), rng.randrange(6))
            if (end.line, end.character) < (start.line, start.character):
                start, end = end, start
            new = "".join(rng.choice(alphabet) for _ in range(rng.randrange(4 if rng.random() < 0.9 else 40)))
            expected = reference_apply(doc.text, start, end, new, encoding)
            doc.apply(new, start, end, encoding)
            assert doc.text == expected
            assert doc.line_count == len(split_lines(expected))
            line_no = rng.randrange(doc.line_count + 1)
            assert doc.line_text(line_no) == (split_lines(expected)[line_no].rstrip("\r\n") if line_no < doc.line_count else "")
            offset = rng.randrange(len(doc.text) + 1)
            assert doc.position_at(offset, encoding) == position_at(split_lines(doc.text), offset, encoding) or doc.text[offset - 1 : offset + 1] == "\r\n"
            probe = Pos(rng.randrange(len(split_lines(doc.text)) + 1), rng.randrange(5))
            assert doc.offset_at(probe, encoding) == offset_at(split_lines(doc.text), probe, encoding)


def test_edits_far_apart_in_a_large_document():
    line = "x = 'a reasonably long line of python code here'\n"
    doc = Document("file:///big.py", line * 20_000)
    last = doc.line_count - 2
    for i in range(50):
        at = Pos(last - 5 if i % 2 else 100, i % 10)
        doc.apply("§\n" if i % 7 == 0 else "§", at, at)
    assert doc.text.count("§") == 50 and doc.line_count == 20_001 + 8
    assert doc.offset_at(Pos(doc.line_count - 1, 0)) == len(doc.text)


# ---- didChange through the protocol: the negotiated encoding, versions, all or nothing -------

def did_change(uri: str, version: int, *changes: tuple) -> dict:
    """A didChange notification; each change is (text, (line, char), (line, char)) or (text,)."""
    content = []
    for text, *span in changes:
        if span:
            (l1, c1), (l2, c2) = span
            content.append({"range": {"start": {"line": l1, "character": c1}, "end": {"line": l2, "character": c2}}, "text": text})
        else:
            content.append({"text": text})
    return {"jsonrpc": "2.0", "method": "textDocument/didChange", "params": {"textDocument": {"uri": uri, "version": version}, "contentChanges": content}}


def session(encodings: list[str] | None, text: str, *messages: dict, keep: list | None = None):
    """A server initialized with a client that offers ``encodings``, one document open, then
    ``messages``, all read by the server's own reader; returns the server's document."""
    from lsp_server.setup import create_server
    from lsp_server.testing.wire import frame
    from lsp_server.transport import StreamReaderAdapter, serve

    class Nowhere:
        def write(self, data: bytes) -> None:
            pass

        def close(self) -> None:
            pass

    server = create_server()
    server.protocol.set_writer(Nowhere())
    capabilities = {"general": {"positionEncodings": encodings}} if encodings else {}
    uri = "file:///a.py"
    opening = [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"capabilities": capabilities}},
        {"jsonrpc": "2.0", "method": "textDocument/didOpen", "params": {"textDocument": {"uri": uri, "languageId": "python", "version": 1, "text": text}}},
    ]

    async def run() -> None:
        stream = asyncio.StreamReader()
        stream.feed_data(b"".join(frame(m) for m in [*opening, *messages]))
        stream.feed_eof()
        await serve(server.protocol, StreamReaderAdapter(stream), lambda: 1 << 20)
        await asyncio.sleep(0)

    try:
        asyncio.run(run())
    finally:
        server.close()
    if keep is not None:
        keep.append(server.protocol)
    return server.protocol.documents[uri]


@pytest.mark.parametrize(("encodings", "columns"), [(["utf-8"], (5, 6)), (["utf-32"], (4, 5)), (None, (4, 5)), (["utf-8", "utf-16"], (5, 6))])
def test_incremental_changes_use_the_negotiated_position_encoding(encodings, columns):
    # "é" is 2 UTF-8 bytes, 1 UTF-16 unit, 1 UTF-32 unit: "1" is at UTF-8 column 5, else at 4
    start, end = columns
    document = session(encodings, "é = 1\nb = 😀 + 2\n", did_change("file:///a.py", 2, ("9", (0, start), (0, end))))
    assert document.text == "é = 9\nb = 😀 + 2\n" and document.version == 2
    # "😀" is 4 UTF-8 bytes, 2 UTF-16 units, 1 UTF-32 unit
    column = {"utf-8": 11, "utf-32": 8}.get((encodings or ["utf-16"])[0], 9)
    document = session(encodings, "é = 1\nb = 😀 + 2\n", did_change("file:///a.py", 2, ("3", (1, column), (1, column + 1))))
    assert document.text == "é = 1\nb = 😀 + 3\n"


def test_a_did_change_for_an_older_version_is_ignored():
    uri = "file:///a.py"
    document = session(None, "x = 1\n", did_change(uri, 5, ("2", (0, 4), (0, 5))), did_change(uri, 3, ("x", (0, 0), (0, 5))), did_change(uri, 4, ("y = 0\n",)))
    assert document.text == "x = 2\n" and document.version == 5
    document = session(None, "x = 1\n", did_change(uri, 5, ("2", (0, 4), (0, 5))), did_change(uri, 6, ("3", (0, 4), (0, 5))))
    assert document.text == "x = 3\n" and document.version == 6


def test_a_did_change_with_a_range_it_cannot_apply_changes_nothing():
    """lsprotocol refuses a negative position while reading the message (the whole message is
    dropped); the handler does not rely on it: a bad range among good ones applies none of them."""
    protocol = []
    document = session(None, "abc\ndef\n", keep=protocol)
    good = types.TextDocumentContentChangePartial(range=types.Range(start=types.Position(line=0, character=0), end=types.Position(line=0, character=1)), text="X")
    bad = types.TextDocumentContentChangePartial(range=types.Range(start=types.Position(line=1, character=0), end=types.Position(line=1, character=1)), text="Y")
    object.__setattr__(bad.range.start, "character", -1)  # past lsprotocol's validators
    params = types.DidChangeTextDocumentParams(text_document=types.VersionedTextDocumentIdentifier(uri=document.uri, version=2), content_changes=[good, bad])
    list(protocol[0].lsp_text_document__did_change(params))
    assert document.text == "abc\ndef\n" and document.version == 1
    assert protocol[0].documents[document.uri] is document


@pytest.mark.parametrize(("uri", "name"), [
    ("file:///work/proj/src/a.py", "src/a.py"),
    ("file:///elsewhere/b.py", "b.py"),
    ("vscode-remote://ssh-remote%2Bbox/home/u/proj/pkg/c.py", "pkg/c.py"),
    ("vscode-remote://ssh-remote%2Bother/home/u/proj/pkg/c.py", "c.py"),
    ("untitled:Untitled-1", "Untitled-1"),
    ("vscode-notebook-cell:/work/proj/nb.ipynb#W0sZmlsZQ%3D%3D", "nb.ipynb"),  # a cell sent as a document
    ("vscode-notebook-cell:/work/proj/notes/nb.ipynb#W1", "notes/nb.ipynb"),  # a cell of a synced notebook
    ("untitled:line%0Abreak%60", "linebreak"),
])
def test_documents_are_named_in_prompts_by_their_path_in_the_workspace(uri, name):
    from pygls.workspace import Workspace

    from lsp_server.setup import create_server

    server = create_server()
    try:
        server.protocol._workspace = Workspace("file:///work/proj", workspace_folders=[
            types.WorkspaceFolder("file:///work/proj", "proj"),
            types.WorkspaceFolder("vscode-remote://ssh-remote%2Bbox/home/u/proj", "remote")])
        server.protocol.notebooks["file:///work/proj/notes/nb.ipynb"] = ["vscode-notebook-cell:/work/proj/notes/nb.ipynb#W1"]
        assert server.relative_path(uri) == name
    finally:
        server.close()


def test_a_notebook_cell_is_prompted_among_the_notebooks_cells_of_its_language_and_its_markdown():
    from lsp_server.documents import Document
    from lsp_server.setup import create_server

    server = create_server()
    try:
        cells = {"a": ("x = 1", "python"), "md": ("# Title\n\nPlot it.\n", "markdown"), "empty": ("  \n", "python"),
                 "r": ("y <- 2", "r"), "b": ("y = 2\n", "python"), "c": ("z", "python"), "d": ("w = 3\n\n\n", "python")}
        uris = {key: f"vscode-notebook-cell:/nb.ipynb#{key}" for key in cells}
        for key, (text, language) in cells.items():
            server.protocol.documents[uris[key]] = Document(uris[key], text, 1, language)
        server.protocol.notebooks["file:///nb.ipynb"] = list(uris.values())
        text, offset = server.surrounding(uris["c"], "z = 0")  # the cell as the request saw it
        assert text == "x = 1\n\n# # Title\n#\n# Plot it.\n\ny = 2\n\nz = 0\n\nw = 3\n\n\n"
        assert text[offset:].startswith("z = 0")
        assert server.surrounding("file:///a.py", "print()") == ("print()", 0)
    finally:
        server.close()
