"""What a prompt shows around a notebook cell (pure).

The notebook's cells of the cell's language in order, a blank line between two, and its
markdown cells as line comments of that language, where they usually say what the next cell
does ("## Plot the ages"). A markdown cell of a language without a known line comment, and a
cell of another language, are left out: prose or foreign code between the cells would read as
broken code.
"""

from __future__ import annotations

from typing import Sequence

# Line comments by LSP language id (the ids VS Code gives notebook cells' kernels' languages).
LINE_COMMENTS = {
    **dict.fromkeys(("python", "r", "julia", "ruby", "perl", "shellscript", "powershell", "coffeescript", "elixir",
                     "nim", "raku", "dockerfile", "makefile", "yaml", "toml"), "#"),
    **dict.fromkeys(("javascript", "typescript", "javascriptreact", "typescriptreact", "java", "scala", "kotlin",
                     "csharp", "fsharp", "go", "rust", "c", "cpp", "swift", "dart", "groovy", "php", "zig"), "//"),
    **dict.fromkeys(("sql", "lua", "haskell", "elm", "ada"), "--"),
    **dict.fromkeys(("matlab", "octave", "erlang", "latex", "tex"), "%"),
    **dict.fromkeys(("clojure", "scheme", "racket", "lisp", "commonlisp"), ";;"),
}
MARKDOWN = "markdown"


def markdown_as_comment(markdown: str, language_id: str) -> str | None:
    """A markdown cell as line comments of ``language_id`` (``# ## Plot the ages``), each line
    commented, blank lines at its ends dropped; None when the language has no known line
    comment or the cell is blank."""
    leader = LINE_COMMENTS.get(language_id)
    if leader is None or not markdown.strip():
        return None
    return "".join(f"{leader} {line}".rstrip() + "\n" for line in markdown.strip("\n").splitlines())


def join_cells(cells: Sequence[tuple[str, str]], at: int, text: str) -> tuple[str, int]:
    """The code a prompt shows around cell ``at`` of ``cells`` (each ``(language_id, text)``, in
    the notebook's order), whose text is ``text`` (as the request saw it), and where ``text``
    starts in it. Blank cells other than ``at`` are left out."""
    language = cells[at][0]
    parts: list[str] = []
    offset = 0
    for i, (cell_language, cell_text) in enumerate(cells):
        if i == at:
            part = text
        elif cell_language == language:
            part = cell_text if cell_text.strip() else None
        elif cell_language == MARKDOWN:
            part = markdown_as_comment(cell_text, language)
        else:
            part = None
        if part is None:
            continue
        if parts and not parts[-1].endswith("\n\n"):
            parts.append("\n" if parts[-1].endswith("\n") else "\n\n")
        if i == at:
            offset = sum(map(len, parts))
        parts.append(part)
    return "".join(parts), offset
