"""From a selection and an answer to the edit (features/common.py), around a stand-in server:
whole lines when the selection starts inside the indentation, indentation from the first line
that holds code, and an answer that arrives after the user typed."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from lsprotocol import types

from lsp_server.documents import Document
from lsp_server.engine import Generation
from lsp_server.features import common
from lsp_server.features.common import answer_for_edit, current, selection, task_edit
from lsp_server.prompts import Task
from lsp_server.server import RequestFailed
from lsp_server.text import Pos

URI = "file:///w/calc.py"
CLASS = "class A:\n    def f(self):\n        return 1\n\n    def g(self):\n        return 3\n"


def server_with(text: str) -> SimpleNamespace:
    document = Document(URI, text, 1, "python")
    return SimpleNamespace(document=document, open_document=lambda uri: document, position_encoding="utf-16",
                           relative_path=lambda uri: "calc.py", client_capabilities=types.ClientCapabilities())


def rng(a: tuple[int, int], b: tuple[int, int]) -> types.Range:
    return types.Range(start=types.Position(line=a[0], character=a[1]), end=types.Position(line=b[0], character=b[1]))


def answer(code: str, reason: str = "stop") -> Generation:
    return Generation(f"Here:\n\n```python\n{code}```\n", reason, 10, 10)  # type: ignore[arg-type]


def the_edit(edit: types.WorkspaceEdit) -> types.TextEdit:
    (only,) = edit.changes[URI]
    return only


@pytest.mark.parametrize("code", ["def f(self):\n    return 2\n", "    def f(self):\n        return 2\n"])
def test_a_selection_from_the_first_non_blank_takes_the_whole_line(code):
    """Selected from the first non-blank (an editor's usual "select this function"): the model
    sees and the edit replaces whole lines, whatever indentation the answer comes back with
    (before, the model saw "def f(self):" at column 0 over a body at 8, and an answer in that
    shape came back with its body indented twice)."""
    server = server_with(CLASS)
    sel = selection(server, URI, rng((1, 4), (3, 0)))
    assert sel.selected == "    def f(self):\n        return 1\n"
    edit = the_edit(task_edit(server, sel, Task.FIX, answer(code)))
    assert edit.range == rng((1, 0), (3, 0))
    assert edit.new_text == "    def f(self):\n        return 2\n"


def test_indentation_comes_from_the_first_line_with_code():
    """A selection from the blank line above a method: the method stays in its class, and the
    blank line stays above it."""
    server = server_with(CLASS)
    sel = selection(server, URI, rng((3, 0), (6, 0)))
    edit = the_edit(task_edit(server, sel, Task.FIX, answer("def g(self):\n    return 4\n")))
    assert edit.new_text == "\n    def g(self):\n        return 4\n"
    doc = the_edit(task_edit(server, sel, Task.DOCUMENT, answer("# Four.\n")))
    assert doc.new_text == "    # Four.\n"


def test_no_edit_from_prose_or_a_cut_answer():
    server = server_with(CLASS)
    sel = selection(server, URI, rng((1, 0), (3, 0)))
    with pytest.raises(RequestFailed, match="without code"):
        task_edit(server, sel, Task.FIX, Generation("The code is already correct.", "stop", 10, 6))
    with pytest.raises(RequestFailed, match="maxNewTokens"):
        task_edit(server, sel, Task.FIX, Generation("```python\ndef f(self):\n    if", "length", 10, 256))


def test_an_answer_that_arrives_after_the_user_typed():
    """Typing elsewhere while the model answers moves the edit with the text; typing in the
    selected lines stops it (an edit computed on the old text would corrupt the new one)."""
    server = server_with(CLASS)
    document = server.document
    sel = selection(server, URI, rng((4, 0), (6, 0)))  # g()
    fixed = answer("def g(self):\n    return 4\n")
    assert current(server, sel) is sel

    document.apply("# top\n", Pos(0, 0), Pos(0, 0))  # a line above: the edit moves down one line
    document.version = 2
    edit = task_edit(server, current(server, sel), Task.FIX, fixed)
    assert edit.changes[URI][0].range == rng((5, 0), (7, 0))

    sel = selection(server, URI, rng((5, 0), (7, 0)))
    document.apply("\nx = 1\n", Pos(7, 0), Pos(7, 0))  # below: the same place
    document.version = 3
    assert the_edit(task_edit(server, current(server, sel), Task.FIX, fixed)).range == rng((5, 0), (7, 0))

    document.apply("5", Pos(6, 15), Pos(6, 16))  # inside g(): refused
    document.version = 4
    assert current(server, sel) is None

    sel = selection(server, URI, rng((6, 8), (6, 16)))  # "return 5", to the line's end
    document.apply("  # five", Pos(6, 16), Pos(6, 16))  # the same line, after the selection: refused
    document.version = 5
    assert current(server, sel) is None


def test_a_python_docstring_goes_under_the_signature():
    """Document on a Python function: a docstring answer goes inside the function, under its
    (possibly multi-line) signature, at the body's indentation; a comment answer stays above."""
    text = "class A:\n    def area(\n        self, r,\n    ) -> float:\n        return 3.14 * r * r\n"
    server = server_with(text)
    sel = selection(server, URI, rng((1, 0), (5, 0)))
    doc = the_edit(task_edit(server, sel, Task.DOCUMENT, answer('"""The area of a circle of radius r."""\n')))
    assert doc.range == rng((4, 0), (4, 0)) and doc.new_text == '        """The area of a circle of radius r."""\n'
    comment = the_edit(task_edit(server, sel, Task.DOCUMENT, answer("# The area.\n")))
    assert comment.range == rng((1, 0), (1, 0)) and comment.new_text == "    # The area.\n"


class Watched:
    """The stand-in server's protocol: document watchers, as StarChatProtocol.watch keeps them."""

    def __init__(self):
        self.watchers: list = []

    def watch(self, uri, callback):
        self.watchers.append(callback)
        return lambda: self.watchers.remove(callback)

    def changed(self):
        for callback in list(self.watchers):
            callback()


def edit_session(monkeypatch):
    """A stand-in server whose model answers only when told to, and records being stopped."""
    server = server_with(CLASS)
    server.protocol = Watched()
    state = SimpleNamespace(started=asyncio.Event(), finish=asyncio.Event(), stopped=False)

    async def answer_about(server, sel, task, question="", problems=()):
        state.started.set()
        try:
            await state.finish.wait()
        except asyncio.CancelledError:
            state.stopped = True
            raise
        return answer("def g(self):\n    return 4\n"), []  # and what the prompt showed

    monkeypatch.setattr(common, "answer_about", answer_about)
    return server, state


async def test_typing_in_the_selection_stops_the_model_at_once(monkeypatch):
    server, state = edit_session(monkeypatch)
    sel = selection(server, URI, rng((4, 0), (6, 0)))  # g()
    request = asyncio.ensure_future(answer_for_edit(server, sel, Task.FIX))
    await asyncio.wait_for(state.started.wait(), 5)  # a stand-in that failed never starts
    server.document.apply("# top\n", Pos(0, 0), Pos(0, 0))  # above: the model goes on
    server.document.version = 2
    server.protocol.changed()
    await asyncio.sleep(0)
    assert not request.done() and not state.stopped
    server.document.apply("5", Pos(6, 15), Pos(6, 16))  # inside g(): the model stops
    server.document.version = 3
    server.protocol.changed()
    with pytest.raises(RequestFailed, match="changed while StarChat was answering"):
        await asyncio.wait_for(request, 1)
    assert state.stopped
    assert server.protocol.watchers == []


async def test_an_edit_computed_while_typing_above_moves_with_the_text(monkeypatch):
    server, state = edit_session(monkeypatch)
    sel = selection(server, URI, rng((4, 0), (6, 0)))
    request = asyncio.ensure_future(answer_for_edit(server, sel, Task.FIX))
    await asyncio.wait_for(state.started.wait(), 5)  # a stand-in that failed never starts
    server.document.apply("# top\n", Pos(0, 0), Pos(0, 0))
    server.document.version = 2
    server.protocol.changed()
    state.finish.set()
    generation, now = await asyncio.wait_for(request, 1)
    assert the_edit(task_edit(server, now, Task.FIX, generation)).range == rng((5, 0), (7, 0))
    assert server.protocol.watchers == []


async def test_closing_the_document_stops_the_model(monkeypatch):
    server, state = edit_session(monkeypatch)
    sel = selection(server, URI, rng((4, 0), (6, 0)))
    request = asyncio.ensure_future(answer_for_edit(server, sel, Task.FIX, changed=LookupError))

    def closed(uri):
        raise RequestFailed("The document is not open in the editor")

    await asyncio.wait_for(state.started.wait(), 5)  # a stand-in that failed never starts
    server.open_document = closed
    server.protocol.changed()
    with pytest.raises(LookupError):
        await asyncio.wait_for(request, 1)
    assert state.stopped


async def test_the_editor_cancelling_is_still_a_cancellation(monkeypatch):
    server, state = edit_session(monkeypatch)
    sel = selection(server, URI, rng((4, 0), (6, 0)))
    request = asyncio.ensure_future(answer_for_edit(server, sel, Task.FIX))
    await asyncio.wait_for(state.started.wait(), 5)  # a stand-in that failed never starts
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    assert state.stopped and server.protocol.watchers == []


TABBED = "class A:\n\tdef f(self):\n\t\treturn 1\n\n\tdef g(self):\n\t\treturn 3\n"


def test_the_answer_takes_the_documents_indentation():
    """The model answers in four spaces; in a tab-indented file that would be a TabError in
    Python (and in a two-space file, a mix of styles): the edit is indented as the file is."""
    server = server_with(TABBED)
    sel = selection(server, URI, rng((1, 0), (3, 0)))
    fix = the_edit(task_edit(server, sel, Task.FIX, answer("def f(self):\n    if self:\n        return 2\n")))
    assert fix.new_text == "\tdef f(self):\n\t\tif self:\n\t\t\treturn 2\n"
    doc = the_edit(task_edit(server, sel, Task.DOCUMENT, answer('"""One."""\n')))
    assert doc.new_text == '\t\t"""One."""\n'  # under the signature, one tab deeper
    two = server_with("def f():\n  if x:\n    return 1\n")
    sel = selection(two, URI, rng((0, 0), (3, 0)))
    fix = the_edit(task_edit(two, sel, Task.FIX, answer("def f():\n    if x:\n        return 2\n")))
    assert fix.new_text == "def f():\n  if x:\n    return 2\n"


def test_document_inserts_only_the_docstring_of_a_repeated_function():
    server = server_with(CLASS)
    sel = selection(server, URI, rng((1, 0), (3, 0)))
    doc = the_edit(task_edit(server, sel, Task.DOCUMENT, answer('def f(self):\n    """One."""\n    return 1\n')))
    assert doc.range == rng((2, 0), (2, 0))
    assert doc.new_text == '        """One."""\n'
    with pytest.raises(RequestFailed, match="without a comment"):  # not the function a second time
        task_edit(server, sel, Task.DOCUMENT, answer("def f(self):\n    return 1\n"))
