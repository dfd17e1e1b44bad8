"""`starchat-lsp ask`: what it tells the user about files too long for the prompt."""

from lsp_server.ask import _shown_in_part, parse_target
from lsp_server.prompts import Prompt, Reference
from lsp_server.text import line_count


def test_files_shown_in_part_are_named_with_their_lines():
    text = "".join(f"x{i}\n" for i in range(50))
    references = [
        Reference("a\nb\n", "left.py"),  # nothing of it fits
        Reference("1\n2\n3\n4", "part.py", first_line=7, whole=False),  # lines 8-11 asked for, 3 shown
        Reference("q\n" * 5, "whole.py"),  # all of it: not named
        Reference("r\n" * 9, "cut.py"),
    ]
    prompt = Prompt([], [], whole_file=False, context_lines=(9, 20), reference_lines=(0, 3, 5, 4))
    assert _shown_in_part(prompt, "calc.py", text, references) == (
        "calc.py lines 10-20 of 50; left.py left out; part.py lines 8-10 of 8-11; cut.py lines 1-4 of 9")
    whole = Prompt([], [], whole_file=True, context_lines=(0, 50), reference_lines=(5,))
    assert _shown_in_part(whole, "calc.py", text, references[2:3]) == ""


def test_line_count_and_targets():
    assert [line_count(t) for t in ("", "a", "a\n", "a\nb", "a\r\nb\r\n", "\n\n")] == [0, 1, 1, 2, 2, 2]
    assert parse_target("src/a.py:3-8")[1] == (3, 8) and parse_target("a.py:5")[1] == (5, 5)
