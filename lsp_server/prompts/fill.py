"""Fill-in-the-middle prompts for inline completion (pure).

StarCoder's format, prefix-suffix-middle: ``<fim_prefix>{before}<fim_suffix>{after}<fim_middle>``;
the model writes what goes at the cursor and ends it with ``<|endoftext|>``. StarChat-beta keeps
StarCoder's vocabulary, so the tokens are there (whether its chat fine-tune kept the skill is not
measured: setting ``completionModel`` names a StarCoder-family base model for completions).

The budget counts the model's own tokens and the final prompt is counted whole, so
``len(ids) <= budget`` always holds. The cursor's line is never cut. The lines after the cursor
get up to ``AFTER_SHARE`` of the room, nearest first; the lines before it the rest (and what the
lines after leave). The text before the cursor comes first in the prompt, so while the user types
consecutive prompts share it and an engine that keeps its cache computes only the cursor's
neighbourhood; in a file too long to fit, its first line is the roundest line number within a
quarter of the lines that fit, so it stays put while the cursor moves on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..text import normalize_eol, split_lines
from .build import _MAX_CHARS_PER_TOKEN, PromptTooLong, _roundest
from .format import text_encoder

FIM_TOKENS = ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")
AFTER_SHARE = 0.25


@dataclass(frozen=True)
class FillFormat:
    encode_text: Callable[[str], list[int]]
    prefix_id: int
    suffix_id: int
    middle_id: int


def fill_format(tokenizer: Any) -> FillFormat | None:
    """StarCoder's fill-in-the-middle tokens in this tokenizer; None when it lacks them."""
    vocab = tokenizer.get_vocab()
    if not all(token in vocab for token in FIM_TOKENS):
        return None
    return FillFormat(text_encoder(tokenizer), *(vocab[token] for token in FIM_TOKENS))


@dataclass(frozen=True)
class FillPrompt:
    ids: list[int]
    before: str  # the text before the cursor that the prompt shows (line breaks as "\n")
    after: str  # the text after it


def fill_prompt(fmt: FillFormat, *, text: str, offset: int, budget: int) -> FillPrompt:
    """The prompt for a completion at ``text[offset]``. Raises :class:`PromptTooLong` when the
    cursor's line alone does not fit."""
    reach = budget * _MAX_CHARS_PER_TOKEN + 4096
    start, end = max(0, offset - reach), min(len(text), offset + reach)
    before_lines = split_lines(normalize_eol(text[start:offset]))
    if start > 0 and len(before_lines) > 1:
        before_lines = before_lines[1:]  # a line cut by the reach
    after_lines = split_lines(normalize_eol(text[offset:end]))
    if end < len(text) and len(after_lines) > 1:
        after_lines = after_lines[:-1]
    line_head, line_rest = before_lines.pop(), after_lines.pop(0)  # the cursor's line, never cut

    def encode(n_before: int, n_after: int) -> list[int]:
        before = "".join(before_lines[len(before_lines) - n_before :]) + line_head
        after = line_rest + "".join(after_lines[:n_after])
        return [fmt.prefix_id, *fmt.encode_text(before), fmt.suffix_id, *fmt.encode_text(after), fmt.middle_id]

    must = len(encode(0, 0))
    if must > budget:
        raise PromptTooLong(must, budget, "The line at the cursor")
    room = budget - must
    costs_after = [len(fmt.encode_text(line)) for line in after_lines]
    n_after, used = _nearest(costs_after, int(room * AFTER_SHARE))
    costs_before = [len(fmt.encode_text(line)) for line in reversed(before_lines)]
    n_before, used_before = _nearest(costs_before, room - used)
    if n_before < len(before_lines):
        # anchor the window's start (see the module's docstring); what it frees goes to the lines after
        first = _line_of(text, offset) - n_before
        quarter = n_before // 4
        if quarter >= 2:
            n_before -= _roundest(first, first + quarter) - first
        used_before = sum(costs_before[:n_before])
    n_after = max(n_after, _nearest(costs_after, room - used_before)[0])
    ids = encode(n_before, n_after)
    while len(ids) > budget:  # per-line counts are estimates: the whole prompt is the truth
        if n_after > 0:
            n_after -= 1
        else:
            n_before -= 1
        ids = encode(n_before, n_after)
    before = "".join(before_lines[len(before_lines) - n_before :]) + line_head
    after = line_rest + "".join(after_lines[:n_after])
    return FillPrompt(ids, before, after)


def _nearest(costs: list[int], room: int) -> tuple[int, int]:
    """How many of the lines (costs nearest first) fit in ``room`` tokens, and their cost."""
    used = 0
    for taken, cost in enumerate(costs):
        if used + cost > room:
            return taken, used
        used += cost
    return len(costs), used


def _line_of(text: str, offset: int) -> int:
    return len(split_lines(text[:offset])) - 1
