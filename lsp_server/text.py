"""Text and position arithmetic as LSP defines it (pure, no pygls).

LSP breaks lines only at ``\\n``, ``\\r\\n`` and ``\\r`` (``str.splitlines`` also breaks at
``\\f``, ``\\x85``, U+2028 and others, which would shift every line number after them).
Columns count code units of the negotiated position encoding: UTF-16 by default, UTF-8 or
UTF-32 when both sides agree.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

_LINE_BREAK = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True, order=True)
class Pos:
    line: int
    character: int


@dataclass(frozen=True)
class Span:
    """A range of a document, in the client's position encoding."""

    start: Pos
    end: Pos

    @property
    def is_empty(self) -> bool:
        return self.start == self.end


def split_lines(text: str) -> list[str]:
    """Split at LSP line breaks, keeping them; a trailing break starts a last empty line.

    ``"a\\nb"`` → ``["a\\n", "b"]``; ``"a\\n"`` → ``["a\\n", ""]``; ``""`` → ``[""]``.
    """
    lines: list[str] = []
    start = 0
    for match in _LINE_BREAK.finditer(text):
        lines.append(text[start : match.end()])
        start = match.end()
    lines.append(text[start:])
    return lines


def line_of(text: str, offset: int) -> int:
    """The 0-based line of ``text`` that ``offset`` is on."""
    return sum(1 for _ in _LINE_BREAK.finditer(text, 0, offset))


def line_count(text: str) -> int:
    """How many lines ``text`` has, not counting the empty one after a last line break."""
    return line_of(text, len(text)) + (1 if text and not text.endswith(("\n", "\r")) else 0)


def strip_eol(line: str) -> str:
    return line.rstrip("\r\n") if line.endswith(("\n", "\r")) else line


def detect_eol(text: str) -> str:
    """The document's first line break, ``\\n`` when it has none."""
    match = _LINE_BREAK.search(text)
    return match.group(0) if match else "\n"


def normalize_eol(text: str) -> str:
    return _LINE_BREAK.sub("\n", text)


def _units(char: str, encoding: str) -> int:
    if encoding == "utf-16":
        return 2 if ord(char) > 0xFFFF else 1
    if encoding == "utf-8":
        return len(char.encode("utf-8"))
    return 1


def column_to_index(line: str, character: int, encoding: str = "utf-16") -> int:
    """Python index in ``line`` (without its break) of an LSP column, clamped to the line's end.

    A column that falls inside a character (half a surrogate pair) moves to that character's end.
    """
    units = 0
    for index, char in enumerate(line):
        if units >= character:
            return index
        units += _units(char, encoding)
    return len(line)


def index_to_column(line: str, index: int, encoding: str = "utf-16") -> int:
    return sum(_units(char, encoding) for char in line[:index])


def offset_at(lines: list[str], pos: Pos, encoding: str = "utf-16") -> int:
    """String offset of ``pos``; past the last line → end of text, past a line's end → its end."""
    if pos.line < 0 or pos.character < 0:
        raise ValueError(f"negative position {pos.line}:{pos.character}")
    if pos.line >= len(lines):
        return sum(len(line) for line in lines)
    before = sum(len(line) for line in lines[: pos.line])
    return before + column_to_index(strip_eol(lines[pos.line]), pos.character, encoding)


def position_at(lines: list[str], offset: int, encoding: str = "utf-16") -> Pos:
    for number, line in enumerate(lines):
        if offset <= len(strip_eol(line)) or number == len(lines) - 1:
            return Pos(number, index_to_column(line, min(offset, len(strip_eol(line))), encoding))
        offset -= len(line)
    return Pos(0, 0)  # pragma: no cover - lines is never empty


def indentation_of(line: str) -> str:
    return line[: len(line) - len(line.lstrip(" \t"))]


SPACE_STEPS = (2, 3, 4, 8)


def indent_unit(text: str) -> str | None:
    """One level of ``text``'s indentation: a tab, or 2, 3, 4 or 8 spaces; None when no line is
    indented or the steps say nothing clear. Guessed as editors guess it: lines indented with
    tabs against lines indented with spaces, then the most common of the steps 2, 3, 4 and 8 by
    which a line is indented deeper than the non-blank line before it (continuation lines
    aligned under a bracket make other steps, which do not count)."""
    tabs = spaces = 0
    steps: Counter[int] = Counter()
    previous = 0
    for line in _LINE_BREAK.split(text):
        if not line.strip():
            continue
        lead = indentation_of(line)
        if lead.startswith("\t"):
            tabs += 1
            previous = -1  # a tab's width is the reader's: no step from or to it
            continue
        if lead:
            spaces += 1
        width = len(lead) if "\t" not in lead else -1
        if width > previous >= 0:
            steps[width - previous] += 1
        previous = width
    if tabs > spaces:
        return "\t"
    counted = [(steps[step], -step) for step in SPACE_STEPS if steps[step]]
    return " " * -max(counted)[1] if counted else None  # a tie goes to the smaller step


def convert_indentation(lines: list[str], source: str | None, target: str | None) -> list[str]:
    """``lines`` indented by ``source`` levels re-indented by ``target`` levels; spaces past the
    last whole level (alignment under a bracket) stay as they are."""
    if not source or not target or source == target:
        return lines
    out = []
    for line in lines:
        lead = indentation_of(line)
        if source == "\t":
            levels = len(lead) - len(lead.lstrip("\t"))
            rest = lead[levels:]
        else:
            levels, extra = divmod(len(lead.expandtabs(len(source))), len(source))
            rest = " " * extra
        out.append(target * levels + rest + line[len(lead) :])
    return out


def word_at(line: str, index: int) -> tuple[int, int] | None:
    """Start and end index of the identifier under ``index`` in ``line``, if any."""
    for match in re.finditer(r"[A-Za-z_$][\w$]*", line):
        if match.start() <= index <= match.end():
            return match.start(), match.end()
    return None
