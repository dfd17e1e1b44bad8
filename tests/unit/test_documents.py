"""Incremental edits on open documents: the same text as a whole re-split, in bounded time."""

import random

from lsp_server.documents import Document
from lsp_server.text import Pos, offset_at, position_at, split_lines


def reference_apply(text: str, start: Pos, end: Pos, new: str, encoding: str) -> str:
    lines = split_lines(text)
    a, b = offset_at(lines, start, encoding), offset_at(lines, end, encoding)
    return text[:a] + new + text[b:]


import pytest


@pytest.mark.parametrize("chunk_chars", [4, 16, 1 << 15])
def test_random_edits_match_the_reference(chunk_chars):
    rng = random.Random(chunk_chars)
    alphabet = ["a", "b", " ", "\n", "\r\n", "\r", "😀", "中", "\x0c", "\u2028", "\x85"]
    for encoding in ("utf-16", "utf-8", "utf-32"):
        text = "".join(rng.choice(alphabet) for _ in range(200))
        doc = Document("file:///a", text, chunk_chars=chunk_chars)
        for _ in range(300):
            lines = split_lines(doc.text)
            line = rng.randrange(len(lines) + 1)
            start = Pos(line, rng.randrange(6))
            end = Pos(line + rng.randrange(3), rng.randrange(6))
            if (end.line, end.character) < (start.line, start.character):
                start, end = end, start
            new = "".join(rng.choice(alphabet) for _ in range(rng.randrange(4 if rng.random() < 0.9 else 40)))
            expected = reference_apply(doc.text, start, end, new, encoding)
            doc.apply(new, start, end, encoding)
            assert doc.text == expected
            assert doc.line_count == len(split_lines(expected))
            line_no = rng.randrange(doc.line_count + 1)
            assert doc.line_text(line_no) == (split_lines(expected)[line_no].rstrip("\r\n") if line_no < doc.line_count else "")
            offset = rng.randrange(len(doc.text) + 1)
            assert doc.position_at(offset, encoding) == position_at(split_lines(doc.text), offset, encoding) or doc.text[offset - 1 : offset + 1] == "\r\n"
            probe = Pos(rng.randrange(len(split_lines(doc.text)) + 1), rng.randrange(5))
            assert doc.offset_at(probe, encoding) == offset_at(split_lines(doc.text), probe, encoding)


def test_edits_far_apart_in_a_large_document():
    line = "x = 'a reasonably long line of python code here'\n"
    doc = Document("file:///big.py", line * 20_000)
    last = doc.line_count - 2
    for i in range(50):
        at = Pos(last - 5 if i % 2 else 100, i % 10)
        doc.apply("§\n" if i % 7 == 0 else "§", at, at)
    assert doc.text.count("§") == 50 and doc.line_count == 20_001 + 8
    assert doc.offset_at(Pos(doc.line_count - 1, 0)) == len(doc.text)
