"""The custom part of the protocol: one method prefix ``starchat/``, commands ``starchat.*``,
typed payloads (camelCase on the wire). docs/protocol.md describes each of them."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

import attrs
import cattrs
from lsprotocol import types
from pygls.exceptions import JsonRpcInvalidParams

from .prompts import Task

CHAT = "starchat/chat"
STATUS = "starchat/status"  # server → client notification

CMD_ASK = "starchat.ask"  # {textDocument, range, question}: answer shown to the user
CMD_EXPLAIN = "starchat.explain"  # {textDocument, range}
CMD_RUN_TASK = "starchat.runTask"  # {textDocument, range, task, version?, diagnostics?}: applies the edit
CMD_EDIT = "starchat.edit"  # {textDocument, range, instruction, mode}: applies the answer's code
CLIENT_ASK_QUESTION = "starchat.askQuestion"  # client-side: asks the user, then calls starchat.ask
CLIENT_EDIT_SELECTION = "starchat.editSelection"  # client-side: asks for an instruction, then calls starchat.edit

ProgressToken = Union[int, str]
EditMode = Literal["replace", "insertAbove", "insertBelow"]


@attrs.define
class ChatMessage:
    role: Literal["user", "assistant"]
    content: str


@attrs.define
class ChatReference:
    """Another open document a conversation shows (its ``range`` only, when given)."""

    text_document: types.TextDocumentIdentifier
    range: Optional[types.Range] = None


@attrs.define
class ChatParams:
    messages: list[ChatMessage]
    text_document: Optional[types.TextDocumentIdentifier] = None
    range: Optional[types.Range] = None
    references: list[ChatReference] = attrs.field(factory=list)
    max_new_tokens: Optional[int] = None
    work_done_token: Optional[ProgressToken] = None
    partial_result_token: Optional[ProgressToken] = None


@attrs.define
class Answer:
    """The result of ``starchat/chat`` and of the ``starchat.ask``/``explain`` commands."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # of prompt_tokens: reused from an earlier request's cache
    shown: list[types.Location] = attrs.field(factory=list)  # the lines of each document the prompt held
    history_dropped: int = 0  # chat: earlier exchanges (user/assistant pairs) left out to fit

    @classmethod
    def of(cls, generation: Any, shown: list[types.Location] = (), history_dropped: int = 0) -> "Answer":
        return cls(generation.text, generation.finish_reason, generation.prompt_tokens, generation.completion_tokens,
                   generation.cached_tokens, list(shown), history_dropped)


@attrs.define
class CodeActionData:
    """Carried from ``textDocument/codeAction`` to ``codeAction/resolve``."""

    uri: str
    range: types.Range
    version: Optional[int]
    task: Task
    diagnostics: list[types.Diagnostic] = attrs.field(factory=list)  # Fix: the editor's problems there


@attrs.define
class SelectionArgs:
    text_document: types.TextDocumentIdentifier
    range: types.Range
    question: str = ""
    task: Optional[Task] = None
    version: Optional[int] = None
    instruction: str = ""
    mode: EditMode = "replace"
    diagnostics: list[types.Diagnostic] = attrs.field(factory=list)  # runTask fix: the editor's problems there
    references: list[ChatReference] = attrs.field(factory=list)  # ask, explain: other files to show


@attrs.define
class StatusParams:
    """``starchat/status``: the engine's state, sent whenever it changes."""

    state: Literal["loading", "ready", "generating", "error"]
    message: str


def structure(converter: cattrs.Converter, value: Any, cls: type) -> Any:
    """Structure a payload or raise InvalidParams naming the fields that are wrong."""
    try:
        return converter.structure(value, cls)
    except Exception as exc:  # cattrs raises several kinds
        details = "; ".join(cattrs.transform_error(exc, path="params")) if isinstance(exc, cattrs.BaseValidationError) else str(exc)
        raise JsonRpcInvalidParams(f"Invalid params for {cls.__name__}: {details}") from None
