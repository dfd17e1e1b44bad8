"""Inline completion (LSP 3.18 ``textDocument/inlineCompletion``): the model's fill-in-the-middle at
the cursor, shown by the editor as ghost text, by the chat model or the completion model
(``completion_model.py``).

Asked for as the user types (trigger kind Automatic): ranked with hovers, below explicit
actions, without progress or status, and a failure (busy, prompt too long, the model still
loading) is an empty answer, not an error at every keystroke. Asked for explicitly (Invoked):
ranked as an explicit action, and a failure is the request's error. The editor cancels a completion the user typed past;
cancelling stops the model before its next step. Typing what the last completion proposed
answers from it, without the model.
"""

from __future__ import annotations

from dataclasses import dataclass

from lsprotocol import types

from ..answers import FillShape
from ..engine import Priority
from ..prompts import PromptTooLong
from ..prompts.fill import FillPrompt, fill_prompt
from ..prompts.requests import prompt_budget
from ..server import RequestFailed, StarChatServer, looks_secret
from ..text import Pos, detect_eol

KEPT = 32  # documents whose last completion is kept for typing through it


@dataclass(frozen=True)
class Proposed:
    """A document's last completion: the prompt's text around the cursor, and what it proposed
    (line breaks as "\n")."""

    before: str
    after: str
    text: str


def typed_through(last: Proposed | None, prompt: FillPrompt) -> str | None:
    """The last completion when asked again at the same place, or its rest when the user has
    since typed its start, with the same code after the cursor; None otherwise."""
    if last is None or prompt.after != last.after or not prompt.before.startswith(last.before):
        return None
    typed = prompt.before[len(last.before) :]
    if typed and (not last.text.startswith(typed) or len(typed) >= len(last.text)):
        return None
    return last.text[len(typed) :]


def register(server: StarChatServer) -> None:
    @server.feature(types.TEXT_DOCUMENT_INLINE_COMPLETION, types.InlineCompletionOptions())
    async def inline_completion(ls: StarChatServer, params: types.InlineCompletionParams) -> types.InlineCompletionList | None:
        if not (await ls.settled_settings()).completion_enabled:
            return None
        uri = params.text_document.uri
        if looks_secret(uri):  # asked at every keystroke: no answer, not an error each time
            return None
        explicit = params.context.trigger_kind == types.InlineCompletionTriggerKind.Invoked
        own = ls.completion_model.ready
        ready = own if own is not None else ls.engine_ready
        if not explicit and (ready is None or not ready.done()):  # no waiting for a model at every keystroke
            return None
        try:
            return await _complete(ls, params, explicit)
        except RequestFailed as failure:
            if explicit:
                raise
            ls.trace(f"StarChat: completion: {failure}")
            return None


async def _complete(ls: StarChatServer, params: types.InlineCompletionParams, explicit: bool) -> types.InlineCompletionList:
    uri = params.text_document.uri
    document = ls.open_document(uri)
    engine, worker = await ls.completion_engine()
    fmt = ls.fill_format(engine)
    if fmt is None:
        raise RequestFailed("The model's tokenizer has no fill-in-the-middle tokens (<fim_prefix>, <fim_suffix>, "
                            "<fim_middle>): it cannot complete at the cursor.")
    settings = ls.settings
    encoding = ls.position_encoding
    text = document.source
    cursor = document.offset_at(Pos(params.position.line, params.position.character), encoding)
    start = end = params.position
    chosen = ""
    selected = params.context.selected_completion_info
    if selected is not None:  # the suggest widget's item: the completion goes on from it
        first, last = (document.offset_at(Pos(p.line, p.character), encoding) for p in (selected.range.start, selected.range.end))
        text, cursor = text[:first] + selected.text + text[last:], first + len(selected.text)
        start, end, chosen = selected.range.start, selected.range.end, selected.text
    source, base = ls.surrounding(uri, text)
    budget = prompt_budget(settings.context_window, engine.context_window, settings.completion_max_new_tokens)
    if settings.completion_context_tokens:
        budget = min(budget, settings.completion_context_tokens)
    try:
        prompt = fill_prompt(fmt, text=source, offset=base + cursor, budget=budget)
    except PromptTooLong as too_long:
        raise RequestFailed(str(too_long)) from None
    shape = FillShape.around(prompt.after)
    proposed = ls.proposed_completions
    completion = typed_through(proposed.get(uri), prompt)
    if completion is None:
        generation = await ls.generate(
            prompt.ids,
            title="StarChat: completion",
            priority=Priority.USER if explicit else Priority.HOVER,
            max_new_tokens=settings.completion_max_new_tokens,
            work_done_token=params.work_done_token,
            until=shape.enough,
            quiet=True,
            engine=(engine, worker),
        )
        completion = shape.text(generation.text, finished=generation.finish_reason == "stop")
        proposed[uri] = Proposed(prompt.before, prompt.after, completion)
        proposed.move_to_end(uri)
        while len(proposed) > KEPT:
            proposed.popitem(last=False)
    if not completion:
        return types.InlineCompletionList(items=[])
    item = types.InlineCompletionItem(insert_text=chosen + completion.replace("\n", detect_eol(text)), range=types.Range(start, end))
    return types.InlineCompletionList(items=[item])
