"""Open documents, kept as the editor sent them, with incremental edits in time proportional to
the edit, not to the document (pure: no pygls).

pygls 2.1 re-splits the whole text with ``str.splitlines`` on every incremental change (0.35 s
per edit on a 50 MB file, and wrong line numbers after \\f, \\x85 or U+2028). Here the text is a
list of chunks of whole lines (LSP breaks only: \\n, \\r\\n, \\r), each with its length and
line-break count: an edit rewrites the chunks it touches, a position is found by a binary search
over the chunks and a scan of one chunk.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from itertools import accumulate

from .text import Pos, Span, column_to_index, index_to_column

_BREAK = re.compile(r"\r\n|\r|\n")
CHUNK_CHARS = 32 * 1024


def _split(text: str, target: int) -> list[str]:
    """Cut ``text`` into chunks of about ``target`` characters, each ending with a line break
    (but the last), never between the two halves of a \\r\\n."""
    chunks, start = [], 0
    while len(text) - start > target:
        match = _BREAK.search(text, start + target)
        if match is None:
            break
        chunks.append(text[start : match.end()])
        start = match.end()
    chunks.append(text[start:])
    return chunks


def _breaks(chunk: str) -> int:
    return chunk.count("\n") + chunk.count("\r") - chunk.count("\r\n")


class Document:
    def __init__(self, uri: str, text: str, version: int | None = None, language_id: str = "", chunk_chars: int = CHUNK_CHARS):
        self.uri = uri
        self.version = version
        self.language_id = language_id
        self._target = chunk_chars
        self._set(text)

    def _set(self, text: str) -> None:
        self._chunks = _split(text, self._target)
        self._chunk_breaks = [_breaks(c) for c in self._chunks]
        self._reindex()

    def _reindex(self) -> None:
        """Prefix sums over the chunks (a few thousand numbers, not the text)."""
        self._char_starts = [0, *accumulate(len(c) for c in self._chunks)]
        self._line_starts = [0, *accumulate(self._chunk_breaks)]
        self._text: str | None = None

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = "".join(self._chunks)
        return self._text

    source = text

    @property
    def line_count(self) -> int:
        return self._line_starts[-1] + 1

    def _locate_line(self, line: int) -> tuple[int, int] | None:
        """(chunk index, offset in the chunk) where ``line`` starts; None past the last line."""
        if line < 0 or line >= self.line_count:
            return None
        index = bisect_right(self._line_starts, line) - 1
        index = min(index, len(self._chunks) - 1)
        chunk = self._chunks[index]
        skip = line - self._line_starts[index]
        local = 0
        if skip:
            for count, match in enumerate(_BREAK.finditer(chunk), 1):
                if count == skip:
                    local = match.end()
                    break
        return index, local

    def line_start(self, line: int) -> int:
        found = self._locate_line(line)
        if found is None:
            return self._char_starts[-1]
        return self._char_starts[found[0]] + found[1]

    def line_text(self, line: int) -> str:
        """The line without its break ("" past the end)."""
        found = self._locate_line(line)
        if found is None:
            return ""
        chunk = self._chunks[found[0]]
        match = _BREAK.search(chunk, found[1])
        return chunk[found[1] : match.start() if match else len(chunk)]

    def offset_at(self, pos: Pos, encoding: str = "utf-16") -> int:
        """As :func:`lsp_server.text.offset_at`: clamped past a line's end or the text's end."""
        if pos.line < 0 or pos.character < 0:
            raise ValueError(f"negative position {pos.line}:{pos.character}")
        if pos.line >= self.line_count:
            return self._char_starts[-1]
        return self.line_start(pos.line) + column_to_index(self.line_text(pos.line), pos.character, encoding)

    def position_at(self, offset: int, encoding: str = "utf-16") -> Pos:
        offset = min(max(offset, 0), self._char_starts[-1])
        index = min(bisect_right(self._char_starts, offset) - 1, len(self._chunks) - 1)
        chunk = self._chunks[index]
        local = offset - self._char_starts[index]
        line = self._line_starts[index] + _breaks(chunk[:local])
        if 0 < local < len(chunk) and chunk[local - 1] == "\r" and chunk[local] == "\n":
            line -= 1  # between the two halves of a \r\n
        text = self.line_text(line)
        return Pos(line, index_to_column(text, min(offset - self.line_start(line), len(text)), encoding))

    def selection(self, span: Span, encoding: str = "utf-16") -> tuple[int, int]:
        """String offsets of ``span``; an empty span means the whole line under the cursor."""
        if span.end < span.start:
            raise ValueError(
                f"the range ends ({span.end.line}:{span.end.character}) before it starts "
                f"({span.start.line}:{span.start.character})"
            )
        if span.is_empty:
            line = min(span.start.line, self.line_count - 1)
            return self.line_start(line), self.line_start(line + 1)
        return self.offset_at(span.start, encoding), self.offset_at(span.end, encoding)

    def apply(self, new_text: str, start: Pos | None = None, end: Pos | None = None, encoding: str = "utf-16") -> None:
        """Replace the range (or the whole text when no range is given)."""
        if start is None or end is None:
            self._set(new_text)
            return
        if (end.line, end.character) < (start.line, start.character):
            start, end = end, start
        begin, finish = self.offset_at(start, encoding), self.offset_at(end, encoding)
        first = min(bisect_right(self._char_starts, begin) - 1, len(self._chunks) - 1)
        last = min(bisect_right(self._char_starts, finish) - 1, len(self._chunks) - 1)
        # Neighbours join in when a \r and a \n could meet across a chunk boundary.
        if first > 0:
            first -= 1
        if last + 1 < len(self._chunks):
            last += 1
        base = self._char_starts[first]
        region = "".join(self._chunks[first : last + 1])
        region = region[: begin - base] + new_text + region[finish - base :]
        pieces = [piece for piece in _split(region, self._target) if piece]
        self._chunks[first : last + 1] = pieces
        self._chunk_breaks[first : last + 1] = [_breaks(p) for p in pieces]
        # Where the new pieces meet the old chunks, a \r must not end up apart from its \n.
        for index in (first + len(pieces), first):
            if 0 < index < len(self._chunks) and self._chunks[index - 1].endswith("\r") and self._chunks[index].startswith("\n"):
                self._chunks[index - 1 : index + 1] = [self._chunks[index - 1] + self._chunks[index]]
                self._chunk_breaks[index - 1 : index + 1] = [_breaks(self._chunks[index - 1])]
        if not self._chunks:
            self._chunks, self._chunk_breaks = [""], [0]
        self._reindex()
