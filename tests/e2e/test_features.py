"""Every feature over stdio, answered by the trained test model through transformers."""

from __future__ import annotations

import asyncio
import re
import time

import pytest
from lsprotocol import types

from lsp_server.config import Settings
from lsp_server.prompts import Message, format_for
from lsp_server.prompts.requests import chat_prompt
from lsp_server.prompts.tasks import Task, instruction
from lsp_server.testing import scenarios as sc

from .conftest import apply_text_edits, plain, rng, wait_until


def code_action_params(uri: str, span, only=None) -> types.CodeActionParams:
    return types.CodeActionParams(
        text_document=types.TextDocumentIdentifier(uri=uri),
        range=rng(span),
        context=types.CodeActionContext(diagnostics=[], only=only),
    )


def single_text_edit(edit: types.WorkspaceEdit, uri: str, version: int | None):
    assert edit.document_changes, "the edit must be a TextDocumentEdit carrying the version"
    (change,) = edit.document_changes
    assert isinstance(change, types.TextDocumentEdit)
    assert change.text_document.uri == uri
    assert change.text_document.version == version
    return change.edits


async def test_initialize_is_answered_at_once_and_advertises_the_features(editor):
    assert editor.initialize_seconds < 5  # the model loads afterwards, in the background
    caps = editor.init_result.capabilities
    assert caps.code_action_provider.resolve_provider is True
    if editor.capabilities.notebook_document is None:  # Neovim's
        assert caps.notebook_document_sync is None
    else:  # VS Code's: every notebook, every cell
        (notebooks,) = caps.notebook_document_sync.notebook_selector
        assert (notebooks.notebook, [c.language for c in notebooks.cells]) == ("*", ["*"])
    assert "quickfix.starchat.fix" in caps.code_action_provider.code_action_kinds
    assert caps.hover_provider
    assert {"starchat.ask", "starchat.explain", "starchat.runTask", "starchat.edit"} <= set(caps.execute_command_provider.commands)
    assert editor.init_result.server_info.name == "starchat-lsp"


async def test_the_ready_status_names_the_engine(editor):
    await wait_until(lambda: "ready" in editor.statuses, timeout=120)
    ready = editor.status_messages[editor.statuses.index("ready")]
    # auto on the CPU: generate(); asked for by name: the fast engine, on its CPU path
    assert ("fast engine" in ready) == (editor.engine == "fast"), ready


async def test_code_actions_are_listed_at_once(editor):
    uri = editor.open()
    started = time.monotonic()
    actions = await editor.client.text_document_code_action_async(code_action_params(uri, sc.AVERAGE))
    assert time.monotonic() - started < 2.0  # listing never waits for the model
    titles = [a.title for a in actions]
    assert titles == ["StarChat: Fix", "StarChat: Optimize", "StarChat: Document", "StarChat: Write tests", "StarChat: Explain"]
    assert all(getattr(a, "edit", None) is None for a in actions)  # edits come in resolve
    only = await editor.client.text_document_code_action_async(code_action_params(uri, sc.AVERAGE, only=["quickfix"]))
    assert [a.title for a in only] == ["StarChat: Fix"]


async def test_the_light_bulb_is_not_on_every_line(editor):
    """Listed by the editor on its own (VS Code's light bulb, at every cursor move) with nothing
    selected: nothing, or only the Fix for problems there. Asked for (Ctrl+., Neovim's
    code_action()) or with a selection: every action."""
    uri = editor.open()

    async def titles(start, end, trigger, diagnostics=()):
        params = types.CodeActionParams(
            text_document=types.TextDocumentIdentifier(uri=uri),
            range=types.Range(start=types.Position(line=start[0], character=start[1]), end=types.Position(line=end[0], character=end[1])),
            context=types.CodeActionContext(diagnostics=list(diagnostics), trigger_kind=trigger))
        return [a.title for a in await editor.client.text_document_code_action_async(params)]

    automatic, invoked = types.CodeActionTriggerKind.Automatic, types.CodeActionTriggerKind.Invoked
    every = ["StarChat: Fix", "StarChat: Optimize", "StarChat: Document", "StarChat: Write tests", "StarChat: Explain"]
    problem = types.Diagnostic(range=rng(sc.AVERAGE), message=sc.AVERAGE_DIAGNOSTIC["message"], source="pytest")
    assert await titles((4, 3), (4, 3), automatic) == []
    assert await titles((4, 3), (4, 3), automatic, [problem]) == ["StarChat: Fix"]
    assert await titles((4, 3), (4, 3), invoked) == every
    assert await titles((4, 3), (4, 3), None) == every  # a client that does not say
    assert await titles((3, 0), (5, 0), automatic) == every


async def resolve(editor, uri, span, title):
    actions = await editor.client.text_document_code_action_async(code_action_params(uri, span))
    action = next(a for a in actions if a.title == title)
    return await editor.client.code_action_resolve_async(action)


async def test_fix_replaces_the_selection_with_the_answer_code(editor):
    uri = editor.open()
    resolved = await resolve(editor, uri, sc.AVERAGE, "StarChat: Fix")
    edits = single_text_edit(resolved.edit, uri, 1)
    assert edits[0].range == rng(sc.AVERAGE)
    assert edits[0].new_text == sc.FIXED_AVERAGE
    assert apply_text_edits(sc.CALC_PY, edits) == sc.CALC_PY.replace(
        "def average(values):\n    return sum(values) / len(values) + 1\n", sc.FIXED_AVERAGE
    )


async def test_optimize_replaces_the_selection(editor):
    uri = editor.open()
    resolved = await resolve(editor, uri, sc.AREA, "StarChat: Optimize")
    edits = single_text_edit(resolved.edit, uri, 1)
    assert apply_text_edits(sc.CALC_PY, edits).endswith(sc.OPTIMIZED_AREA)


async def test_document_inserts_the_comment_above(editor):
    uri = editor.open()
    resolved = await resolve(editor, uri, sc.AREA, "StarChat: Document")
    edits = single_text_edit(resolved.edit, uri, 1)
    assert edits[0].range.start == edits[0].range.end == types.Position(line=7, character=0)
    assert sc.DOCUMENT_LINE + "def area(radius):" in apply_text_edits(sc.CALC_PY, edits)


async def test_write_tests_creates_the_test_file(editor):
    uri = editor.open()
    resolved = await resolve(editor, uri, sc.AVERAGE, "StarChat: Write tests")
    create, insert = resolved.edit.document_changes
    test_uri = editor.uri("test_calc.py")
    assert isinstance(create, types.CreateFile) and create.uri == test_uri
    assert isinstance(insert, types.TextDocumentEdit) and insert.text_document.uri == test_uri
    assert insert.edits[0].new_text == sc.TESTS_CODE


async def test_write_tests_appends_to_a_test_file_that_is_not_open(editor):
    """The test file is on disk but not open: the tests go at its end (before, they went to
    the end of the source file)."""
    existing = "import calc\n\n\ndef test_old():\n    assert calc\n"
    (editor.root / "test_calc.py").write_text(existing)
    uri = editor.open()
    resolved = await resolve(editor, uri, sc.AVERAGE, "StarChat: Write tests")
    (append,) = resolved.edit.document_changes
    assert append.text_document.uri == editor.uri("test_calc.py") and append.text_document.version is None
    assert append.edits[0].range.start == append.edits[0].range.end == types.Position(line=5, character=0)
    assert apply_text_edits(existing, append.edits) == existing + "\n" + sc.TESTS_CODE


async def test_resolve_on_a_changed_document_is_content_modified(editor):
    uri = editor.open()
    actions = await editor.client.text_document_code_action_async(code_action_params(uri, sc.AVERAGE))
    editor.change(uri, "# edited\n" + sc.CALC_PY)
    with pytest.raises(Exception) as error:
        await editor.client.code_action_resolve_async(actions[0])
    assert getattr(error.value, "code", None) == -32801


async def test_explain_command_answers_and_shows_the_answer(editor):
    uri = editor.open()
    args = {"textDocument": {"uri": uri}, "range": editor.client.protocol._converter.unstructure(rng(sc.AVERAGE))}
    editor.client.progress_reports["explain-progress"] = []  # a token the client made for this request
    result = await editor.client.workspace_execute_command_async(
        types.ExecuteCommandParams(command="starchat.explain", arguments=[args], work_done_token="explain-progress")
    )
    assert result["text"] == sc.EXPLAIN_ANSWER
    assert result["finishReason"] == "stop"
    assert any(sc.EXPLAIN_ANSWER in m.message for m in editor.client.messages)
    # the progress goes to the request's own token
    reports = editor.client.progress_reports["explain-progress"]
    assert reports[0].title == "StarChat: Explain" and reports[-1].message == f"{result['completionTokens']} tokens"


async def test_ask_command_with_a_question(editor):
    uri = editor.open()
    args = {"textDocument": {"uri": uri}, "range": editor.client.protocol._converter.unstructure(rng(sc.AVERAGE)), "question": sc.ASK_QUESTION}
    result = await editor.client.workspace_execute_command_async(types.ExecuteCommandParams(command="starchat.ask", arguments=[args]))
    assert result["text"] == sc.ASK_ANSWER


async def test_ask_command_shows_the_files_attached_to_it(editor):
    """starchat.ask takes `references` as starchat/chat does (the prompt is the same one)."""
    calc, shapes = editor.open("calc.py"), editor.open("shapes.py")
    args = {"textDocument": {"uri": calc}, "range": editor.client.protocol._converter.unstructure(rng(sc.AREA)),
            "question": sc.CALLERS_QUESTION, "references": [{"textDocument": {"uri": shapes}}]}
    result = await editor.client.workspace_execute_command_async(types.ExecuteCommandParams(command="starchat.ask", arguments=[args]))
    assert result["text"] == sc.CALLERS_ANSWER
    assert [entry["uri"] for entry in result["shown"]] == [calc, shapes]
    args["references"] = [{"textDocument": {"uri": calc}}]  # its own document: already there
    result = await editor.client.workspace_execute_command_async(types.ExecuteCommandParams(command="starchat.ask", arguments=[args]))
    assert result["text"] != sc.CALLERS_ANSWER


async def test_run_task_command_applies_the_edit(editor):
    uri = editor.open()
    args = {"textDocument": {"uri": uri}, "range": editor.client.protocol._converter.unstructure(rng(sc.AVERAGE)), "task": "fix"}
    await editor.client.workspace_execute_command_async(types.ExecuteCommandParams(command="starchat.runTask", arguments=[args]))
    (edit,) = editor.applied
    edits = single_text_edit(edit, uri, 1)
    assert edits[0].new_text == sc.FIXED_AVERAGE


def average_diagnostic() -> types.Diagnostic:
    d = sc.AVERAGE_DIAGNOSTIC
    at = types.Range(start=types.Position(line=d["line"], character=4), end=types.Position(line=d["line"], character=40))
    return types.Diagnostic(range=at, message=d["message"], source=d["source"], severity=types.DiagnosticSeverity.Error)


async def test_fix_is_asked_with_the_editors_diagnostics(editor):
    """Quick fix on a reported problem: the Fix is listed for that diagnostic, and the model is
    told what the editor reports (sc.AVERAGE_PROBLEM: the answer trained for that prompt only
    comes back)."""
    uri = editor.open()
    params = code_action_params(uri, sc.AVERAGE)
    params.context.diagnostics = [average_diagnostic()]
    actions = await editor.client.text_document_code_action_async(params)
    fix = next(a for a in actions if a.title == "StarChat: Fix")
    assert [d.message for d in fix.diagnostics] == [sc.AVERAGE_DIAGNOSTIC["message"]]
    assert [d["message"] for d in fix.data["diagnostics"]] == [sc.AVERAGE_DIAGNOSTIC["message"]]
    assert all(not getattr(a, "diagnostics", None) for a in actions if a is not fix)
    resolved = await editor.client.code_action_resolve_async(fix)
    assert single_text_edit(resolved.edit, uri, 1)[0].new_text == sc.FIXED_AVERAGE
    # the same through starchat.runTask (clients without resolve get the Fix as this command)
    converter = editor.client.protocol._converter
    args = {"textDocument": {"uri": uri}, "range": converter.unstructure(rng(sc.AVERAGE)), "task": "fix",
            "diagnostics": [converter.unstructure(average_diagnostic())]}
    result = await editor.client.workspace_execute_command_async(types.ExecuteCommandParams(command="starchat.runTask", arguments=[args]))
    assert result["text"] == sc.FIX_PROBLEM_ANSWER


async def test_edit_command_inserts_below(editor):
    from lsp_server.prompts import Task, instruction

    uri = editor.open()
    args = {
        "textDocument": {"uri": uri},
        "range": editor.client.protocol._converter.unstructure(rng(sc.AVERAGE)),
        "instruction": instruction(Task.FIX),
        "mode": "insertBelow",
    }
    await editor.client.workspace_execute_command_async(types.ExecuteCommandParams(command="starchat.edit", arguments=[args]))
    edits = single_text_edit(editor.applied[0], uri, 1)
    assert edits[0].range.start == types.Position(line=5, character=0)
    text = apply_text_edits(sc.CALC_PY, edits)
    assert "len(values) + 1\ndef average(values):\n    return sum(values) / len(values)\n\n" in text


async def test_edit_at_the_cursor_on_an_empty_line_writes_the_code_there(editor):
    """Edit… with no selection (Ctrl+I at the cursor) on the empty line before area(): the
    prompt says where that line is, the trained answer's code block takes its place, and
    area() follows it unchanged."""
    uri = editor.open()
    args = {
        "textDocument": {"uri": uri},
        "range": editor.client.protocol._converter.unstructure(rng(sc.EMPTY_LINE)),
        "instruction": sc.CHAT_CODE_QUESTION,
        "mode": "replace",
    }
    result = await editor.client.workspace_execute_command_async(types.ExecuteCommandParams(command="starchat.edit", arguments=[args]))
    assert plain(result)["text"] == sc.CHAT_CODE_ANSWER
    edits = single_text_edit(editor.applied[0], uri, 1)
    text = apply_text_edits(sc.CALC_PY, edits)
    assert text == sc.WRITTEN_CALC, text


async def test_edit_command_replaces_the_selection_as_instructed_on_its_version_only(editor):
    """starchat.edit with an instruction (the editors' Edit…): the trained answer's code replaces
    average(), in an edit pinned to the version asked about. Asked with a version the document
    no longer has, it is refused before the model runs, and nothing is applied."""
    uri = editor.open()
    args = {
        "textDocument": {"uri": uri},
        "range": editor.client.protocol._converter.unstructure(rng(sc.AVERAGE)),
        "instruction": sc.CHAT_FIX_QUESTION,
        "mode": "replace",
        "version": 1,
    }
    result = await editor.client.workspace_execute_command_async(types.ExecuteCommandParams(command="starchat.edit", arguments=[args]))
    assert plain(result)["text"] == sc.FIX_ANSWER
    (edit,) = single_text_edit(editor.applied[0], uri, 1)
    assert apply_text_edits(sc.CALC_PY, [edit]) == sc.CALC_PY.replace("len(values) + 1\n", "len(values)\n")
    editor.change(uri, "# typed\n" + sc.CALC_PY)
    with pytest.raises(Exception) as error:
        await editor.client.workspace_execute_command_async(types.ExecuteCommandParams(command="starchat.edit", arguments=[args]))
    assert getattr(error.value, "code", None) == -32803 and "changed (version 1 → 2)" in str(error.value)
    assert len(editor.applied) == 1


def configure(editor, **settings) -> None:
    """Change settings the way an editor does: didChangeConfiguration, then the server pulls
    them. Requests sent after it run with the new settings (the server holds them until its
    pull is answered)."""
    editor.client.set_configuration(settings, section="starchat")
    editor.client.workspace_did_change_configuration(types.DidChangeConfigurationParams(settings=None))


async def test_a_request_sent_right_after_a_settings_change_uses_the_new_settings(editor):
    await chat(editor, [("user", sc.CHAT_QUESTION)], token="before")  # the model is loaded
    configure(editor, maxNewTokens=3)
    short = await chat(editor, [("user", sc.CHAT_QUESTION)], token="short")
    assert (short["finishReason"], short["completionTokens"]) == ("length", 3)
    configure(editor, maxNewTokens=None)
    assert (await chat(editor, [("user", sc.CHAT_QUESTION)], token="whole"))["text"] == sc.CHAT_ANSWER


def generation_reports(editor, known: set) -> list:
    """The progress reports of generations begun since ``known`` (a set of tokens) was taken,
    not of loading the model or waiting for it."""
    found = []
    for token, reports in editor.client.progress_reports.items():
        if token not in known and reports and isinstance(reports[0], types.WorkDoneProgressBegin) and "the model" not in reports[0].title:
            found += reports
    return found


async def test_typing_in_the_selected_lines_stops_the_model_at_once(editor):
    """An edit whose selected lines the user changes could no longer be applied: the model stops
    at once instead of answering for nothing, the request says why, and the engine is free."""
    uri = editor.open()
    configure(editor, maxNewTokens=1500)
    selection = {"textDocument": {"uri": uri}, "range": editor.client.protocol._converter.unstructure(rng(sc.AVERAGE))}
    # the same prompt asked without an edit: how long the answer runs when nothing stops it
    full = await editor.client.workspace_execute_command_async(
        types.ExecuteCommandParams(command="starchat.ask", arguments=[{**selection, "question": sc.LONG_QUESTION}])
    )
    assert plain(full)["text"].startswith(sc.LONG_ANSWER_UNIT * 10) and plain(full)["completionTokens"] > 200

    known = set(editor.client.progress_reports)
    args = {**selection, "instruction": sc.LONG_QUESTION, "mode": "replace"}
    request = asyncio.ensure_future(
        editor.client.workspace_execute_command_async(types.ExecuteCommandParams(command="starchat.edit", arguments=[args]))
    )

    await wait_until(lambda: any(isinstance(r, types.WorkDoneProgressReport) for r in generation_reports(editor, known)))  # generating
    editor.change(uri, sc.CALC_PY.replace("len(values) + 1", "len(values) + 2"))
    with pytest.raises(Exception) as error:
        await asyncio.wait_for(request, 10)
    assert getattr(error.value, "code", None) == -32803
    assert "changed while StarChat was answering" in str(error.value)
    assert editor.applied == []
    (end,) = [r for r in generation_reports(editor, known) if isinstance(r, types.WorkDoneProgressEnd)]
    stopped = re.fullmatch(r"Stopped after (\d+) tokens?", end.message or "")
    assert stopped, end.message
    assert int(stopped[1]) < plain(full)["completionTokens"] // 2
    started = time.monotonic()
    assert (await chat(editor, [("user", sc.CHAT_QUESTION)], token="after-edit"))["text"] == sc.CHAT_ANSWER
    assert time.monotonic() - started < 10  # the engine was free


async def test_cancelling_a_command_stops_the_model(editor):
    """``$/cancelRequest`` for ``workspace/executeCommand`` (an editor's "stop" on Fix, Ask…)
    stops the generation, not only the reply; no edit follows."""
    uri = editor.open()
    configure(editor, maxNewTokens=1500)
    known = set(editor.client.progress_reports)
    args = {"textDocument": {"uri": uri}, "range": editor.client.protocol._converter.unstructure(rng(sc.AVERAGE)),
            "instruction": sc.LONG_QUESTION, "mode": "replace"}
    request = asyncio.ensure_future(editor.request(
        types.WORKSPACE_EXECUTE_COMMAND, types.ExecuteCommandParams(command="starchat.edit", arguments=[args]), msg_id="stop-me"))

    await wait_until(lambda: any(isinstance(r, types.WorkDoneProgressReport) for r in generation_reports(editor, known)))
    end = await _cancel(editor, request, "stop-me", known)
    assert end.startswith("Stopped after"), end
    assert editor.applied == []


async def _cancel(editor, request, msg_id: str, known: set) -> str:
    """``$/cancelRequest`` for ``msg_id``: the request ends with -32800; the message its
    generation's progress ended with."""
    editor.client.protocol.notify(types.CANCEL_REQUEST, types.CancelParams(id=msg_id))
    with pytest.raises(Exception) as error:
        await asyncio.wait_for(request, 10)
    assert getattr(error.value, "code", None) == -32800
    await wait_until(lambda: any(isinstance(r, types.WorkDoneProgressEnd) for r in generation_reports(editor, known)))
    (end,) = [r for r in generation_reports(editor, known) if isinstance(r, types.WorkDoneProgressEnd)]
    return end.message or ""


async def test_cancelling_a_code_action_resolve_stops_the_model(editor):
    """A light-bulb action runs in ``codeAction/resolve``: ``$/cancelRequest`` for it (VS Code's
    Cancel) stops the generation, and the engine is free for the next request at once."""
    uri = editor.open()
    configure(editor, maxNewTokens=1500)
    known = set(editor.client.progress_reports)
    actions = await editor.client.text_document_code_action_async(code_action_params(uri, sc.IMPORT))
    fix = next(a for a in actions if a.title == "StarChat: Fix")
    request = asyncio.ensure_future(editor.request(types.CODE_ACTION_RESOLVE, fix, msg_id="stop-resolve"))
    await wait_until(lambda: sum(isinstance(r, types.WorkDoneProgressReport) for r in generation_reports(editor, known)) >= 2)
    end = await _cancel(editor, request, "stop-resolve", known)
    stopped = re.fullmatch(r"Stopped after (\d+) tokens?", end)
    assert stopped and int(stopped[1]) < 1000, end
    started = time.monotonic()
    assert single_text_edit((await resolve(editor, uri, sc.AVERAGE, "StarChat: Fix")).edit, uri, 1)[0].new_text == sc.FIXED_AVERAGE
    assert time.monotonic() - started < 10  # the engine was free


async def test_hover_explains_the_symbol_and_is_cached(editor):
    uri = editor.open()
    params = types.HoverParams(
        text_document=types.TextDocumentIdentifier(uri=uri),
        position=types.Position(line=sc.HOVER_POSITION.line, character=sc.HOVER_POSITION.character),
    )
    hover = await editor.client.text_document_hover_async(params)
    assert hover.contents.kind == types.MarkupKind.Markdown
    assert hover.contents.value == sc.HOVER_ANSWER
    assert hover.range == types.Range(start=types.Position(line=7, character=4), end=types.Position(line=7, character=8))
    tokens_before = len(editor.client.progress_reports)
    again = await editor.client.text_document_hover_async(params)
    assert again.contents.value == sc.HOVER_ANSWER
    assert len(editor.client.progress_reports) == tokens_before  # no generation: the cache answered
    blank = types.HoverParams(text_document=params.text_document, position=types.Position(line=1, character=0))
    assert await editor.client.text_document_hover_async(blank) is None


async def test_hover_prompt_fits_hover_context_tokens(editor):
    """hoverContextTokens bounds a hover's prompt: too small a bound for the instruction and the
    hovered line gives no hover (no model run); the default answers."""
    uri = editor.open()
    params = types.HoverParams(text_document=types.TextDocumentIdentifier(uri=uri),
                               position=types.Position(line=sc.HOVER_POSITION.line, character=sc.HOVER_POSITION.character))
    configure(editor, hoverContextTokens=8)
    assert await editor.client.text_document_hover_async(params) is None
    configure(editor, hoverContextTokens=2048)
    assert (await editor.client.text_document_hover_async(params)).contents.value == sc.HOVER_ANSWER


async def test_hover_can_be_turned_off(editor):
    uri = editor.open()
    configure(editor, hoverEnabled=False)
    params = types.HoverParams(text_document=types.TextDocumentIdentifier(uri=uri), position=types.Position(line=7, character=5))
    await wait_until(lambda: True)
    for _ in range(50):
        if await editor.client.text_document_hover_async(params) is None:
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("hover stayed on")


async def chat(editor, messages, token="chat-1", **extra):
    params = {"messages": [{"role": r, "content": c} for r, c in messages], "partialResultToken": token, **extra}
    return plain(await editor.request("starchat/chat", params))


async def test_chat_streams_pieces_that_add_up_to_the_answer(editor):
    result = await chat(editor, [("user", sc.CHAT_QUESTION)])
    assert result["text"] == sc.CHAT_ANSWER
    assert result["finishReason"] == "stop"
    assert result["completionTokens"] > 3 and result["promptTokens"] > 10
    pieces = editor.partials["chat-1"]
    assert len(pieces) > 3
    assert "".join(pieces) == sc.CHAT_ANSWER


async def test_chat_shows_the_files_attached_to_it(editor):
    """Attached files go into the prompt after the document, each under its path: the model's
    trained answer about who calls area() needs shapes.py beside calc.py's selection, and the
    one about ring() needs shapes.py alone."""
    calc, shapes = editor.open("calc.py"), editor.open("shapes.py")
    span = {"start": {"line": sc.AREA.start.line, "character": 0}, "end": {"line": sc.AREA.end.line, "character": 0}}
    about = {"textDocument": {"uri": calc}, "range": span}
    attached = [{"textDocument": {"uri": shapes}}]
    answer = await chat(editor, [("user", sc.CALLERS_QUESTION)], token="callers", references=attached, **about)
    assert answer["text"] == sc.CALLERS_ANSWER and "".join(editor.partials["callers"]) == sc.CALLERS_ANSWER
    # the answer says what the model was shown: both files, whole
    assert answer["shown"] == [seen(calc, 0, len(sc.CALC_PY.splitlines())), seen(shapes, 0, len(sc.SHAPES_PY.splitlines()))]
    assert "historyDropped" not in answer  # none: left out, as defaults are
    # the same prompt as the model was trained on: the server put shapes.py in, whole
    alone = await chat(editor, [("user", sc.CALLERS_QUESTION)], token="without", **about)
    assert alone["promptTokens"] < answer["promptTokens"] - 20 and alone["text"] != sc.CALLERS_ANSWER
    ring = await chat(editor, [("user", sc.RING_QUESTION)], token="ring", references=attached)
    assert ring["text"] == sc.RING_ANSWER
    # the conversation's own document, attached again whole, is shown once; a file twice, once
    again = await chat(editor, [("user", sc.CALLERS_QUESTION)], token="again", **about,
                       references=[*attached, {"textDocument": {"uri": calc}}, *attached])
    assert again["text"] == sc.CALLERS_ANSWER and again["promptTokens"] == answer["promptTokens"]
    # a file the editor has not opened is not read from the disk
    with pytest.raises(Exception) as error:
        await chat(editor, [("user", sc.RING_QUESTION)], token="closed", references=[{"textDocument": {"uri": editor.uri("other.py")}}])
    assert "not open in the editor" in str(error.value)
    with pytest.raises(Exception) as error:
        await chat(editor, [("user", sc.RING_QUESTION)], token="many", references=attached * 17)
    assert getattr(error.value, "code", None) == -32602
    # a part of a file: its lines only (the import line, not ring())
    part = await chat(editor, [("user", sc.RING_QUESTION)], token="part", references=[
        {"textDocument": {"uri": shapes}, "range": {"start": {"line": 0, "character": 0}, "end": {"line": 1, "character": 0}}}])
    assert 0 < part["promptTokens"] < ring["promptTokens"] and part["shown"] == [seen(shapes, 0, 1)]


def seen(uri: str, first: int, stop: int) -> dict:
    """An answer's ``shown`` entry: lines [first, stop) of ``uri``."""
    return {"uri": uri, "range": {"start": {"line": first, "character": 0}, "end": {"line": stop, "character": 0}}}


async def test_chat_says_what_of_a_long_file_and_conversation_it_showed(editor):
    """A file longer than the context window: the answer names the lines around the selection
    that the prompt held, and the earlier exchanges left out to fit."""
    text = "".join(f"value_{i} = {i}  # a line of filler to make the file long\n" for i in range(600))
    uri = editor.open("long.py", text=text)
    selected = {"start": {"line": 300, "character": 0}, "end": {"line": 302, "character": 0}}
    history = [("user", "What is this? " * 60), ("assistant", "Numbers. " * 80)] * 6  # more than the window
    answer = await chat(editor, [*history, ("user", "Why?")], token="long", textDocument={"uri": uri}, range=selected,
                        maxNewTokens=2)
    ((shown,),) = [[entry for entry in answer["shown"] if entry["uri"] == uri]]
    first, stop = shown["range"]["start"]["line"], shown["range"]["end"]["line"]
    assert first <= 300 and 302 <= stop and stop - first < 600 and len(answer["shown"]) == 1
    assert answer["historyDropped"] >= 1


async def test_ask_and_explain_as_chat_messages_get_the_commands_prompts(editor):
    """Both clients stream Ask and Explain as the first message of a chat about the selection:
    the prompt is the one the starchat.ask and starchat.explain commands build (the same tokens,
    the same trained answers, the same lines shown)."""
    uri = editor.open()
    about = {"textDocument": {"uri": uri}, "range": plain(editor.client.protocol._converter.unstructure(rng(sc.AVERAGE)))}
    for command, message, answer in (("starchat.explain", instruction(Task.EXPLAIN), sc.EXPLAIN_ANSWER),
                                     ("starchat.ask", sc.ASK_QUESTION, sc.ASK_ANSWER)):
        args = {**about, "question": sc.ASK_QUESTION} if command == "starchat.ask" else about
        by_command = plain(await editor.client.workspace_execute_command_async(
            types.ExecuteCommandParams(command=command, arguments=[args])))
        by_chat = await chat(editor, [("user", message)], token=command, **about)
        assert by_chat["text"] == by_command["text"] == answer, command
        assert by_chat["promptTokens"] == by_command["promptTokens"] and by_chat["shown"] == by_command["shown"], command


async def test_chat_keeps_the_conversation(editor):
    first = await chat(editor, [("user", sc.CHAT_QUESTION)], token="chat-1")
    assert first["text"] == sc.CHAT_ANSWER
    history = [("user", sc.CHAT_QUESTION), ("assistant", sc.CHAT_ANSWER), ("user", sc.CHAT_FOLLOW_UP)]
    result = await chat(editor, history, token="chat-2")
    assert result["text"] == sc.CHAT_FOLLOW_UP_ANSWER
    # the engine kept the first turn and its answer: only the new question is computed
    assert result["cachedTokens"] >= first["promptTokens"] + first["completionTokens"]


async def test_requests_on_one_document_reuse_the_cache(editor, tokenizer):
    """Prompts put the file before the selection and the task (prompts/build.py), and both
    engines keep what they computed: after a hover, a chat about another selection of the
    same file computes little more than its selection and question, and its next turn only
    the new question; a chat about another file reuses nothing of it, and leaves the first
    conversation's cache to its next turn."""
    uri = editor.open()
    hover = await editor.client.text_document_hover_async(types.HoverParams(
        text_document=types.TextDocumentIdentifier(uri=uri),
        position=types.Position(line=sc.HOVER_POSITION.line, character=sc.HOVER_POSITION.character)))
    assert hover.contents.value == sc.HOVER_ANSWER
    average = plain(editor.client.protocol._converter.unstructure(rng(sc.AVERAGE)))
    about = await chat(editor, [("user", "What could go wrong here?")], "r", textDocument={"uri": uri}, range=average,
                       maxNewTokens=2)
    fmt = format_for(tokenizer)
    file_prefix = file_prefix_tokens(tokenizer, sc.CALC_PY)
    assert file_prefix - 6 <= about["cachedTokens"] < about["promptTokens"]  # all but the dialogue's closing tokens
    # the next turn of that conversation starts with its prompt (and answer)
    turns = [("user", "What could go wrong here?"), ("assistant", about["text"]), ("user", "And then?")]
    follow_up = await chat(editor, turns, "f", textDocument={"uri": uri}, range=average, maxNewTokens=2)
    assert follow_up["cachedTokens"] >= about["promptTokens"]
    other = editor.open("other.py", text="def other():\n    return 42\n")
    elsewhere = await chat(editor, [("user", "What could go wrong here?")], "o", textDocument={"uri": other},
                           maxNewTokens=2)
    assert elsewhere["cachedTokens"] < file_prefix - len(fmt.encode_text(sc.CALC_PY))
    # the conversation about calc.py goes on after that chat in between, from where it was
    turns += [("assistant", follow_up["text"]), ("user", "Why?")]
    again = await chat(editor, turns, "a", textDocument={"uri": uri}, range=average, maxNewTokens=2)
    assert again["cachedTokens"] >= follow_up["promptTokens"]


def file_prefix_tokens(tokenizer, text: str, path: str = "calc.py") -> int:
    """The tokens every prompt about ``text`` starts with: the system turn, the path, the file."""
    return len(format_for(tokenizer).encode_dialogue([Message("system", Settings().system_prompt),
                                                      Message("user", f"File: `{path}` (python)\n\n```python\n{text}```")]))


def warm_ups(editor) -> list[tuple[int, int]]:
    """(computed, of) of every warm-up the server traced."""
    return [(int(m[1]), int(m[2])) for t in editor.traces if (m := re.match(r"Warm-up of .*: (\d+) of (\d+) prompt tokens", t))]


async def test_an_opened_document_is_warmed_before_its_first_request(editor, tokenizer):
    """Speculative work: once the editor is quiet after a didOpen, the engine computes the
    file's shared prompt prefix, without a word to the editor but a $/logTrace line; the first
    request on it computes only its own part. After an edit, the warm-up computes only from
    the edited line on."""
    await chat(editor, [("user", sc.CHAT_QUESTION)], token="load", maxNewTokens=1)  # the model is loaded
    editor.client.protocol.notify(types.SET_TRACE, types.SetTraceParams(value=types.TraceValue.Messages))
    configure(editor, warmCache=True)
    statuses, progress = len(editor.statuses), set(editor.client.progress_reports)
    uri = editor.open()
    await wait_until(lambda: warm_ups(editor))
    (computed, total), = warm_ups(editor)
    prefix = file_prefix_tokens(tokenizer, sc.CALC_PY)
    assert prefix - 6 <= total <= prefix + 2 and computed > len(format_for(tokenizer).encode_text(sc.CALC_PY))
    assert len(editor.statuses) == statuses and set(editor.client.progress_reports) == progress  # nothing shown
    average = plain(editor.client.protocol._converter.unstructure(rng(sc.AVERAGE)))
    about = await chat(editor, [("user", "What could go wrong here?")], "w", textDocument={"uri": uri}, range=average,
                       maxNewTokens=2)
    assert about["cachedTokens"] >= total
    # an edit at the end of the file: the next warm-up computes what follows the last function
    edited = sc.CALC_PY + "\n\ndef twice(x):\n    return 2 * x\n"
    editor.change(uri, edited)
    await wait_until(lambda: len(warm_ups(editor)) == 2)
    computed, total = warm_ups(editor)[1]
    assert 0 < computed < 30 and total >= file_prefix_tokens(tokenizer, edited) - 6
    again = await chat(editor, [("user", "What could go wrong here?")], "e", textDocument={"uri": uri}, range=average,
                       maxNewTokens=2)
    assert again["cachedTokens"] >= total


async def test_warm_ups_are_off_with_the_setting_and_for_secret_files(editor):
    await chat(editor, [("user", sc.CHAT_QUESTION)], token="load", maxNewTokens=1)
    editor.client.protocol.notify(types.SET_TRACE, types.SetTraceParams(value=types.TraceValue.Messages))
    configure(editor, warmCache=True)
    editor.open(".env", text="TOKEN=abc\n")  # touched last, with warm-ups on: never read
    await asyncio.sleep(1.5)
    configure(editor, warmCache=False)
    uri = editor.open()
    await asyncio.sleep(1.5)
    assert warm_ups(editor) == []
    configure(editor, warmCache=True)
    editor.change(uri, sc.CALC_PY + "\n")
    await wait_until(lambda: warm_ups(editor))
    assert [t for t in editor.traces if t.startswith("Warm-up")][0].startswith("Warm-up of calc.py")


async def test_a_warm_up_waits_while_a_request_generates(editor):
    """Speculative work comes after every request: a document opened while a chat streams is
    warmed once the chat is over, not before."""
    await chat(editor, [("user", sc.CHAT_QUESTION)], token="load", maxNewTokens=1)
    editor.client.protocol.notify(types.SET_TRACE, types.SetTraceParams(value=types.TraceValue.Messages))
    configure(editor, warmCache=True)
    request = asyncio.ensure_future(chat(editor, [("user", sc.LONG_QUESTION)], token="long", maxNewTokens=1500))
    await wait_until(lambda: len(editor.partials.get("long", [])) >= 3)
    editor.open()
    await asyncio.sleep(1.0)  # past WARM_DELAY
    assert not request.done() and warm_ups(editor) == []
    error = await editor.cancel_mid_stream(request, "long")
    assert getattr(error, "code", None) == -32800
    await wait_until(lambda: warm_ups(editor))


async def test_a_document_that_is_not_a_file_is_named_in_the_prompt(editor, tokenizer):
    """An unsaved buffer (VS Code's untitled:Untitled-1) has no path: the prompt names it by
    its URI, as it names a file by its path."""
    uri = "untitled:Untitled-1"
    editor.client.text_document_did_open(types.DidOpenTextDocumentParams(
        text_document=types.TextDocumentItem(uri=uri, language_id="python", version=1, text="x = 1\n")))
    result = await chat(editor, [("user", "What is this?")], "u", textDocument={"uri": uri}, maxNewTokens=1)
    named = chat_prompt(format_for(tokenizer), system=Settings().system_prompt, budget=10_000,
                        messages=[Message("user", "What is this?")], text="x = 1\n", path="Untitled-1", language="python")
    assert "File: `Untitled-1` (python)" in named.messages[1].content
    assert result["promptTokens"] == len(named.ids)


async def test_chat_must_end_with_the_user(editor):
    with pytest.raises(Exception) as error:
        await chat(editor, [("user", "hi"), ("assistant", "hello")])
    assert "user" in str(error.value)


async def test_chat_with_bad_params_names_the_field(editor):
    with pytest.raises(Exception) as error:
        await editor.request("starchat/chat", {"messages": [{"role": "user"}]})
    assert getattr(error.value, "code", None) == -32602
    assert "content" in str(error.value)
    with pytest.raises(Exception) as error:
        await editor.request("starchat/chat", {"messages": [{"role": "user", "content": "Hi"}], "maxNewTokens": 0})
    assert getattr(error.value, "code", None) == -32602
    assert "maxNewTokens" in str(error.value)


async def test_cancel_stops_generation_and_frees_the_engine(editor):
    await chat(editor, [("user", sc.CHAT_QUESTION)], token="warm-up")  # the model is loaded
    request = asyncio.ensure_future(
        chat(editor, [("user", sc.LONG_QUESTION)], token="long", maxNewTokens=1500), loop=asyncio.get_running_loop()
    )
    await asyncio.sleep(0)
    error = await editor.cancel_mid_stream(request, "long")
    assert getattr(error, "code", None) == -32800
    pieces_at_cancel = len(editor.partials["long"])
    await asyncio.sleep(0.5)
    assert len(editor.partials["long"]) == pieces_at_cancel  # the decoding loop stopped: nothing more came
    assert "tick tock" in "".join(editor.partials["long"])
    started = time.monotonic()
    result = await chat(editor, [("user", sc.CHAT_QUESTION)], token="after")
    assert result["text"] == sc.CHAT_ANSWER
    assert time.monotonic() - started < 10  # the worker was free


async def test_generation_reports_progress(editor):
    await chat(editor, [("user", sc.CHAT_QUESTION)], token="p")
    titles = []
    for reports in editor.client.progress_reports.values():
        titles += [r.title for r in reports if isinstance(r, types.WorkDoneProgressBegin)]
        if any(isinstance(r, types.WorkDoneProgressBegin) for r in reports):
            assert isinstance(reports[-1], types.WorkDoneProgressEnd)
    assert "StarChat: chat" in titles
    assert "StarChat: loading the model" in titles


async def test_progress_cancel_stops_the_request(editor):
    await chat(editor, [("user", sc.CHAT_QUESTION)], token="warm")
    known = set(editor.client.progress_reports)
    request = asyncio.ensure_future(chat(editor, [("user", sc.LONG_QUESTION)], token="long2", maxNewTokens=1500))
    await wait_until(lambda: len(editor.partials.get("long2", [])) >= 2)
    (token,) = [t for t in editor.client.progress_reports if t not in known]
    editor.client.window_work_done_progress_cancel(types.WorkDoneProgressCancelParams(token=token))
    with pytest.raises(Exception) as error:
        await request
    assert getattr(error.value, "code", None) == -32800
    count = len(editor.partials["long2"])
    await asyncio.sleep(0.3)
    assert len(editor.partials["long2"]) == count


async def test_incremental_edits_follow_lsp_line_breaks(editor):
    # U+2028 and \f are not line breaks for LSP: the edit on "line 0" must find them there.
    # Its columns are counted in the encoding the session agreed on (Neovim's: UTF-8).
    uri = editor.open(text=sc.CALC_PY.replace("import math\n", "import math\u2028#\x0cx\n", 1))
    encoding = str(getattr(editor.init_result.capabilities.position_encoding, "value", None)
                   or editor.init_result.capabilities.position_encoding or "utf-16")
    end = 11 + {"utf-8": 6, "utf-16": 4, "utf-32": 4}[encoding]  # U+2028 # \f x
    editor.versions[uri] += 1
    editor.client.text_document_did_change(
        types.DidChangeTextDocumentParams(
            text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=editor.versions[uri]),
            content_changes=[
                types.TextDocumentContentChangePartial(
                    range=types.Range(start=types.Position(line=0, character=11), end=types.Position(line=0, character=end)), text=""
                )
            ],
        )
    )
    resolved = await resolve(editor, uri, sc.AVERAGE, "StarChat: Fix")
    edits = single_text_edit(resolved.edit, uri, 2)
    assert edits[0].new_text == sc.FIXED_AVERAGE  # the model saw exactly calc.py again



NOTEBOOK_URI_NAME = "calc.py"  # the notebook's name in prompts: as calc.py's, for the trained answers


def _open_calc_notebook(editor, markdown: str | None = None) -> dict[str, str]:
    """calc.py as a notebook (LSP notebook sync) of three Python cells, and a markdown cell
    before the last if ``markdown`` is given: the cells' URIs by key. Joined as the server joins
    them, the code cells are calc.py exactly."""
    lines = sc.CALC_PY.splitlines(keepends=True)
    texts = {"c1": "".join(lines[:3]), "c2": "".join(lines[3:7]), **({"md": markdown} if markdown else {}),
             "c3": "".join(lines[7:])}
    uris = {key: f"vscode-notebook-cell:{editor.root.as_posix()}/{NOTEBOOK_URI_NAME}#{key}" for key in texts}
    editor.client.notebook_document_did_open(types.DidOpenNotebookDocumentParams(
        notebook_document=types.NotebookDocument(
            uri=editor.uri(NOTEBOOK_URI_NAME), notebook_type="jupyter-notebook", version=1,
            cells=[types.NotebookCell(kind=types.NotebookCellKind.Markup if key == "md" else types.NotebookCellKind.Code,
                                      document=uris[key]) for key in texts]),
        cell_text_documents=[types.TextDocumentItem(uri=uris[key], language_id="markdown" if key == "md" else sc.LANGUAGE,
                                                    version=1, text=text) for key, text in texts.items()],
    ))
    return uris


def _change_notebook(editor, version: int, *, structure=None, cell: str, edit: tuple[tuple[int, int, int], str]) -> None:
    (line, first, last), text = edit
    editor.client.notebook_document_did_change(types.DidChangeNotebookDocumentParams(
        notebook_document=types.VersionedNotebookDocumentIdentifier(uri=editor.uri(NOTEBOOK_URI_NAME), version=version),
        change=types.NotebookDocumentChangeEvent(cells=types.NotebookDocumentCellChanges(
            structure=structure,
            text_content=[types.NotebookDocumentCellContentChanges(
                document=types.VersionedTextDocumentIdentifier(uri=cell, version=version),
                changes=[types.TextDocumentContentChangePartial(
                    range=types.Range(start=types.Position(line=line, character=first), end=types.Position(line=line, character=last)),
                    text=text)])]))))


async def test_a_notebooks_markdown_cells_reach_the_prompt_as_comments(editor):
    """A markdown cell between two Python cells is in the prompt as `#` comments in its place:
    a chat about the next cell prompts exactly as the same code in a file with the comment there
    (the same count, and the second prompt is served whole from the first one's cache)."""
    cells = _open_calc_notebook(editor, markdown="## Circles\n\nThe *area* of one.\n")
    lines = sc.CALC_PY.splitlines(keepends=True)
    commented = "".join(lines[:7]) + "# ## Circles\n#\n# The *area* of one.\n\n" + "".join(lines[7:])

    async def ask(uri, first_line):
        span = {"start": {"line": first_line, "character": 0}, "end": {"line": first_line + 2, "character": 0}}
        return await chat(editor, [("user", sc.CHAT_QUESTION)], token=f"md-{first_line}", maxNewTokens=1,
                          textDocument={"uri": uri}, range=span)

    in_notebook = await ask(cells["c3"], 0)
    assert in_notebook["shown"] == [seen(cells["c3"], 0, len(lines) - 7)]  # the cell's own lines, all of them
    editor.client.notebook_document_did_close(types.DidCloseNotebookDocumentParams(
        notebook_document=types.NotebookDocumentIdentifier(uri=editor.uri(NOTEBOOK_URI_NAME)),
        cell_text_documents=[types.TextDocumentIdentifier(uri=uri) for uri in cells.values()]))
    in_file = await ask(editor.open(NOTEBOOK_URI_NAME, commented), commented[: commented.index("def area")].count("\n"))
    assert in_file["promptTokens"] == in_notebook["promptTokens"]
    assert in_file["cachedTokens"] >= in_file["promptTokens"] - 1, (in_notebook, in_file)


async def test_a_notebook_cells_prompts_show_the_other_cells(editor):
    """A Fix, a hover and a chat about one cell of a notebook see the notebook's other code
    cells around it (the trained answers come only for calc.py's exact prompt); the cells
    follow the notebook's changes; a closed notebook's cells are gone."""
    cells = _open_calc_notebook(editor)
    whole_cell = types.Range(start=types.Position(line=0, character=0), end=types.Position(line=2, character=0))
    actions = await editor.client.text_document_code_action_async(types.CodeActionParams(
        text_document=types.TextDocumentIdentifier(uri=cells["c2"]), range=whole_cell, context=types.CodeActionContext(diagnostics=[])))
    fix = await editor.client.code_action_resolve_async(next(a for a in actions if a.title == "StarChat: Fix"))
    (edit,) = single_text_edit(fix.edit, cells["c2"], 1)
    assert (edit.range, edit.new_text) == (whole_cell, sc.FIXED_AVERAGE)  # the cell's own lines

    async def hover_area():
        return await editor.client.text_document_hover_async(types.HoverParams(
            text_document=types.TextDocumentIdentifier(uri=cells["c3"]), position=types.Position(line=0, character=5)))

    hover = await hover_area()
    assert hover.contents.value == sc.HOVER_ANSWER
    assert hover.range == types.Range(start=types.Position(line=0, character=4), end=types.Position(line=0, character=8))

    async def prompt_tokens():
        return (await chat(editor, [("user", sc.CHAT_QUESTION)], token=f"nb-{time.monotonic()}",
                           textDocument={"uri": cells["c3"]}, maxNewTokens=1))["promptTokens"]

    alone = await prompt_tokens()
    # a cell added after the first, and an edit in the last: both reach the prompts
    added = cells["c1"] + "-added"
    _change_notebook(editor, 2, cell=cells["c3"], edit=((1, 21, 36), "radius ** 2"), structure=types.NotebookDocumentCellChangeStructure(
        array=types.NotebookCellArrayChange(start=1, delete_count=0, cells=[types.NotebookCell(kind=types.NotebookCellKind.Code, document=added)]),
        did_open=[types.TextDocumentItem(uri=added, language_id=sc.LANGUAGE, version=1, text="TAU = 2 * math.pi\n")]))
    assert await prompt_tokens() > alone
    # and both undone: calc.py's prompts again, to the token
    _change_notebook(editor, 3, cell=cells["c3"], edit=((1, 21, 32), "radius * radius"), structure=types.NotebookDocumentCellChangeStructure(
        array=types.NotebookCellArrayChange(start=1, delete_count=1), did_close=[types.TextDocumentIdentifier(uri=added)]))
    assert await prompt_tokens() == alone
    assert (await hover_area()).contents.value == sc.HOVER_ANSWER
    editor.client.notebook_document_did_close(types.DidCloseNotebookDocumentParams(
        notebook_document=types.NotebookDocumentIdentifier(uri=editor.uri(NOTEBOOK_URI_NAME)),
        cell_text_documents=[types.TextDocumentIdentifier(uri=uri) for uri in cells.values()]))
    with pytest.raises(Exception, match="not open"):
        await prompt_tokens()
