"""Generated text → code to put into the document (pure: no pygls).

Edits are described as replacement text for a span of the document; the features turn them
into LSP ``TextEdit``s.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import PurePosixPath

_FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,})[ \t]*([\w+#.-]*)[^\n]*\n", re.MULTILINE)


def code_blocks(answer: str) -> list[tuple[str, str]]:
    """``(language, code)`` of each fenced block; an unclosed last block runs to the end."""
    blocks = []
    pos = 0
    while (opening := _FENCE.search(answer, pos)) is not None:
        fence, language = opening.group(1), opening.group(2)
        closing = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$", re.MULTILINE)
        end = closing.search(answer, opening.end())
        body_end = end.start() if end else len(answer)
        blocks.append((language, answer[opening.end() : body_end]))
        if end is None:
            break
        pos = end.end()
    return blocks


def extract_code(answer: str, language: str = "") -> str:
    """The code the answer proposes: the first block in ``language``, else the first block,
    else the whole answer (the model was asked for code only)."""
    blocks = code_blocks(answer)
    for block_language, code in blocks:
        if language and block_language.lower() == language.lower():
            return code
    if blocks:
        return blocks[0][1]
    return answer.strip("\n") + "\n"


def fit_code(code: str, *, indent: str, first_line_indented: bool, keep_trailing_newline: bool, eol: str) -> str:
    """Re-indent ``code`` to sit where the selection was and use the document's line breaks."""
    lines = textwrap.dedent(code.replace("\r\n", "\n").replace("\r", "\n")).strip("\n").split("\n")
    out = [(indent + line if line.strip() else "") for line in lines]
    if out and not first_line_indented:
        out[0] = out[0][len(indent) :]
    text = "\n".join(out)
    if keep_trailing_newline:
        text += "\n"
    return text.replace("\n", eol)


def replacement_for_selection(answer: str, selection: str, *, indent: str, starts_line: bool, language: str, eol: str) -> str:
    """Fix / Optimize: the answer's code, in place of the selection."""
    return fit_code(
        extract_code(answer, language),
        indent=indent,
        first_line_indented=starts_line,
        keep_trailing_newline=selection.endswith(("\n", "\r")),
        eol=eol,
    )


def insertion_above(answer: str, *, indent: str, language: str, eol: str) -> str:
    """Document: the answer's comment, as whole lines to insert above the selection's first line."""
    return fit_code(extract_code(answer, language), indent=indent, first_line_indented=True, keep_trailing_newline=True, eol=eol)


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
