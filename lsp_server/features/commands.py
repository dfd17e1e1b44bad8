"""workspace/executeCommand: ask about a selection, run a task, put an answer into the text."""

from __future__ import annotations

from typing import Any

from lsprotocol import types

from .. import answers
from ..prompts import Task
from ..protocol import CMD_ASK, CMD_EDIT, CMD_EXPLAIN, CMD_RUN_TASK, Answer, SelectionArgs, structure
from ..server import RequestFailed, StarChatServer
from ..text import detect_eol
from .common import (
    answer_about,
    attached_files,
    answer_for_edit,
    code_indent,
    problems_in,
    proposed_code,
    selection,
    task_edit,
    to_position,
    workspace_edit,
)


def _args(ls: StarChatServer, arguments: tuple[Any, ...]) -> SelectionArgs:
    if len(arguments) != 1:
        raise RequestFailed("StarChat commands take one argument: {textDocument, range, ...}")
    return structure(ls.converter, arguments[0], SelectionArgs)


def _check_version(args: SelectionArgs, sel) -> None:
    """An edit asked for on a version of the document the editor no longer shows is refused."""
    if args.version is not None and sel.version != args.version:
        raise RequestFailed(f"The document changed (version {args.version} → {sel.version}); ask again.")


def _show(ls: StarChatServer, title: str, text: str) -> None:
    """Put the answer in front of the user, unless the client shows answers itself."""
    if not ls.experimental("showsAnswers"):
        ls.show_message(f"{title}\n\n{text}")


async def _apply(ls: StarChatServer, edit: types.WorkspaceEdit, label: str) -> None:
    result = await ls.workspace_apply_edit_async(types.ApplyWorkspaceEditParams(edit=edit, label=label))
    if not result.applied:
        raise RequestFailed(f"The editor did not apply the edit: {result.failure_reason or 'no reason given'}")


def register(server: StarChatServer) -> None:
    async def ask(ls: StarChatServer, task: Task, *arguments: Any) -> Answer:
        args = _args(ls, arguments)
        sel = selection(ls, args.text_document.uri, args.range)
        references = attached_files(ls, args.references, sel.uri)
        generation, shown = await answer_about(ls, sel, task, question=args.question, references=references)
        _show(ls, f"StarChat: {args.question or task.title}", generation.text)
        return Answer.of(generation, shown)

    @server.command(CMD_ASK)
    async def ask_command(ls: StarChatServer, *arguments: Any) -> Answer:
        return await ask(ls, Task.ASK, *arguments)

    @server.command(CMD_EXPLAIN)
    async def explain_command(ls: StarChatServer, *arguments: Any) -> Answer:
        return await ask(ls, Task.EXPLAIN, *arguments)

    @server.command(CMD_RUN_TASK)
    async def run_task(ls: StarChatServer, *arguments: Any) -> Answer:
        args = _args(ls, arguments)
        if args.task is None or not args.task.edits_code:
            raise RequestFailed("starchat.runTask needs task: fix, optimize, document or tests")
        sel = selection(ls, args.text_document.uri, args.range)
        _check_version(args, sel)
        problems = problems_in(ls.open_document(sel.uri), args.diagnostics)  # a Fix's prompt takes them
        generation, sel = await answer_for_edit(ls, sel, args.task, problems=problems)
        await _apply(ls, task_edit(ls, sel, args.task, generation), f"StarChat: {args.task.title}")
        return Answer.of(generation)

    @server.command(CMD_EDIT)
    async def edit(ls: StarChatServer, *arguments: Any) -> Answer:
        """Ask with a free instruction and put the answer's code in place of, above or below the selection."""
        args = _args(ls, arguments)
        if not args.instruction.strip():
            raise RequestFailed("starchat.edit needs an instruction")
        sel = selection(ls, args.text_document.uri, args.range)
        _check_version(args, sel)
        generation, sel = await answer_for_edit(ls, sel, Task.ASK, question=args.instruction)
        if args.mode == "replace":
            edit = task_edit(ls, sel, Task.FIX, generation)
        else:
            eol = detect_eol(sel.text)
            code = answers.fit_code(proposed_code(generation, sel.language), indent=code_indent(sel), first_line_indented=True,
                                    keep_trailing_newline=True, eol=eol, unit=sel.indent_unit)
            span = sel.span
            last = span.end.line - 1 if span.end.character == 0 and span.end.line > span.start.line else span.end.line
            line = span.start.line if args.mode == "insertAbove" else last + 1
            if line < sel.line_count:
                at = types.Position(line=line, character=0)
            else:  # below the last line, which has no line break
                at = to_position(sel.text_end)
                code = eol + code
            edit = workspace_edit(ls, sel.uri, sel.version, [types.TextEdit(range=types.Range(start=at, end=at), new_text=code)])
        await _apply(ls, edit, "StarChat: edit")
        return Answer.of(generation)
