"""Generated text → code to put into the document (pure: no pygls): edits from answers, hover
markdown, and the text of an inline completion.

Edits are described as replacement text for a span of the document; the features turn them
into LSP ``TextEdit``s.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import PurePosixPath

from .text import convert_indentation, indent_unit, normalize_eol

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


# Fence names a model writes for an editor's language id, besides the id itself.
_FENCE_NAMES = {
    "python": {"py", "python3"},
    "javascript": {"js"},
    "javascriptreact": {"jsx"},
    "typescript": {"ts"},
    "typescriptreact": {"tsx"},
    "cpp": {"c++", "cxx"},
    "csharp": {"cs", "c#"},
    "shellscript": {"sh", "bash", "zsh", "shell"},
    "ruby": {"rb"},
    "rust": {"rs"},
    "go": {"golang"},
    "kotlin": {"kt"},
    "markdown": {"md"},
    "yaml": {"yml"},
}


def _in_language(fence_language: str, language: str) -> bool:
    fence_language, language = fence_language.lower(), language.lower()
    return bool(language) and (fence_language == language or fence_language in _FENCE_NAMES.get(language, ()))


def extract_code(answer: str, language: str = "", *, cut: bool = False, first: bool = False) -> str:
    """The code the answer proposes, among its fenced blocks in ``language`` (else among all):
    the last block at least half as long as the longest, or with ``first`` the first block.
    Chat models ignore "one code block": a Fix may quote the faulty line first, or show the
    original before the corrected code, and add a short usage example after it; the proposed
    code is the last big block. Raises ``NoCode`` rather than put into the document what is
    not code: an answer with no fenced block (prose, such as "the code is already correct"), an
    empty block, or, with ``cut`` (the answer stopped at its token limit), a block that never
    closed (its code is cut short)."""
    blocks = code_blocks(answer)
    if not blocks:
        quoted = answer.strip()
        quoted = quoted if len(quoted) <= 600 else quoted[:600] + " …"
        raise NoCode(f"StarChat answered without code, so nothing was changed. Its answer:\n\n{quoted}")
    candidates = [b for b in blocks if _in_language(b[0], language)] or blocks
    if first:
        chosen = candidates[0]
    else:
        size = [len(code.strip().splitlines()) for _, code, _ in candidates]
        chosen = next(b for b, n in zip(reversed(candidates), reversed(size)) if 2 * n >= max(size))
    _, code, closed = chosen
    if cut and not closed:
        raise NoCode("StarChat's answer reached the token limit before its code ended, so nothing was changed; "
                     "raise maxNewTokens or select less code.")
    if not code.strip():
        raise NoCode("StarChat's answer holds an empty code block, so nothing was changed.")
    return code


_COMMENT_LEADERS = ("#", "//", "/*", "*", "--", ";", "%", "'", '"""', "'''", "<!--", "(*", "{-", "rem ", "REM ")


def comment_only(code: str, selected: str) -> str | None:
    """Document: only the comment, when the answer's block repeats the selected code with its
    comment on it (as chat models like to): the comment lines right above the selection's first
    line of code (decorators and annotations left out), or a Python docstring (the first
    statement after the signature); None when the block repeats the code with no comment on it.
    ``code`` as it is when the selected code is not in it."""
    first = next((line.strip() for line in selected.splitlines() if line.strip()), "")
    lines = code.splitlines(keepends=True)
    at = next((i for i, line in enumerate(lines) if first and line.strip() == first), None)
    if at is None:
        return code
    above = lines[:at]
    while above and (not above[-1].strip() or above[-1].lstrip().startswith("@")):
        above.pop()
    start = len(above)
    while start > 0 and above[start - 1].lstrip().startswith(_COMMENT_LEADERS):
        start -= 1
    if start < len(above):
        return "".join(above[start:])
    signature_end = next((i for i in range(at, len(lines)) if lines[i].split("#", 1)[0].rstrip().endswith(":")), len(lines))
    body = [i for i in range(signature_end + 1, len(lines)) if lines[i].strip()]
    if body and lines[body[0]].lstrip().startswith(('"""', "'''")):
        begin = body[0]
        quote = lines[begin].lstrip()[:3]
        if quote in lines[begin].lstrip()[3:]:
            return lines[begin]
        end = next((i for i in range(begin + 1, len(lines)) if quote in lines[i]), None)
        if end is not None:
            return "".join(lines[begin : end + 1])
    return None


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
    stay as they were: the code goes between them. An empty line (an edit at the cursor there)
    becomes the code's lines."""
    lead = _LEADING_BLANK_LINES.match(selection).group(0) if starts_line and selection.strip() else ""
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


@dataclass(frozen=True)
class FillShape:
    """What an inline completion may insert, given the text after the cursor: one line when the
    cursor's line goes on after it, else lines up to where the model starts writing the code
    that already follows."""

    rest_of_line: str  # the cursor's line after the cursor
    next_code: str  # the first line after the cursor's that is not blank, stripped

    @classmethod
    def around(cls, after: str) -> "FillShape":
        first, _, rest = normalize_eol(after).partition("\n")
        following = next((line.strip() for line in rest.split("\n") if line.strip()), "")
        return cls(first, following)

    @property
    def single_line(self) -> bool:
        return bool(self.rest_of_line.strip())

    def enough(self, generated: str) -> bool:
        """Whether the model may stop: nothing it writes from here on would be inserted."""
        if self.single_line:
            return "\n" in generated
        *whole_lines, _ = generated.split("\n")
        return bool(self.next_code) and any(line.strip() == self.next_code for line in whole_lines)

    def text(self, generated: str, *, finished: bool, eol: str = "\n") -> str:
        """The text to insert at the cursor ("" for none). ``finished``: the model ended the
        middle itself (else a token limit or :meth:`enough` cut it, and a last line that is
        not the only one is dropped as cut)."""
        lines = normalize_eol(generated).split("\n")
        if self.single_line:
            text = lines[0]
            rest = self.rest_of_line
            overlap = next((k for k in range(min(len(text), len(rest)), 0, -1) if text.endswith(rest[:k])), 0)
            text = text[: len(text) - overlap]  # the model wrote the rest of the line again
        else:
            if not finished and len(lines) > 1:
                lines = lines[:-1]
            if self.next_code:
                repeat = next((i for i, line in enumerate(lines) if line.strip() == self.next_code), len(lines))
                lines = lines[:repeat]
            text = "\n".join(lines)
        return text.rstrip().replace("\n", eol)
