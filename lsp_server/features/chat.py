"""starchat/chat: a multi-turn conversation, optionally about a document, streamed as partial
results (``$/progress`` with the request's ``partialResultToken``)."""

from __future__ import annotations

from typing import Any

from lsprotocol import types
from pygls.exceptions import JsonRpcInvalidParams

from ..prompts import Message, PromptTooLong, Reference
from ..prompts.requests import chat_prompt, prompt_budget
from ..protocol import CHAT, Answer, ChatParams, ChatReference, structure
from ..server import RequestFailed, StarChatServer
from .common import to_span

MAX_REFERENCES = 16  # other files one conversation may show


def _selection(ls: StarChatServer, document, range_) -> tuple[int, int]:
    try:
        return document.selection(to_span(range_), ls.position_encoding)
    except ValueError as exc:
        raise RequestFailed(f"Invalid range: {exc}") from None


def _references(ls: StarChatServer, params: ChatParams) -> list[Reference]:
    """The open documents the user attached, in order: each once, the conversation's own
    document only for a part of it."""
    if len(params.references) > MAX_REFERENCES:
        raise JsonRpcInvalidParams(f"A chat may show at most {MAX_REFERENCES} other files.")
    main = params.text_document.uri if params.text_document is not None else None
    seen: set[tuple] = set()
    references = []
    for ref in params.references:
        uri = ref.text_document.uri
        key = (uri, None if ref.range is None else (ref.range.start.line, ref.range.start.character,
                                                     ref.range.end.line, ref.range.end.character))
        if key in seen or (uri == main and ref.range is None):
            continue
        seen.add(key)
        references.append(_reference(ls, ref))
    return references


def _reference(ls: StarChatServer, ref: ChatReference) -> Reference:
    document = ls.open_document(ref.text_document.uri)
    text, path, language = document.source, ls.relative_path(document.uri), document.language_id or ""
    if ref.range is None:
        return Reference(text, path, language)
    start, end = _selection(ls, document, ref.range)
    return Reference(text[start:end], path, language, first_line=text.count("\n", 0, start), whole=False)


def register(server: StarChatServer) -> None:
    @server.feature(CHAT)
    async def chat(ls: StarChatServer, raw: Any) -> Answer:
        params: ChatParams = structure(ls.converter, raw, ChatParams)
        if params.max_new_tokens is not None and params.max_new_tokens < 1:
            raise JsonRpcInvalidParams("maxNewTokens must be at least 1.")
        if not params.messages or params.messages[-1].role != "user":
            raise RequestFailed("The last message of a chat must be the user's.")
        text = path = language = None
        start = end = 0
        if params.text_document is not None:
            document = ls.open_document(params.text_document.uri)
            text, path, language = document.source, ls.relative_path(document.uri), document.language_id or ""
            if params.range is not None:
                start, end = _selection(ls, document, params.range)
            text, offset = ls.surrounding(document.uri, text)
            start, end = start + offset, end + offset
        references = _references(ls, params)
        engine = await ls.ready_engine()
        settings = ls.settings
        max_new_tokens = params.max_new_tokens or settings.max_new_tokens
        try:
            prompt = chat_prompt(
                ls.prompt_format(engine),
                system=settings.system_prompt,
                budget=prompt_budget(settings.context_window, engine.context_window, max_new_tokens),
                messages=[Message(m.role, m.content) for m in params.messages],
                text=text,
                start=start,
                end=end,
                path=path or "",
                language=language or "",
                references=references,
            )
        except (PromptTooLong, ValueError) as exc:
            raise RequestFailed(str(exc)) from None

        def send(delta: str) -> None:
            if params.partial_result_token is not None:
                ls.protocol.notify(types.PROGRESS, types.ProgressParams(token=params.partial_result_token, value={"delta": delta}))

        generation = await ls.generate(
            prompt.ids,
            title="StarChat: chat",
            max_new_tokens=max_new_tokens,
            work_done_token=params.work_done_token,
            on_text=send,
        )
        return Answer.of(generation)
