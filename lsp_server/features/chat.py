"""starchat/chat: a multi-turn conversation, optionally about a document and with other files
attached, streamed as partial results (``$/progress`` with the request's ``partialResultToken``)."""

from __future__ import annotations

import asyncio
from typing import Any

from lsprotocol import types
from pygls.exceptions import JsonRpcInvalidParams

from ..prompts import Message, PromptTooLong
from ..prompts.requests import chat_prompt, prompt_budget
from ..protocol import CHAT, Answer, ChatParams, structure
from ..server import RequestFailed, StarChatServer
from .common import attached_files, offsets, shown_locations


def register(server: StarChatServer) -> None:
    @server.feature(CHAT)
    async def chat(ls: StarChatServer, raw: Any) -> Answer:
        params: ChatParams = structure(ls.converter, raw, ChatParams)
        if params.max_new_tokens is not None and params.max_new_tokens < 1:
            raise JsonRpcInvalidParams("maxNewTokens must be at least 1.")
        if not params.messages or params.messages[-1].role != "user":
            raise RequestFailed("The last message of a chat must be the user's.")
        source = path = language = uri = about = None
        start = end = 0
        if params.text_document is not None:
            uri = params.text_document.uri
            document = ls.open_document(uri)
            text, path, language = document.source, ls.relative_path(document.uri), document.language_id or ""
            if params.range is not None:
                start, end = offsets(ls, document, params.range)
            source, offset = ls.surrounding(document.uri, text)
            start, end, about = start + offset, end + offset, (uri, document.line_count, source, offset)
        references = attached_files(ls, params.references, uri)
        engine = await ls.ready_engine()
        settings = ls.settings
        max_new_tokens = params.max_new_tokens or settings.max_new_tokens
        try:
            # counted with the tokenizer, files attached included: off the event loop
            prompt = await asyncio.to_thread(
                chat_prompt,
                ls.prompt_format(engine),
                system=settings.system_prompt,
                budget=prompt_budget(settings.context_window, engine.context_window, max_new_tokens),
                messages=[Message(m.role, m.content) for m in params.messages],
                text=source,
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
        return Answer.of(generation, shown_locations(prompt, references, about), prompt.history_dropped)
