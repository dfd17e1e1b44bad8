"""Generated text → code and edits."""

import pytest

from lsp_server import answers


def test_a_block_in_the_language_wins():
    answer = "Here:\n```text\nnot this\n```\nand\n```python\ndef f():\n    return 1\n```\nor\n```text\nnot\nthis\neither\n```\n"
    assert answers.extract_code(answer, "python") == "def f():\n    return 1\n"
    assert answers.extract_code(answer, "") == "not\nthis\neither\n"
    # the fence names models write for an editor's language id
    assert answers.extract_code("```text\nno\nno\n```\n```ts\nlet a = 1;\n```", "typescript") == "let a = 1;\n"
    assert answers.extract_code("```js\nno\nno\n```\n```c++\nint a;\n```", "cpp") == "int a;\n"
    assert answers.extract_code("```a\nx\n```\n```b\ny\n```", "", first=True) == "x\n"


FIXED = "def average(values):\n    if not values:\n        return 0\n    return sum(values) / len(values)\n"


@pytest.mark.parametrize(
    "answer",
    [
        f"Here is the fixed code:\n```python\n{FIXED}```\nUse it like this:\n```python\nprint(average([1, 2]))\n```\n",
        f"The bug is in this line:\n```python\nreturn sum(values) / len(values) + 1\n```\nThe corrected function:\n```python\n{FIXED}```",
        "Your code:\n```python\ndef average(values):\n    return sum(values) / len(values) + 1\n```\n"
        f"Fixed:\n```python\n{FIXED}```\n",
    ],
    ids=["then-a-usage-example", "after-quoting-the-bug", "after-the-original"],
)
def test_the_proposed_code_is_the_last_big_block(answer):
    """Chat models ignore "one code block": the code to put in place of the selection is
    neither a quoted line nor a usage example, nor the original shown before the fix."""
    assert answers.extract_code(answer, "python") == FIXED


SELECTED = "def add(a, b):\n    return a + b\n"


@pytest.mark.parametrize(
    ("code", "comment"),
    [
        ('def add(a, b):\n    """Add two numbers."""\n    return a + b\n', '    """Add two numbers."""\n'),
        ('def add(a, b):\n    """Add two numbers.\n\n    Really.\n    """\n    return a + b\n', '    """Add two numbers.\n\n    Really.\n    """\n'),
        ("# Adds two numbers.\n@cache\ndef add(a, b):\n    return a + b\n", "# Adds two numbers.\n"),
        ('"""Add two numbers."""\n', '"""Add two numbers."""\n'),  # only the comment: as it is
        ("# Adds.\n", "# Adds.\n"),
        ("import math\n\n# Adds two numbers.\ndef add(a, b):\n    return a + b\n", "# Adds two numbers.\n"),
        ("/**\n * Adds.\n */\ndef add(a, b):\n    return a + b\n", "/**\n * Adds.\n */\n"),
        ("import math\n\n\ndef add(a, b):\n    return a + b\n", None),  # the code again, no comment
    ],
    ids=["docstring", "long-docstring", "comment-above", "docstring-only", "comment-only", "import-above",
         "block-comment", "no-comment"],
)
def test_document_takes_only_the_comment_from_a_repeated_function(code, comment):
    """Asked for a comment, a model often repeats the whole function with it: inserting that
    above the selection would duplicate the function."""
    assert answers.comment_only(code, SELECTED) == comment


def test_unclosed_block_runs_to_the_end():
    assert answers.code_blocks("```py\nx = 1\ny = 2") == [("py", "x = 1\ny = 2", False)]
    assert answers.extract_code("```py\nx = 1\ny = 2") == "x = 1\ny = 2"  # the answer stopped on its own


def test_no_code_to_put_in_the_document():
    """Prose ("the code is already correct") or an empty block must not replace code; nor may
    a block cut short by the token limit (half a function)."""
    with pytest.raises(answers.NoCode, match="(?s)without code.*already correct"):
        answers.extract_code("The code is already correct.", "python")
    with pytest.raises(answers.NoCode, match="empty code block"):
        answers.extract_code("```python\n\n```", "python")
    with pytest.raises(answers.NoCode, match="maxNewTokens"):
        answers.extract_code("```python\ndef f(x):\n    if x:\n        return", "python", cut=True)
    # cut after a closed block: its code is whole
    assert answers.extract_code("```python\nx = 1\n```\nThis sets", "python", cut=True) == "x = 1\n"


def test_tilde_and_long_fences():
    answer = "~~~python\na = '```'\n~~~\n"
    assert answers.extract_code(answer) == "a = '```'\n"
    assert answers.code_blocks("````md\n```py\ninner\n```\n````") == [("md", "```py\ninner\n```\n", True)]


def test_replacement_is_reindented_to_the_selection():
    code = "def f(x):\n    return x + 1\n"
    new = answers.replacement_for_selection(code, "    def f(x):\n        return x\n", indent="    ", starts_line=True, eol="\n")
    assert new == "    def f(x):\n        return x + 1\n"


def test_replacement_keeps_the_selections_blank_lines_around_the_code():
    selection = "\n    def f(self):\n        return 1\n\n"  # from the blank line above to the one below
    new = answers.replacement_for_selection("def f(self):\n    return 2\n", selection, indent="    ", starts_line=True, eol="\n")
    assert new == "\n    def f(self):\n        return 2\n\n"


@pytest.mark.parametrize("line, eol", [("\n", "\n"), ("        \n", "\n"), ("        \r\n", "\r\n")])
def test_an_empty_line_becomes_the_codes_lines(line, eol):
    """Edit… at the cursor on an empty line (its whitespace the editor's indentation there): the
    code's lines take its place, indented like it, its line break kept after them."""
    indent = line.rstrip("\r\n")
    new = answers.replacement_for_selection("def g(self):\n    return 2\n", line, indent=indent, starts_line=True, eol=eol)
    assert new == f"{indent}def g(self):{eol}{indent}    return 2{eol}"


def test_replacement_after_indentation_does_not_double_it():
    new = answers.replacement_for_selection("return 2\n", "return 1", indent="    ", starts_line=False, eol="\n")
    assert new == "return 2"


def test_replacement_uses_the_document_line_breaks():
    new = answers.replacement_for_selection("a\nb\n", "x\r\ny\r\n", indent="", starts_line=True, eol="\r\n")
    assert new == "a\r\nb\r\n"


def test_doc_comment_is_inserted_with_indentation():
    assert answers.insertion_above("# Adds.\n# Really.\n", indent="    ", eol="\n") == "    # Adds.\n    # Really.\n"


def test_test_file_names():
    assert answers.test_file_path("src/calc.py", "python") == "src/test_calc.py"
    assert answers.test_file_path("pkg/calc.go", "go") == "pkg/calc_test.go"
    assert answers.test_file_path("web/app.ts", "typescript") == "web/app.test.ts"
    assert answers.test_file_path("lib/thing.zig", "zig") == "lib/thing_test.zig"


def test_hover_markdown_never_empty():
    assert answers.hover_markdown("  \n") != ""
    assert answers.hover_markdown(" It adds. \n") == "It adds."
