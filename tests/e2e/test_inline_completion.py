"""textDocument/inlineCompletion over stdio, answered by the trained test model's fill in the
middle (both editors' capabilities, both engines)."""

from __future__ import annotations

import asyncio
import re
import time

import pytest
from lsprotocol import types

from lsp_server.testing import scenarios as sc

from ..conftest import MODEL_DIR
from .conftest import apply_text_edits, wait_until
from .test_features import _cancel, _change_notebook, _open_calc_notebook, chat, configure, generation_reports

AUTOMATIC, INVOKED = types.InlineCompletionTriggerKind.Automatic, types.InlineCompletionTriggerKind.Invoked


def position(pos) -> types.Position:
    return types.Position(line=pos.line, character=pos.character)


async def complete(editor, uri, pos, trigger=AUTOMATIC, selected=None):
    params = types.InlineCompletionParams(
        text_document=types.TextDocumentIdentifier(uri=uri),
        position=position(pos),
        context=types.InlineCompletionContext(trigger_kind=trigger, selected_completion_info=selected),
    )
    return await editor.client.text_document_inline_completion_async(params)


def completions(editor) -> list[str]:
    """The server's trace line of every completion the model generated."""
    return [t for t in editor.traces if t.startswith("StarChat: completion:")]


async def test_inline_completion_proposes_the_models_fill_in_the_middle(editor):
    assert editor.init_result.capabilities.inline_completion_provider
    await chat(editor, [("user", sc.CHAT_QUESTION)], token="load", maxNewTokens=1)  # the model is loaded
    editor.client.protocol.notify(types.SET_TRACE, types.SetTraceParams(value=types.TraceValue.Messages))
    statuses, progress = len(editor.statuses), set(editor.client.progress_reports)

    # two lines on the empty line of a function being written
    uri = editor.open("calc.py", sc.FILL_AREA_TEXT)
    result = await complete(editor, uri, sc.FILL_AREA_CURSOR)
    (item,) = result.items
    assert item.insert_text == sc.FILL_AREA
    assert item.range == types.Range(start=position(sc.FILL_AREA_CURSOR), end=position(sc.FILL_AREA_CURSOR))
    accepted = apply_text_edits(sc.FILL_AREA_TEXT, [types.TextEdit(range=item.range, new_text=item.insert_text)])
    assert accepted == sc.CALC_PY.replace("    return math.pi * radius * radius\n", "    " + sc.FILL_AREA + "\n")

    # one line where the line goes on after the cursor: the model's ")" again is left out
    editor.change(uri, sc.FILL_SUM_TEXT)
    (item,) = (await complete(editor, uri, sc.FILL_SUM_CURSOR)).items
    assert item.insert_text == sc.FILL_SUM
    assert len(completions(editor)) == 2
    # typed as the user reads it: answered from the last completion, without the model
    typed = sc.FILL_SUM_TEXT.replace("sum()", "sum(val)")
    editor.change(uri, typed)
    further = types.Position(line=sc.FILL_SUM_CURSOR.line, character=sc.FILL_SUM_CURSOR.character + 3)
    (item,) = (await complete(editor, uri, further)).items
    assert (item.insert_text, item.range.start, item.range.end) == (sc.FILL_SUM[3:], further, further)
    # the suggest widget's item ("val", not typed yet) is where the completion goes on from
    editor.change(uri, sc.FILL_SUM_TEXT)
    at = types.Range(start=position(sc.FILL_SUM_CURSOR), end=position(sc.FILL_SUM_CURSOR))
    (item,) = (await complete(editor, uri, sc.FILL_SUM_CURSOR, selected=types.SelectedCompletionInfo(range=at, text="val"))).items
    assert (item.insert_text, item.range) == (sc.FILL_SUM, at)
    assert len(completions(editor)) == 2
    # as the user types, nothing is shown but the ghost text: no progress, no status
    assert len(editor.statuses) == statuses and set(editor.client.progress_reports) == progress


async def test_while_the_model_loads_only_an_asked_for_completion_waits(editor):
    uri = editor.open("calc.py", sc.FILL_SUM_TEXT)
    result = await complete(editor, uri, sc.FILL_SUM_CURSOR)
    if "ready" not in editor.statuses:  # still loading: no completion, and no "waiting for the model" progress
        assert result is None
        begun = [r.title for reports in editor.client.progress_reports.values() for r in reports
                 if isinstance(r, types.WorkDoneProgressBegin)]
        assert not [title for title in begun if "waiting" in title], begun
    (item,) = (await complete(editor, uri, sc.FILL_SUM_CURSOR, INVOKED)).items  # waits for the model
    assert item.insert_text == sc.FILL_SUM


async def test_a_notebook_cells_completion_sees_the_other_cells(editor):
    """The prompt of a completion in a cell holds the notebook's other code cells around it:
    the trained proposal comes only for the whole file's exact prompt."""
    cells = _open_calc_notebook(editor)
    line = sc.CALC_PY.splitlines()[4]
    _change_notebook(editor, 2, cell=cells["c2"], edit=((1, line.index("values"), len(line)), ")"))
    at = types.Position(line=1, character=sc.FILL_SUM_CURSOR.character)
    (item,) = (await complete(editor, cells["c2"], at, INVOKED)).items
    assert (item.insert_text, item.range.start) == (sc.FILL_SUM, at)


async def test_inline_completion_is_off_with_the_setting_and_for_secret_files(editor):
    uri = editor.open("calc.py", sc.FILL_SUM_TEXT)
    secret = editor.open(".env", text="TOKEN=\n")
    assert await complete(editor, secret, types.Position(line=0, character=6)) is None
    configure(editor, completionEnabled=False)
    assert await complete(editor, uri, sc.FILL_SUM_CURSOR, INVOKED) is None
    configure(editor, completionEnabled=True)
    (item,) = (await complete(editor, uri, sc.FILL_SUM_CURSOR, INVOKED)).items
    assert item.insert_text == sc.FILL_SUM


async def test_a_failed_completion_is_an_error_only_when_asked_for(editor):
    """As the user types, a completion that cannot be made is no completion (not an error at
    every keystroke); asked for explicitly, the user reads why."""
    await chat(editor, [("user", sc.CHAT_QUESTION)], token="load", maxNewTokens=1)
    configure(editor, completionContextTokens=8)  # not even the cursor's line fits
    uri = editor.open("calc.py", sc.FILL_SUM_TEXT)
    assert await complete(editor, uri, sc.FILL_SUM_CURSOR) is None
    with pytest.raises(Exception, match="The line at the cursor take"):
        await complete(editor, uri, sc.FILL_SUM_CURSOR, INVOKED)


async def test_cancelling_a_completion_stops_the_model(editor):
    """The editor cancels a completion the user typed past: $/cancelRequest stops the model
    before its next step, and the engine is free at once."""
    await chat(editor, [("user", sc.CHAT_QUESTION)], token="load", maxNewTokens=1)
    editor.client.protocol.notify(types.SET_TRACE, types.SetTraceParams(value=types.TraceValue.Messages))
    configure(editor, completionMaxNewTokens=1500)
    uri = editor.open("calc.py", sc.FILL_LONG_TEXT)
    known = set(editor.client.progress_reports)
    params = types.InlineCompletionParams(
        text_document=types.TextDocumentIdentifier(uri=uri), position=position(sc.FILL_LONG_CURSOR),
        context=types.InlineCompletionContext(trigger_kind=AUTOMATIC), work_done_token="fill")
    request = asyncio.ensure_future(editor.request(types.TEXT_DOCUMENT_INLINE_COMPLETION, params, msg_id="stop-fill"))
    await wait_until(lambda: sum(isinstance(r, types.WorkDoneProgressReport) for r in generation_reports(editor, known)) >= 2)
    end = await _cancel(editor, request, "stop-fill", known)
    stopped = re.fullmatch(r"Stopped after (\d+) tokens?", end)
    assert stopped and int(stopped[1]) < 1000, end
    assert completions(editor)[-1].startswith("StarChat: completion: stopped after")
    configure(editor, completionMaxNewTokens=64)
    started = time.monotonic()
    (item,) = (await complete(editor, uri, sc.FILL_LONG_CURSOR)).items
    assert item.insert_text.startswith("tick tock tick tock")  # cut at the token limit, not stopped
    assert time.monotonic() - started < 10  # the engine was free


async def test_a_completion_model_of_its_own_completes_beside_the_chat(editor):
    """``completionModel`` loads a second model (here the test model again) on a worker of its
    own: a completion is answered while a long chat answer streams from the chat model (whose
    `generate` engine runs one request at a time). A model that cannot load fails completions
    asked for, with the reason, and the chat goes on; emptied, the chat model completes again."""
    editor.client.protocol.notify(types.SET_TRACE, types.SetTraceParams(value=types.TraceValue.Messages))
    await chat(editor, [("user", sc.CHAT_QUESTION)], token="load", maxNewTokens=1)
    configure(editor, completionModel=str(MODEL_DIR))
    uri = editor.open("calc.py", sc.FILL_SUM_TEXT)
    (item,) = (await complete(editor, uri, sc.FILL_SUM_CURSOR, INVOKED)).items  # waits for it to load
    assert item.insert_text == sc.FILL_SUM
    assert any(t.startswith(f"Completion model ready: {MODEL_DIR}") for t in editor.traces)
    long = asyncio.ensure_future(chat(editor, [("user", sc.LONG_QUESTION)], token="long", maxNewTokens=1500))
    await wait_until(lambda: len(editor.partials.get("long", [])) >= 3)
    editor.change(uri, sc.FILL_AREA_TEXT)
    (item,) = (await complete(editor, uri, sc.FILL_AREA_CURSOR, INVOKED)).items
    assert item.insert_text == sc.FILL_AREA and not long.done()
    error = await editor.cancel_mid_stream(long, "long")
    assert getattr(error, "code", None) == -32800

    configure(editor, completionModel=str(MODEL_DIR / "missing"))
    with pytest.raises(Exception, match="Could not load the completion model"):
        await complete(editor, uri, sc.FILL_AREA_CURSOR, INVOKED)
    assert await complete(editor, uri, sc.FILL_AREA_CURSOR) is None
    assert (await chat(editor, [("user", sc.CHAT_QUESTION)], token="still"))["text"] == sc.CHAT_ANSWER
    configure(editor, completionModel="")
    editor.change(uri, sc.FILL_SUM_TEXT)
    (item,) = (await complete(editor, uri, sc.FILL_SUM_CURSOR, INVOKED)).items
    assert item.insert_text == sc.FILL_SUM
