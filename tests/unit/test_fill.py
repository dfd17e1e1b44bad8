"""Inline completion's pure parts: the fill-in-the-middle prompt fitted to an exact token budget
with the model's tokenizer, what is proposed from the model's middle, and typing through it."""

import pytest

from lsp_server.answers import FillShape
from lsp_server.engine.base import common_prefix
from lsp_server.features.inline_completion import Proposed, typed_through
from lsp_server.prompts import PromptTooLong
from lsp_server.prompts.fill import FillPrompt, fill_format, fill_prompt


@pytest.fixture(scope="module")
def fmt(tokenizer):
    found = fill_format(tokenizer)
    assert found is not None
    return found


def numbered_file(n: int, eol: str = "\n") -> str:
    return eol.join(f"line_{i} = {i}  # filler text" for i in range(n)) + eol


def decoded(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def test_a_small_file_goes_whole_in_prefix_suffix_middle_order(tokenizer, fmt):
    text = "def f(x):\n    return \n\nprint(f(2))\n"
    cursor = text.index("return ") + len("return ")
    prompt = fill_prompt(fmt, text=text, offset=cursor, budget=500)
    assert decoded(tokenizer, prompt.ids) == "<fim_prefix>" + text[:cursor] + "<fim_suffix>" + text[cursor:] + "<fim_middle>"
    assert (prompt.before, prompt.after) == (text[:cursor], text[cursor:])


def test_line_breaks_are_shown_as_newlines(fmt):
    text = "a = 1\r\nb = \r\nc = 3\r\n"
    prompt = fill_prompt(fmt, text=text, offset=text.index("b = ") + 4, budget=500)
    assert (prompt.before, prompt.after) == ("a = 1\nb = ", "\nc = 3\n")


@pytest.mark.parametrize("budget", [40, 90, 200, 333, 600])
@pytest.mark.parametrize("line", [0, 3, 100, 199])
def test_the_prompt_never_exceeds_the_budget_and_keeps_the_cursors_line(tokenizer, fmt, budget, line):
    text = numbered_file(200)
    cursor = text.index(f"line_{line} =") + 4
    prompt = fill_prompt(fmt, text=text, offset=cursor, budget=budget)
    assert len(prompt.ids) <= budget
    assert prompt.before.endswith("line") and prompt.after.startswith(f"_{line} = {line}")
    assert text[:cursor].endswith(prompt.before) and text[cursor:].startswith(prompt.after)
    assert prompt.before.startswith("line") and (prompt.after == "" or prompt.after.endswith("\n"))  # whole lines
    if budget >= 200 and 100 <= line < 199:
        # most of the room goes to the code before the cursor, and none is wasted
        before, after = len(fmt.encode_text(prompt.before)), len(fmt.encode_text(prompt.after))
        assert before > after and len(prompt.ids) > budget - 30


def test_the_cursors_line_alone_too_long_is_refused(fmt):
    text = "x = [" + ", ".join(str(i) for i in range(400)) + "]\n"
    with pytest.raises(PromptTooLong):
        fill_prompt(fmt, text=text, offset=10, budget=100)


def test_typing_down_a_long_file_keeps_the_prompt_start(fmt):
    """The prompt's first line stays put while the cursor moves down (the text before the
    cursor is the prompt's start: an engine reuses its cache), instead of moving every line;
    typing on a line changes the prompt only from there."""
    text = numbered_file(1000)
    starts = []
    for line in range(500, 540):
        prompt = fill_prompt(fmt, text=text, offset=text.index(f"line_{line} ="), budget=2000)
        starts.append(int(prompt.before.split(" ", 1)[0].removeprefix("line_")))
    # on round line numbers only, moving forward, at most once per 8 lines
    assert starts == sorted(starts) and all(start % 8 == 0 for start in starts), starts
    assert len(set(starts)) <= 40 // 8 + 1, starts
    first = fill_prompt(fmt, text=text, offset=text.index("line_520 ="), budget=2000)
    typed = text.replace("line_520 =", "line_520x =")
    second = fill_prompt(fmt, text=typed, offset=typed.index("line_520x =") + len("line_520x"), budget=2000)
    assert common_prefix(first.ids, second.ids) > len(fmt.encode_text(first.before)) - 10


def test_one_line_where_the_line_goes_on_after_the_cursor():
    shape = FillShape.around(")\n\nprint(1)\n")
    assert shape.single_line
    assert shape.text("values) / len(values)\n    return", finished=False) == "values) / len(values"
    assert shape.text("x", finished=True) == "x"
    assert shape.text(")", finished=True) == ""  # only the line's own end again
    assert not shape.enough("values)") and shape.enough("values)\n")


def test_lines_up_to_the_code_that_follows():
    shape = FillShape.around("\n\ndef area(radius):\n    pass\n")
    assert not shape.single_line and shape.next_code == "def area(radius):"
    middle = "x = 1\n    return x\n\n\ndef area(radius):\n    return"
    assert shape.enough(middle) and not shape.enough("x = 1\n    return x\n\n\ndef area(radi")
    assert shape.text(middle, finished=False) == "x = 1\n    return x"
    assert shape.text("x = 1\n    return x\n", finished=True, eol="\r\n") == "x = 1\r\n    return x"


def test_a_last_line_cut_by_the_token_limit_is_left_out():
    shape = FillShape.around("\n")
    assert shape.text("a = 1\nb = sum(", finished=False) == "a = 1"
    assert shape.text("a = sum(", finished=False) == "a = sum("  # the only line: better than nothing
    assert shape.text("a = 1\nb = 2", finished=True) == "a = 1\nb = 2"
    assert shape.text("  \n\n", finished=True) == ""


def test_typing_through_a_completion_answers_from_it():
    last = Proposed("def f(x):\n    return ", "\n", "x * 2\n    # done")
    ahead = FillPrompt([], "def f(x):\n    return x ", "\n")
    assert typed_through(last, ahead) == "* 2\n    # done"
    assert typed_through(last, FillPrompt([], last.before, "\n")) == last.text  # asked again in place
    assert typed_through(last, FillPrompt([], "def f(x):\n    return y", "\n")) is None  # typed something else
    assert typed_through(last, FillPrompt([], "def f(x):\n    return x ", "\nmore\n")) is None  # the code after changed
    assert typed_through(last, FillPrompt([], last.before + last.text, "\n")) is None  # all typed
    assert typed_through(None, ahead) is None
    nothing = Proposed("x = ", "\n", "")
    assert typed_through(nothing, FillPrompt([], "x = ", "\n")) == ""  # asked again: still nothing, no model
    assert typed_through(nothing, FillPrompt([], "x = 1", "\n")) is None
