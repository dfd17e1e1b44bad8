"""Generated text → code and edits."""

from lsp_server import answers


def test_first_block_in_the_language_wins():
    answer = "Here:\n```text\nnot this\n```\nand\n```python\ndef f():\n    return 1\n```\n"
    assert answers.extract_code(answer, "python") == "def f():\n    return 1\n"
    assert answers.extract_code(answer, "") == "not this\n"


def test_unclosed_block_runs_to_the_end():
    assert answers.code_blocks("```py\nx = 1\ny = 2") == [("py", "x = 1\ny = 2")]


def test_answer_without_fence_is_the_code():
    assert answers.extract_code("x = 1\n", "python") == "x = 1\n"


def test_tilde_and_long_fences():
    answer = "~~~python\na = '```'\n~~~\n"
    assert answers.extract_code(answer) == "a = '```'\n"
    assert answers.code_blocks("````md\n```py\ninner\n```\n````") == [("md", "```py\ninner\n```\n")]


def test_replacement_is_reindented_to_the_selection():
    answer = "```python\ndef f(x):\n    return x + 1\n```"
    new = answers.replacement_for_selection(answer, "    def f(x):\n        return x\n", indent="    ", starts_line=True, language="python", eol="\n")
    assert new == "    def f(x):\n        return x + 1\n"


def test_replacement_after_indentation_does_not_double_it():
    new = answers.replacement_for_selection("```\nreturn 2\n```", "return 1", indent="    ", starts_line=False, language="", eol="\n")
    assert new == "return 2"


def test_replacement_uses_the_document_line_breaks():
    new = answers.replacement_for_selection("```\na\nb\n```", "x\r\ny\r\n", indent="", starts_line=True, language="", eol="\r\n")
    assert new == "a\r\nb\r\n"


def test_doc_comment_is_inserted_with_indentation():
    assert answers.insertion_above("```python\n# Adds.\n# Really.\n```", indent="    ", language="python", eol="\n") == "    # Adds.\n    # Really.\n"


def test_test_file_names():
    assert answers.test_file_path("src/calc.py", "python") == "src/test_calc.py"
    assert answers.test_file_path("pkg/calc.go", "go") == "pkg/calc_test.go"
    assert answers.test_file_path("web/app.ts", "typescript") == "web/app.test.ts"
    assert answers.test_file_path("lib/thing.zig", "zig") == "lib/thing_test.zig"


def test_hover_markdown_never_empty():
    assert answers.hover_markdown("  \n") != ""
    assert answers.hover_markdown(" It adds. \n") == "It adds."
