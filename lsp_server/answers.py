"""Generated text → code to put into the document (pure: no pygls).

Edits are described as replacement text for a span of the document; the features turn them
into LSP ``TextEdit``s.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import PurePosixPath

from .text import convert_indentation, indent_unit

_FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,})[ \t]*([\w+#.-]*)[^\n]*\n", re.MULTILINE)
_LEADING_BLANK_LINES = re.compile(r"(?:[ \t]*(?:\r\n|\r|\n))*")
_TRAILING_BREAKS = re.compile(r"(?:(?:\r\n|\r|\n)[ \t]*)*\Z")


class NoCode(ValueError):
    """The answer holds no code to put into the document; the message says why, for the user."""


def code_blocks(answer: str) -> list[tuple[str, str, bool]]:
    """``(language, code, closed)`` of each fenced block; an unclosed last block runs to the end."""
    blocks = []
    pos = 0
    while (opening := _FENCE.search(answer, pos)) is not None:
        fence, language = opening.group(1), opening.group(2)
        closing = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$", re.MULTILINE)
        end = closing.search(answer, opening.end())
        body_end = end.start() if end else len(answer)
        blocks.append((language, answer[opening.end() : body_end], end is not None))
        if end is None:
            break
        pos = end.end()
    return blocks


def extract_code(answer: str, language: str = "", *, cut: bool = False) -> str:
    """The code the answer proposes: its first fenced block in ``language``, else its first
    block. Raises ``NoCode`` rather than put into the document what is not code: an answer
    with no fenced block (prose, such as "the code is already correct"), an empty block, or,
    with ``cut`` (the answer stopped at its token limit), a block that never closed (its code
    is cut short)."""
    blocks = code_blocks(answer)
    if not blocks:
        quoted = answer.strip()
        quoted = quoted if len(quoted) <= 600 else quoted[:600] + " …"
        raise NoCode(f"StarChat answered without code, so nothing was changed. Its answer:\n\n{quoted}")
    chosen = next((b for b in blocks if language and b[0].lower() == language.lower()), blocks[0])
    _, code, closed = chosen
    if cut and not closed:
        raise NoCode("StarChat's answer reached the token limit before its code ended, so nothing was changed; "
                     "raise maxNewTokens or select less code.")
    if not code.strip():
        raise NoCode("StarChat's answer holds an empty code block, so nothing was changed.")
    return code


def fit_code(code: str, *, indent: str, first_line_indented: bool, keep_trailing_newline: bool, eol: str,
             unit: str | None = None) -> str:
    """Re-indent ``code`` to sit where the selection was, with the document's indentation
    ``unit`` (``text.indent_unit``: a model answering in four spaces must not put spaces into a
    tab-indented file, a TabError in Python, or four into a two-space one), and use the
    document's line breaks."""
    lines = textwrap.dedent(code.replace("\r\n", "\n").replace("\r", "\n")).strip("\n").split("\n")
    lines = convert_indentation(lines, indent_unit("\n".join(lines)), unit)
    out = [(indent + line if line.strip() else "") for line in lines]
    if out and not first_line_indented:
        out[0] = out[0][len(indent) :]
    text = "\n".join(out)
    if keep_trailing_newline:
        text += "\n"
    return text.replace("\n", eol)


def replacement_for_selection(code: str, selection: str, *, indent: str, starts_line: bool, eol: str,
                              unit: str | None = None) -> str:
    """Fix / Optimize: the answer's code (``extract_code``) in place of the selection. Blank
    lines the selection starts with (when it starts a line) and the line breaks it ends with
    stay as they were: the code goes between them."""
    lead = _LEADING_BLANK_LINES.match(selection).group(0) if starts_line else ""
    trail = _TRAILING_BREAKS.search(selection, len(lead)).group(0)
    return lead + fit_code(code, indent=indent, first_line_indented=starts_line, keep_trailing_newline=False, eol=eol,
                           unit=unit) + trail


def insertion_above(code: str, *, indent: str, eol: str, unit: str | None = None) -> str:
    """Document: the answer's comment (``extract_code``), as whole lines to insert above the
    selection's first line."""
    return fit_code(code, indent=indent, first_line_indented=True, keep_trailing_newline=True, eol=eol, unit=unit)


def hover_markdown(answer: str) -> str:
    return answer.strip() or "_StarChat had nothing to say about this._"


_TEST_FILE_PATTERNS = {
    "python": "test_{stem}.py",
    "go": "{stem}_test.go",
    "javascript": "{stem}.test.js",
    "javascriptreact": "{stem}.test.jsx",
    "typescript": "{stem}.test.ts",
    "typescriptreact": "{stem}.test.tsx",
    "ruby": "{stem}_spec.rb",
    "java": "{stem}Test.java",
    "kotlin": "{stem}Test.kt",
    "c": "test_{stem}.c",
    "cpp": "test_{stem}.cpp",
    "csharp": "{stem}Tests.cs",
    "php": "{stem}Test.php",
}


def test_file_path(path: str, language: str) -> str:
    """Where tests for ``path`` conventionally live: beside it, named as the language expects."""
    source = PurePosixPath(path)
    pattern = _TEST_FILE_PATTERNS.get(language, "{stem}_test" + source.suffix)
    return str(source.with_name(pattern.format(stem=source.stem)))
