"""Turn a request into prompt ids that fit an exact token budget (pure).

The user turn holds the file's path and language, the file itself (the whole file when it
fits, else as many lines around the selection as fit: nearest lines first on both sides, so the
farthest are the ones left out), the selection again (an empty selected line, where an edit at
the cursor writes its code: the line above it that holds code), and the task last. That order makes the
prompts of different requests on the same document version start alike (system prompt, path,
file), so an engine that keeps the KV of a prompt prefix computes the file once: a hover, then
a Fix, then an Explain of another function in the same file only prefill what follows it. The
window does not depend on the task either (a question up to ``QUESTION_ROOM`` tokens leaves it
as it is), so two tasks on the same selection in a long file share everything up to the task.
In a file too long to fit, a conversation's window starts where its first turn's did and, from
the second turn, leaves ``HISTORY_ROOM`` tokens (doubled as needed; past half the room, grown by
``HISTORY_ROOM`` or an eighth of the room at a time) to the later turns, so it does not move at
every turn.

Other files the user attached to a conversation (:class:`Reference`) follow the file, before the
selection, each under its own path: whole when it fits, else its first lines that fit (its label
says which). They get what the bare prompt leaves, in the order attached: all of it in a
conversation about no document, half of it beside a document (the document's window gets the
rest, and what they leave). From a conversation's second turn they get what they got at its
first less the room kept for the later turns (as the window does), so they are cut the same from
turn to turn, not a little more at every turn. The file still comes first, so a chat with
attached files starts like the code actions on the same document version.

Counts come from the model's own tokenizer and the final prompt is re-counted whole, so
``len(prompt.ids) <= budget`` always holds. The selection is never cut: if it alone does not
fit, :class:`PromptTooLong` says by how much.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

from ..text import line_of, normalize_eol, split_lines
from .format import Message, PromptFormat


_MAX_CHARS_PER_TOKEN = 32  # generous: code averages 3-4 characters per token
QUESTION_ROOM = 128  # tokens of the question the window leaves room for whatever the question is
HISTORY_ROOM = 1024  # tokens of a conversation's later turns its window leaves room for (doubled as they grow)


class PromptTooLong(ValueError):
    def __init__(self, needed: int, budget: int, what: str = "The selection and the instructions"):
        self.needed = needed
        self.budget = budget
        super().__init__(
            f"{what} take {needed:,} tokens, but the prompt may use at most {budget:,} tokens "
            "(the context window minus the tokens kept for the answer). Select less code, "
            "or raise contextWindow / lower maxNewTokens."
        )


@dataclass(frozen=True)
class CodeContext:
    """A document and a selection inside it (string offsets into ``text``)."""

    text: str
    start: int
    end: int
    language: str = ""
    path: str = ""


@dataclass(frozen=True)
class Reference:
    """Another file shown in a conversation: ``text`` is all of it, or the part asked for, which
    starts on line ``first_line`` (0-based) of the file."""

    text: str
    path: str = ""
    language: str = ""
    first_line: int = 0
    whole: bool = True  # ``text`` is the whole file (its label names no lines then)
    uri: str = ""  # where it came from: for the client, never shown to the model


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    messages: list[Message]
    lines_before: int = 0
    lines_after: int = 0
    history_dropped: int = 0
    extra: dict = field(default_factory=dict)
    whole_file: bool = True  # the context's whole file is in it (always, without a context)
    reference_lines: tuple[int, ...] = ()  # lines of each reference shown (all of them, or the first ones)
    context_lines: tuple[int, int] | None = None  # the context's lines shown, [first, last + 1), 0-based


def build_prompt(
    fmt: PromptFormat,
    *,
    system: str,
    history: Sequence[Message],
    budget: int,
    context: CodeContext | None = None,
    references: Sequence[Reference] = (),
) -> Prompt:
    """``history`` ends with the user's message. ``context`` and ``references`` go into the
    first user message kept: a conversation is about them, and a follow-up's prompt then starts
    with the previous prompt and its answer, which an engine that keeps its cache does not
    compute again."""
    if not history or history[-1].role != "user":
        raise ValueError("the conversation must end with a user message")
    earlier, question = list(history[:-1]), history[-1].content

    if context is None:
        before_lines: list[str] = []
        after_lines: list[str] = []
    else:
        # Only text near the selection can fit: never split a whole large file.
        reach = budget * _MAX_CHARS_PER_TOKEN + 4096
        reach_start = max(0, context.start - reach)
        before_lines = _lines(context.text[reach_start : context.start])
        if reach_start > 0 and before_lines:
            before_lines = before_lines[1:]  # a line cut by the window
        reach_end = min(len(context.text), context.end + reach)
        after_lines = _lines(context.text[context.end : reach_end])
        if reach_end < len(context.text) and after_lines:
            after_lines = after_lines[:-1]
        selection = normalize_eol(context.text[context.start : context.end])

    shown: list[str] = []  # the references' blocks, as they go into the prompt

    def dialogue(before: list[str], after: list[str], window: bool = False, later: bool = True) -> list[Message]:
        """The prompt's messages (``later=False``: up to the one with the document only)."""
        turns = [*earlier, Message("user", question)]
        at = next(i for i, turn in enumerate(turns) if turn.role == "user")
        if context is not None:
            turns[at] = Message("user", _code_turn(turns[at].content, context, selection, before, after, window, shown))
        elif shown:
            turns[at] = Message("user", "\n\n".join([*shown, turns[at].content]))
        return [Message("system", system), *(turns if later else turns[: at + 1])]

    # Old turns go first when even the bare question does not fit.
    dropped = 0
    while True:
        base = fmt.encode_dialogue(dialogue([], []))
        if len(base) <= budget or not earlier:
            break
        earlier = earlier[2:] if len(earlier) > 1 else []
        dropped += 1
    if len(base) > budget:
        raise PromptTooLong(len(base), budget)
    first_question = next(turn.content for turn in [*earlier, Message("user", question)] if turn.role == "user")
    free = budget - len(base) - _question_room(fmt, question)  # for the attached files (and the window)
    if earlier and references:
        # A follow-up: the files get what they got at the first turn less the room kept for the
        # later turns (HISTORY_ROOM doubled as they grow, as the window's), so they are cut the
        # same from turn to turn instead of a little more at every turn (which would change the
        # prompt from there on, and the engine would compute all the history again).
        first_turn = len(fmt.encode_dialogue(dialogue([], [], later=False)))
        first_free = budget - first_turn - _question_room(fmt, first_question)
        later_turns = len(base) + _question_room(fmt, question) - first_turn
        free = min(free, first_free - _reserve(later_turns, first_free))
    reference_lines = _attach(fmt, references, shown, lambda: len(fmt.encode_dialogue(dialogue([], []))), free,
                              context is not None)
    base = fmt.encode_dialogue(dialogue([], []))

    def count(n_before: int, n_after: int) -> list[int]:
        before = before_lines[len(before_lines) - n_before :] if n_before else []
        return fmt.encode_dialogue(dialogue(before, after_lines[:n_after]))

    # The lines get what the question leaves, as if it were QUESTION_ROOM tokens long when it is
    # shorter (so the window is the same for every task), less the window's own cost (its fences
    # and the selection shown in it), paid once.
    window_cost = len(fmt.encode_dialogue(dialogue([], [], True))) - len(base)
    question_room = _question_room(fmt, question)
    room = budget - len(base) - question_room - window_cost
    n_before, n_after = _window(fmt, context, before_lines, after_lines, room)
    if earlier and (n_before < len(before_lines) or n_after < len(after_lines)):
        # A conversation about a file too long to fit: the window starts where the first turn's
        # did (and the code actions') and ends where it leaves room for the later turns,
        # HISTORY_ROOM tokens doubled as they outgrow it. From one turn to the next it stays
        # the same, or loses lines at its end when the reserve doubles, so the next prompt
        # starts with the last one (which the engine holds), or with all of it up to the
        # window's new end, instead of the window moving at every turn. Once the later turns
        # need more than half the room, the reserve grows by a step at a time instead
        # (HISTORY_ROOM, or an eighth of the room in a small budget): the window still stays
        # put for the turns that fit in each step.
        first_turn = len(fmt.encode_dialogue(dialogue([], [], later=False)))
        first_room = budget - first_turn - _question_room(fmt, first_question) - window_cost
        shared = budget - first_turn - window_cost  # for the window and the later turns
        kept = shared - _reserve(len(base) + question_room - first_turn, shared)
        if kept > 0:
            n_before = _window(fmt, context, before_lines, after_lines, first_room)[0]
            after = _after(fmt, before_lines, after_lines, n_before, kept)
            if after is None:  # the first turn's lines before the selection alone do not fit
                n_before, n_after = _window(fmt, context, before_lines, after_lines, kept)
            else:
                n_after = after
    ids = count(n_before, n_after)
    # The per-line counts are estimates (a line's tokens can merge with its neighbours');
    # the whole prompt is the truth, so drop the farthest line until it fits.
    while len(ids) > budget:
        if n_before > n_after:
            n_before -= 1
        else:
            n_after -= 1
        ids = count(n_before, n_after)
    before = before_lines[len(before_lines) - n_before :] if n_before else []
    messages = dialogue(before, after_lines[:n_after])
    whole = context is None or (reach_start == 0 and reach_end == len(context.text)
                                and n_before == len(before_lines) and n_after == len(after_lines))
    lines = None if context is None else _shown_lines(context, before_lines, n_before, n_after)
    return Prompt(ids, messages, n_before, n_after, dropped, whole_file=whole, reference_lines=reference_lines,
                  context_lines=lines)


def _reserve(later_turns: int, shared: int) -> int:
    """The room kept for a conversation's later turns (``later_turns`` tokens now) out of the
    ``shared`` tokens they share with the document's window or the attached files: HISTORY_ROOM, doubled until it
    holds them; once that is more than half of ``shared``, grown by a step at a time instead
    (HISTORY_ROOM, or an eighth of ``shared`` when it is small). Never less than ``later_turns``,
    and the same for every turn that fits in it."""
    reserve = HISTORY_ROOM
    while reserve < later_turns:
        reserve *= 2
    if 2 * reserve > shared:
        step = max(1, min(HISTORY_ROOM, shared // 8))
        reserve = -(-later_turns // step) * step
    return reserve


def _shown_lines(ctx: CodeContext, before_lines: list[str], n_before: int, n_after: int) -> tuple[int, int]:
    """The lines of ``ctx.text`` a prompt shows: ``n_before`` lines before the selection (the
    last of ``before_lines`` is the start of its first line when it starts mid-line), the
    selection's, and ``n_after`` after it (the first of them the rest of its last line when it
    ends mid-line)."""
    partial = bool(before_lines) and not before_lines[-1].endswith("\n")
    first = line_of(ctx.text, ctx.start) - max(0, n_before - partial)
    last = line_of(ctx.text, ctx.end)  # the line the selection ends on, or the one after it
    if ctx.end == 0 or ctx.text[ctx.end - 1] in "\r\n" or (ctx.start == ctx.end and not n_before and not n_after):
        return first, last + n_after
    return first, last + max(1, n_after)


def _attach(fmt, references: Sequence[Reference], shown: list[str], size, free: int, beside: bool) -> tuple[int, ...]:
    """Put the references' blocks into ``shown`` (which the prompt's first user turn holds;
    ``size()`` counts the prompt's tokens with it as it is), each whole or cut to its first lines,
    within ``free`` tokens, or half of them ``beside`` a document; the lines each shows."""
    if not references:
        return ()
    start = size()
    room = free // 2 if beside else free
    counts = []
    for ref in references:
        lines = _lines(ref.text) if ref.text else []

        def cost(n: int) -> int:
            shown.append(_reference_block(ref, lines, n))
            try:
                return size() - start
            finally:
                shown.pop()

        # Line by line up to the room (only the lines that can fit are counted), then the whole
        # prompt, the truth: a line's tokens can merge with its neighbours'.
        n, used = 0, cost(0)
        while n < len(lines) and used + (line := len(fmt.encode_text(lines[n]))) <= room:
            used, n = used + line, n + 1
        while n and cost(n) > room:
            n -= 1
        if (n or not lines) and cost(n) <= room:
            shown.append(_reference_block(ref, lines, n))
        else:
            n = 0  # left out: not even its first line fits
        counts.append(n)
    return tuple(counts)


def _reference_block(ref: Reference, lines: list[str], n: int) -> str:
    """``File: `path` (language)``, with ``, lines a-b`` for a part (``of c``: the first ``n``
    of the file's lines), then those lines in a code block."""
    label = f"File: `{ref.path}`" if ref.path else "File"
    if ref.language:
        label += f" ({ref.language})"
    if lines and (not ref.whole or n < len(lines)):
        label += f", lines {ref.first_line + 1}-{ref.first_line + n}"
        if ref.whole:
            label += f" of {len(lines)}"
    return label + "\n\n" + _fence(ref.language, "".join(lines[:n]))


def _question_room(fmt, question: str) -> int:
    """The room a question shorter than QUESTION_ROOM tokens leaves unused (kept from the window)."""
    return max(0, QUESTION_ROOM - len(fmt.encode_text(question)))


def _fill(fmt, before_lines, after_lines, room) -> tuple[int, int]:
    """How many lines before and after fit in ``room`` tokens, nearest first, alternating."""
    taken = {"before": 0, "after": 0}
    open_sides = {side for side, lines in (("before", before_lines), ("after", after_lines)) if _has_text(lines)}
    used = 0
    while open_sides:
        for side in ("before", "after"):
            if side not in open_sides:
                continue
            lines = before_lines if side == "before" else after_lines
            n = taken[side]
            if n >= len(lines):
                open_sides.discard(side)
                continue
            line = lines[len(lines) - 1 - n] if side == "before" else lines[n]
            cost = len(fmt.encode_text(line))
            if used + cost > room:
                open_sides.discard(side)
                continue
            used += cost
            taken[side] = n + 1
    return taken["before"], taken["after"]


def _anchor(fmt, ctx: CodeContext, before_lines, after_lines, n_before: int, n_after: int, room: int) -> tuple[int, int]:
    """For a file too long to fit: the centred window (``n_before`` and ``n_after`` lines)
    moved back by at most a quarter of its lines to start on the roundest line number there
    (the multiple of the highest power of two), then as many lines after the selection as fit.
    Requests on nearby selections (hovers along a function) then get windows that start on
    the same line, so their prompts differ only from the window's last lines on, and an
    engine reuses its cache for the rest. Moved forward instead when the lines before would
    not fit (near the end of the file)."""
    quarter = (n_before + n_after) // 4
    if quarter < 2:
        return n_before, n_after
    partial = bool(before_lines) and not before_lines[-1].endswith("\n")  # the selection starts mid-line
    first = ctx.text.count("\n", 0, ctx.start) - max(0, n_before - partial)  # the window's first line in the file
    for start in (_roundest(first - quarter, first), _roundest(first, first + quarter)):
        n = max(0, min(len(before_lines), n_before + first - start))
        after = _after(fmt, before_lines, after_lines, n, room)
        if after is not None:
            break
    return n, after or 0


def _window(fmt, ctx: CodeContext | None, before_lines, after_lines, room: int) -> tuple[int, int]:
    """The lines before and after the selection for ``room`` tokens: all of them when they
    fit, else the anchored window (:func:`_anchor`)."""
    n_before, n_after = _fill(fmt, before_lines, after_lines, room)
    if ctx is not None and (n_before < len(before_lines) or n_after < len(after_lines)):
        n_before, n_after = _anchor(fmt, ctx, before_lines, after_lines, n_before, n_after, room)
    return n_before, n_after


def _after(fmt, before_lines, after_lines, n_before: int, room: int) -> int | None:
    """How many lines after the selection fit in ``room`` tokens beside the ``n_before`` lines
    before it; None when those alone do not fit."""
    used = sum(len(fmt.encode_text(line)) for line in before_lines[len(before_lines) - n_before :])
    if used > room:
        return None
    taken = 0
    for line in after_lines:
        used += len(fmt.encode_text(line))
        if used > room:
            break
        taken += 1
    return taken


def _roundest(low: int, high: int) -> int:
    """The number in [low, high] (high >= 0) with the most trailing zero bits; 0 if it is in."""
    for k in range(max(high, 1).bit_length(), -1, -1):
        if (multiple := (high >> k) << k) >= low:
            return multiple
    return high


def _lines(text: str) -> list[str]:
    lines = split_lines(normalize_eol(text))
    return lines[:-1] if lines[-1] == "" else lines


def _has_text(lines: list[str]) -> bool:
    return any(line.strip() for line in lines)


def _fence(language: str, code: str) -> str:
    """A Markdown code block around ``code``, its fence longer than any backtick run inside
    (a Markdown file or a docstring with an example block would otherwise end it early)."""
    if not code.endswith("\n"):
        code += "\n"
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", code)), default=0))
    return f"{fence}{language}\n{code}{fence}"


def _code_turn(question: str, ctx: CodeContext, selection: str, before: list[str], after: list[str],
               window: bool = False, references: Sequence[str] = ()) -> str:
    """Where, the file (lines around the selection, the selection in place; left out when it
    would show the selection only, unless ``window``), the other files' blocks, the selection
    (for an empty line, the line above it that holds code), then the question."""
    lang = ctx.language
    if ctx.path:
        where = f"File: `{ctx.path}`" + (f" ({lang})" if lang else "")
    else:
        where = f"Language: {lang}" if lang else ""
    parts = [where] if where else []
    around = "".join(before) + "".join(after)
    if window or around.strip():
        parts.append(_fence(lang, "".join(before) + selection + "".join(after)))
    parts.extend(references)
    if selection.strip():
        parts.append("Selected code:\n" + _fence(lang, selection))
    elif selection:  # an empty line (an edit at the cursor there): where its code goes
        parts.append(_empty_line_note(ctx))
    parts.append(question)
    return "\n\n".join(parts)


def _empty_line_note(ctx: CodeContext) -> str:
    """Where an empty selected line is: after the nearest line above it that holds code (shown,
    as the file's lines are not numbered), or at the start of the file."""
    end = ctx.start
    while end > 0:
        begin = ctx.text.rfind("\n", 0, end - 1) + 1
        if (line := normalize_eol(ctx.text[begin:end])).strip():
            return "The selected line is empty; it comes after this one:\n" + _fence(ctx.language, line)
        end = begin
    return "The selected line is empty, before any code of the file."
