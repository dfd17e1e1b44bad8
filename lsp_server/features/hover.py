"""Hover: a short explanation of the identifier under the pointer, cached per document version and text."""

from __future__ import annotations

from lsprotocol import types

from .. import answers
from ..config import Settings
from ..engine import Priority
from ..prompts import PromptTooLong
from ..prompts.requests import hover_prompt, prompt_budget
from ..server import StarChatServer, looks_secret
from ..text import Pos
from .common import to_range

CACHE_SIZE = 128


def hover_budget(settings: Settings, model_window: int) -> int:
    """The prompt's tokens: the window's less the answer's, at most ``hoverContextTokens``."""
    budget = prompt_budget(settings.context_window, model_window, settings.hover_max_new_tokens)
    return min(budget, settings.hover_context_tokens) if settings.hover_context_tokens else budget


def register(server: StarChatServer) -> None:
    @server.feature(types.TEXT_DOCUMENT_HOVER)
    async def hover(ls: StarChatServer, params: types.HoverParams) -> types.Hover | None:
        if not (await ls.settled_settings()).hover_enabled:
            return None
        uri = params.text_document.uri
        if looks_secret(uri):  # asked whenever the pointer rests: no answer, not an error each time
            return None
        document = ls.open_document(uri)
        position = Pos(params.position.line, params.position.character)
        engine = await ls.ready_engine()
        settings = ls.settings
        source, offset = ls.surrounding(uri, document.source)
        try:
            built = hover_prompt(
                ls.prompt_format(engine),
                system=settings.system_prompt,
                budget=hover_budget(settings, engine.context_window),
                text=source,
                line_start=offset + document.line_start(position.line),
                line=document.line_text(position.line),
                position=position,
                path=ls.relative_path(uri),
                language=document.language_id or "",
                encoding=ls.position_encoding,
            )
        except PromptTooLong:
            return None
        if built is None:
            return None
        prompt, word = built
        # the text's hash too: versions start again at 1 when a file is reopened (after a
        # checkout, say), and the same version may then hold other text
        key = (uri, document.version, word, hash(source))
        if key in ls.hover_cache:
            ls.hover_cache.move_to_end(key)
            return ls.hover_cache[key]
        generation = await ls.generate(
            prompt.ids,
            title="StarChat: hover",
            priority=Priority.HOVER,
            max_new_tokens=settings.hover_max_new_tokens,
            work_done_token=params.work_done_token,
        )
        result = types.Hover(
            contents=types.MarkupContent(kind=types.MarkupKind.Markdown, value=answers.hover_markdown(generation.text)),
            range=to_range(word),
        )
        ls.hover_cache[key] = result
        while len(ls.hover_cache) > CACHE_SIZE:
            ls.hover_cache.popitem(last=False)
        return result
