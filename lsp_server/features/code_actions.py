"""Code actions: listing is instant; the model runs in codeAction/resolve."""

from __future__ import annotations

from lsprotocol import types
from pygls.exceptions import JsonRpcContentModified

from ..prompts import Task
from ..protocol import CLIENT_ASK_QUESTION, CLIENT_EDIT_SELECTION, CMD_EXPLAIN, CMD_RUN_TASK, CodeActionData, SelectionArgs, structure
from ..server import StarChatServer, looks_secret
from .common import answer_for_edit, problems_in, selection, task_edit

KINDS = {
    Task.FIX: "quickfix.starchat.fix",
    Task.OPTIMIZE: "refactor.rewrite.starchat.optimize",
    Task.DOCUMENT: "refactor.rewrite.starchat.document",
    Task.TESTS: "refactor.starchat.tests",
    Task.EXPLAIN: "starchat.explain",
    Task.ASK: "starchat.ask",
}
EDIT_KIND = "refactor.rewrite.starchat.edit"  # Edit…: an instruction the client asks the user for
OPTIONS = types.CodeActionOptions(code_action_kinds=sorted({*KINDS.values(), EDIT_KIND}), resolve_provider=True)
EDIT_TASKS = (Task.FIX, Task.OPTIMIZE, Task.DOCUMENT, Task.TESTS)


def _resolves_edits(server: StarChatServer) -> bool:
    document = server.client_capabilities.text_document
    code_action = document.code_action if document else None
    support = code_action.resolve_support if code_action else None
    return bool(support and "edit" in support.properties)


def _unasked(params: types.CodeActionParams) -> bool:
    """Listed by the editor on its own (VS Code asks at every cursor move, for its light bulb)
    with nothing selected: offering every action there would put a light bulb on every line."""
    empty = params.range.start == params.range.end
    return empty and params.context.trigger_kind == types.CodeActionTriggerKind.Automatic


def _wanted(kind: str, only: list[str] | None) -> bool:
    return not only or any(kind == base or kind.startswith(base + ".") for base in only)


def register(server: StarChatServer) -> None:
    @server.feature(types.TEXT_DOCUMENT_CODE_ACTION, OPTIONS)
    def code_actions(ls: StarChatServer, params: types.CodeActionParams) -> list[types.CodeAction]:
        uri = params.text_document.uri
        if looks_secret(uri):  # asked on every cursor move: nothing to offer, not an error each time
            return []
        document = ls.open_document(uri)
        only = params.context.only
        diagnostics = params.context.diagnostics
        if _unasked(params):
            if not diagnostics or not _wanted(KINDS[Task.FIX], only):
                return []
            only = [KINDS[Task.FIX]]  # the quick fix for the problems there, nothing else
        args = SelectionArgs(text_document=params.text_document, range=params.range, version=document.version)
        actions = []
        for task in EDIT_TASKS:
            if not _wanted(KINDS[task], only):
                continue
            action = types.CodeAction(title=f"StarChat: {task.title}", kind=KINDS[task])
            fixes = diagnostics if task is Task.FIX else []
            if fixes:  # the fix for these: the editor lists it with them
                action.diagnostics = fixes
            if _resolves_edits(ls):
                action.data = ls.converter.unstructure(CodeActionData(uri, params.range, document.version, task, fixes))
            else:  # the edit arrives through workspace/applyEdit instead
                payload = ls.converter.unstructure(
                    SelectionArgs(params.text_document, params.range, task=task, version=document.version, diagnostics=fixes))
                action.command = types.Command(title=action.title, command=CMD_RUN_TASK, arguments=[payload])
            actions.append(action)
        if _wanted(KINDS[Task.EXPLAIN], only):
            actions.append(
                types.CodeAction(
                    title="StarChat: Explain",
                    kind=KINDS[Task.EXPLAIN],
                    command=types.Command(title="StarChat: Explain", command=CMD_EXPLAIN, arguments=[ls.converter.unstructure(args)]),
                )
            )
        # Ask and Edit need a question or an instruction from the user, which only the client can
        # ask for: commands the client implements, offered when it says it does.
        for title, kind, command, flag in (("StarChat: Ask…", KINDS[Task.ASK], CLIENT_ASK_QUESTION, "askQuestion"),
                                           ("StarChat: Edit…", EDIT_KIND, CLIENT_EDIT_SELECTION, "editSelection")):
            if _wanted(kind, only) and ls.experimental(flag):
                actions.append(types.CodeAction(
                    title=title, kind=kind, command=types.Command(title=title, command=command, arguments=[ls.converter.unstructure(args)])))
        return actions

    @server.feature(types.CODE_ACTION_RESOLVE)
    async def resolve(ls: StarChatServer, action: types.CodeAction) -> types.CodeAction:
        if action.data is None:
            return action
        data: CodeActionData = structure(ls.converter, action.data, CodeActionData)
        sel = selection(ls, data.uri, data.range)
        if data.version is not None and sel.version != data.version:
            raise JsonRpcContentModified(
                f"The document changed (version {data.version} → {sel.version}) since the action was offered; ask again."
            )
        problems = problems_in(ls.open_document(data.uri), data.diagnostics)
        generation, sel = await answer_for_edit(ls, sel, data.task, problems=problems, changed=JsonRpcContentModified)
        action.edit = task_edit(ls, sel, data.task, generation)
        return action

