"""From what an editor sends (text, range, task) to a prompt: shared by the LSP features, the
``ask`` command line and the test model's builder, so all three prompt the model identically."""

from __future__ import annotations

from typing import Sequence

from ..documents import Document
from ..text import Pos, Span, column_to_index, index_to_column, word_at
from ..engine.base import common_prefix
from .build import CodeContext, Prompt, PromptTooLong, Reference, build_prompt
from .format import Message, PromptFormat
from .keywords import is_keyword
from .tasks import Task, instruction


def prompt_budget(context_window: int, model_window: int, max_new_tokens: int) -> int:
    """Tokens the prompt may use: the window (the setting, capped by the model's) minus the answer."""
    window = min(context_window, model_window) if context_window else model_window
    return max(window - max_new_tokens, 0)


def selection_offsets(text: str, span: Span, encoding: str = "utf-16") -> tuple[int, int]:
    """String offsets of ``span`` in ``text``; an empty span means the whole line under the cursor."""
    return Document("", text).selection(span, encoding)


def code_prompt(
    fmt: PromptFormat,
    *,
    system: str,
    budget: int,
    text: str,
    start: int,
    end: int,
    task: Task,
    question: str = "",
    path: str = "",
    language: str = "",
    problems: Sequence[str] = (),
    references: Sequence[Reference] = (),
) -> Prompt:
    """The selection is ``text[start:end]`` (see :func:`selection_offsets`); ``problems``: the
    editor's diagnostics there, for a Fix; ``references``: other files to show."""
    context = CodeContext(text, start, end, language, path)
    turn = instruction(task, question, problems=problems)
    return build_prompt(fmt, system=system, history=[Message("user", turn)], budget=budget, context=context,
                        references=references)


def hover_prompt(
    fmt: PromptFormat,
    *,
    system: str,
    budget: int,
    text: str,
    line_start: int,
    line: str,
    position: Pos,
    path: str = "",
    language: str = "",
    encoding: str = "utf-16",
) -> tuple[Prompt, Span] | None:
    """Explain the identifier under ``position`` (on ``line``, which starts at ``line_start`` in
    ``text`` and has no line break) within its line; ``None`` off an identifier or on one of
    the language's keywords."""
    found = word_at(line, column_to_index(line, position.character, encoding))
    if found is None:
        return None
    symbol = line[found[0] : found[1]]
    if is_keyword(symbol, language):
        return None
    context = CodeContext(text, line_start, line_start + len(line), language, path)
    turn = instruction(Task.HOVER, symbol=symbol)
    prompt = build_prompt(fmt, system=system, history=[Message("user", turn)], budget=budget, context=context)
    word_span = Span(
        Pos(position.line, index_to_column(line, found[0], encoding)),
        Pos(position.line, index_to_column(line, found[1], encoding)),
    )
    return prompt, word_span


def document_prefix(
    fmt: PromptFormat,
    *,
    system: str,
    budget: int,
    text: str,
    path: str = "",
    language: str = "",
) -> list[int]:
    """The tokens every prompt about ``text`` starts with (a code action's, a chat's about it,
    a hover's when the file fits its budget too): the system prompt, the file's path and the
    whole file, when the file fits in ``budget`` beside a short question; [] when it does not
    (each request's window of it is then its own). For speculative work: an engine that holds
    these tokens' KV computes only each request's own part."""
    try:  # a question up to QUESTION_ROOM tokens leaves the file as it is
        prompt = chat_prompt(fmt, system=system, budget=budget, messages=[Message("user", "Why?")], text=text,
                             path=path, language=language)
    except PromptTooLong:
        return []
    if not prompt.whole_file:
        return []
    *head, turn = prompt.messages
    before_question = turn.content.removesuffix("Why?")
    shared = prompt.ids
    for question in ("How?", " How?", "\nHow?", "\tHow?"):  # what follows the file may merge with its end
        ids = fmt.encode_dialogue([*head, Message("user", before_question + question)])
        shared = shared[: common_prefix(shared, ids)]
    return shared


def chat_prompt(
    fmt: PromptFormat,
    *,
    system: str,
    budget: int,
    messages: Sequence[Message],
    text: str | None = None,
    start: int = 0,
    end: int = 0,
    path: str = "",
    language: str = "",
    references: Sequence[Reference] = (),
) -> Prompt:
    """``text[start:end]`` is the selection; without one (0, 0) the file is context around an
    empty selection at its start. ``references``: other files the user attached."""
    context = None
    if text is not None:
        context = CodeContext(text, start, end, language, path)
    return build_prompt(fmt, system=system, history=list(messages), budget=budget, context=context,
                        references=references)
