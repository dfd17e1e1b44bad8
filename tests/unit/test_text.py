"""Lines and positions as LSP counts them."""

import pytest

from lsp_server.text import Pos, column_to_index, convert_indentation, indent_unit, offset_at, position_at, split_lines, word_at


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


@pytest.mark.parametrize(
    ("text", "unit"),
    [
        ("def f():\n\treturn 1\n", "\t"),
        ("def f():\n  if x:\n    return 1\n", "  "),
        ("class A:\n    def f(self):\n        return 1\n", "    "),
        ("x = 1\ny = 2\n", None),  # nothing indented
        ("", None),
        # continuation lines aligned under a bracket make odd steps; the real levels outvote them
        ("def f(a,\n      b):\n    if a:\n        return b\n    return a\n", "    "),
        # a tab-indented file's few space-aligned lines do not make it space-indented
        ("f() {\n\tx;\n\tif (y) {\n\t\tz;\n\t}\n}\n/*\n * doc\n */\n", "\t"),
        ("a:\r\n   b\r\n      c\r\n", "   "),  # CRLF; three spaces
        ("x\n y\n  z\n", None),  # one-space steps: no clear unit
    ],
)
def test_indent_unit(text, unit):
    assert indent_unit(text) == unit


def test_convert_indentation_keeps_alignment_past_whole_levels():
    lines = ["def f(a,", "      b):", "    if a:", "        return b"]
    assert convert_indentation(lines, "    ", "\t") == ["def f(a,", "\t  b):", "\tif a:", "\t\treturn b"]
    assert convert_indentation(["if x:", "\ty", "\t\tz"], "\t", "  ") == ["if x:", "  y", "    z"]
    assert convert_indentation(["a", "  b"], None, "\t") == ["a", "  b"]  # the answer's unit unknown: as it is
