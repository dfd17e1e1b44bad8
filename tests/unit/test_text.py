"""Lines and positions as LSP counts them."""

import pytest

from lsp_server.text import Pos, column_to_index, offset_at, position_at, split_lines, word_at


def test_only_lsp_line_breaks_split():
    assert split_lines("a\nb\r\nc\rd") == ["a\n", "b\r\n", "c\r", "d"]
    assert split_lines("a\u2028b\x0cc\x85d") == ["a\u2028b\x0cc\x85d"]
    assert split_lines("a\n") == ["a\n", ""]
    assert split_lines("") == [""]


@pytest.mark.parametrize("encoding,column,index", [("utf-16", 3, 2), ("utf-8", 5, 2), ("utf-32", 2, 2)])
def test_columns_in_each_encoding(encoding, column, index):
    line = "a😀b"  # 😀 is 2 UTF-16 units, 4 UTF-8 bytes
    assert column_to_index(line, column, encoding) == index


def test_positions_clamp_past_the_end():
    lines = split_lines("ab\ncd")
    assert offset_at(lines, Pos(0, 99)) == 2
    assert offset_at(lines, Pos(9, 0)) == 5
    assert position_at(lines, 3) == Pos(1, 0)
    assert position_at(lines, 5) == Pos(1, 2)


def test_cjk_and_crlf_round_trip():
    text = "中文\r\n😀x\r\n"
    lines = split_lines(text)
    for offset in range(len(text)):
        if text[offset] in "\r\n":
            continue
        assert offset_at(lines, position_at(lines, offset)) == offset


def test_word_at():
    assert word_at("def area(radius):", 5) == (4, 8)
    assert word_at("x = 1 + 2", 2) is None
