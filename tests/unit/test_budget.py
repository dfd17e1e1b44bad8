"""The surrounding file fitted to an exact token budget, counted with the model's tokenizer."""

import pytest

from lsp_server.engine.base import common_prefix
from lsp_server.prompts import CodeContext, Message, PromptTooLong, Reference, build_prompt, format_for
from lsp_server.prompts.build import QUESTION_ROOM
from lsp_server.prompts.requests import (
    chat_prompt,
    code_prompt,
    document_prefix,
    hover_prompt,
    prompt_budget,
    selection_offsets,
)
from lsp_server.prompts.tasks import Task
from lsp_server.text import Pos, Span


def numbered_file(n: int, eol: str = "\n") -> str:
    return eol.join(f"line_{i} = {i}  # filler text" for i in range(n)) + eol


def build(tokenizer, text, start, end, budget):
    return build_prompt(
        format_for(tokenizer),
        system="sys",
        history=[Message("user", "Explain.")],
        budget=budget,
        context=CodeContext(text, start, end, "python", "a.py"),
    )


@pytest.mark.parametrize("budget", [120, 200, 333, 500, 900])
def test_prompt_never_exceeds_the_budget_and_keeps_the_selection(tokenizer, budget):
    text = numbered_file(200)
    start = text.index("line_100 =")
    end = text.index("line_103 =")
    prompt = build(tokenizer, text, start, end, budget)
    assert len(prompt.ids) <= budget
    assert prompt.ids == format_for(tokenizer).encode_dialogue(prompt.messages)  # the count is the real one
    turn = prompt.messages[-1].content
    assert text[start:end] in turn
    # nearest lines first: the kept lines are a contiguous window around the selection
    if prompt.lines_before:
        assert "line_99 = 99" in turn
    if prompt.lines_after:
        assert "line_103 = 103" in turn
    assert prompt.lines_before + prompt.lines_after < 200


def test_budget_is_used_nearly_fully(tokenizer):
    text = numbered_file(400)
    start, end = text.index("line_200 ="), text.index("line_201 =")
    prompt = build(tokenizer, text, start, end, 700)
    one_line = len(tokenizer("line_1 = 1  # filler text\n", add_special_tokens=False)["input_ids"])
    # a short question leaves the room of a QUESTION_ROOM-token one unused (the window is the
    # same for every task)
    assert 700 - QUESTION_ROOM - 2 * one_line - 10 <= len(prompt.ids) <= 700 - QUESTION_ROOM + 10
    long_question = build_prompt(format_for(tokenizer), system="sys", history=[Message("user", "Explain. " * 80)],
                                 budget=700, context=CodeContext(text, start, end, "python", "a.py"))
    assert 700 - 2 * one_line - 10 <= len(long_question.ids) <= 700


def test_farthest_lines_are_dropped_first(tokenizer):
    text = numbered_file(300)
    start, end = text.index("line_150 ="), text.index("line_151 =")
    prompt = build(tokenizer, text, start, end, 400)
    turn = prompt.messages[-1].content
    assert "line_149 = 149" in turn and "line_151 = 151" in turn
    assert "line_0 = 0" not in turn and "line_299 = 299" not in turn
    # about as many lines on each side (the window starts on a line of a round step: at most a
    # quarter of its lines move from after the selection to before it)
    assert prompt.lines_after * 2 >= prompt.lines_before // 2 and prompt.lines_before >= prompt.lines_after - 2


def test_small_file_fits_whole(tokenizer):
    text = numbered_file(5)
    start, end = text.index("line_2 ="), text.index("line_3 =")
    prompt = build(tokenizer, text, start, end, 2000)
    assert prompt.lines_before == 2 and prompt.lines_after == 2 and "line_4 = 4" in prompt.messages[-1].content


@pytest.mark.parametrize("eol", ["\n", "\r\n"])
def test_an_empty_selected_line_is_placed_by_the_line_above_it_that_holds_code(tokenizer, eol):
    """Edit… at the cursor on an empty line: the file's lines are not numbered, so instead of an
    empty "Selected code" block the prompt shows the line above it that holds code (blank lines
    between skipped), or says that no code comes before it."""
    fmt = format_for(tokenizer)
    text = "import math\n\n\ndef average(values):\n    return sum(values) / len(values)\n\n   \n\ndef area(r):\n".replace("\n", eol)
    at = selection_offsets(text, Span(Pos(7, 0), Pos(7, 0)))
    prompt = code_prompt(fmt, system="s", budget=1500, text=text, start=at[0], end=at[1], task=Task.ASK,
                         question="Write a function that squares a number.", path="a.py", language="python")
    turn = prompt.messages[1].content
    assert "Selected code" not in turn and "\r" not in turn
    assert turn.endswith("The selected line is empty; it comes after this one:\n```python\n"
                         "    return sum(values) / len(values)\n```\n\nWrite a function that squares a number.")
    first = selection_offsets(text, Span(Pos(0, 0), Pos(0, 0)))
    start = "\n\n" + text
    top = code_prompt(fmt, system="s", budget=1500, text=start, start=0, end=1, task=Task.ASK, question="Why?", language="python")
    assert "The selected line is empty, before any code of the file.\n\nWhy?" in top.messages[1].content
    # a selected line that holds code is shown as it was
    assert "Selected code:\n```python\nimport math\n```" in code_prompt(
        fmt, system="s", budget=1500, text=text, start=first[0], end=first[1], task=Task.ASK, question="Why?",
        language="python").messages[1].content


def test_selection_too_large_names_both_sizes(tokenizer):
    text = numbered_file(100)
    with pytest.raises(PromptTooLong) as error:
        build(tokenizer, text, 0, len(text), 200)
    assert error.value.budget == 200
    assert error.value.needed > 200
    assert f"{error.value.needed:,} tokens" in str(error.value) and "200" in str(error.value)


@pytest.mark.parametrize(
    "filler",
    ["emoji 😀🚀👩‍💻 = 1", "中文字符 = '你好世界'", "日本語 = 'こんにちは'", "mixed = 'café naïve 😀'"],
)
def test_unicode_is_counted_exactly(tokenizer, filler):
    text = "\n".join(f"{filler}  # {i}" for i in range(120)) + "\n"
    start = text.index("# 60") - len(filler) - 2
    end = text.index("\n", start) + 1
    prompt = build(tokenizer, text, start, end, 400)
    assert len(prompt.ids) <= 400
    # the selection is shown in the file and again on its own
    assert tokenizer.decode(prompt.ids).count(filler) == prompt.lines_before + prompt.lines_after + 2


def test_crlf_documents_are_prompted_with_lf(tokenizer):
    text = numbered_file(50, "\r\n")
    fmt = format_for(tokenizer)
    start, end = selection_offsets(text, Span(Pos(10, 0), Pos(12, 0)))
    prompt = code_prompt(fmt, system="s", budget=500, text=text, start=start, end=end, task=Task.FIX, path="a.py", language="python")
    turn = prompt.messages[-1].content
    assert "\r" not in turn
    assert "line_10 = 10  # filler text\nline_11 = 11  # filler text\n" in turn
    assert len(prompt.ids) <= 500


def test_old_chat_turns_are_dropped_when_the_history_is_too_long(tokenizer):
    fmt = format_for(tokenizer)
    history = []
    for i in range(30):
        history += [Message("user", f"question {i} " * 10), Message("assistant", f"answer {i} " * 10)]
    history.append(Message("user", "last question"))
    prompt = build_prompt(fmt, system="s", history=history, budget=300)
    assert len(prompt.ids) <= 300
    assert prompt.history_dropped > 0
    assert prompt.messages[-1].content == "last question"
    assert prompt.messages[1].role == "user"  # turns are dropped in pairs


def test_prompt_budget():
    assert prompt_budget(0, 8192, 256) == 7936
    assert prompt_budget(4096, 8192, 512) == 3584
    assert prompt_budget(16384, 8192, 256) == 7936  # never past the model's own window


def test_a_huge_file_is_never_split_whole(tokenizer):
    """Only text within reach of the budget is looked at: a 20 MB file costs what a small one does."""
    import time

    text = numbered_file(600_000)
    start = text.index("line_300000 =")
    end = text.index("line_300001 =")
    started = time.monotonic()
    prompt = build(tokenizer, text, start, end, 600)
    assert time.monotonic() - started < 5
    assert len(prompt.ids) <= 600 and "line_299999 = 299999" in prompt.messages[-1].content


def test_code_with_backtick_fences_stays_inside_its_block(tokenizer):
    """A Markdown file (or a docstring with an example block) holds ``` lines: the prompt's
    fences are longer, so the selection and the code around it stay whole blocks."""
    text = "# Notes\n\n```python\nprint(1)\n```\n\nSee ````the four```` too.\n"
    start, end = text.index("```python"), text.index("\nSee")
    turn = build_prompt(format_for(tokenizer), system="sys", history=[Message("user", "Explain.")], budget=2000,
                        context=CodeContext(text, start, end, "python", "notes.md")).messages[-1].content
    assert "Selected code:\n````python\n```python\nprint(1)\n```\n````" in turn
    assert turn.startswith(f"File: `notes.md` (python)\n\n`````python\n{text}`````\n\nSelected code:")


@pytest.mark.parametrize(
    ("line", "column", "language", "explained"),
    [
        ("    return average(values)", 6, "python", None),  # a keyword: no model run
        ("    return average(values)", 13, "python", "average"),
        ("    print(self.x)", 11, "python", None),
        ("    print(self.x)", 6, "python", "print"),  # a builtin is worth a hover
        ("function area(r) {", 3, "javascript", None),
        ("function area(r) {", 11, "javascript", "area"),
        ("func area(r float64) float64 {", 2, "go", None),
        ("function area(r) {", 3, "", "function"),  # a language without a list: every word
    ],
)
def test_hover_skips_the_languages_keywords(tokenizer, line, column, language, explained):
    built = hover_prompt(format_for(tokenizer), system="", budget=4096, text=line + "\n", line_start=0, line=line,
                         position=Pos(0, column), language=language)
    assert (built and line[built[1].start.character : built[1].end.character]) == explained


def test_prompts_on_one_document_start_with_the_whole_file(tokenizer):
    """The file comes before the selection and the task, so an engine that keeps the KV of a
    prompt prefix computes it once for every request on this document version: hovers, code
    actions on other selections, a chat about the file."""
    fmt = format_for(tokenizer)
    text = numbered_file(30)
    common = dict(system="sys", budget=1500, text=text, path="a.py", language="python")
    fix = code_prompt(fmt, **common, start=text.index("line_3 ="), end=text.index("line_6 ="), task=Task.FIX)
    tests = code_prompt(fmt, **common, start=text.index("line_20 ="), end=text.index("line_25 ="), task=Task.TESTS)
    line = "line_12 = 12  # filler text"
    hover, _ = hover_prompt(fmt, system="sys", budget=1000, text=text, line_start=text.index(line), line=line,
                            position=Pos(12, 1), path="a.py", language="python")
    chat = chat_prompt(fmt, system="sys", budget=1500, messages=[Message("user", "What is this file?")], text=text,
                       path="a.py", language="python")
    whole = len(fmt.encode_dialogue([Message("system", "sys"), Message("user", f"File: `a.py` (python)\n\n```python\n{text}```")]))
    for other in (tests, hover, chat):
        shared = common_prefix(fix.ids, other.ids)
        assert shared >= whole - 8  # the dialogue's closing tokens aside: all of it
        assert "line_29 = 29" in tokenizer.decode(fix.ids[:shared])
    assert chat.messages[-1].content.endswith("```\n\nWhat is this file?") and "Selected code" not in chat.messages[-1].content
    # a selection that is the whole file is shown once
    everything = code_prompt(fmt, **common, start=0, end=len(text), task=Task.FIX)
    assert tokenizer.decode(everything.ids).count("line_29 = 29") == 1


def test_the_document_prefix_is_what_every_prompt_on_the_file_starts_with(tokenizer):
    """What a warm-up computes: every request on the file (code actions, a hover, a chat about
    it, with or without a selection, any question) starts with exactly these tokens, which end
    after the whole file; nothing when the file does not fit whole."""
    fmt = format_for(tokenizer)
    text = numbered_file(30)
    common = dict(system="sys", budget=1500, text=text, path="a.py", language="python")
    prefix = document_prefix(fmt, **common)
    assert "line_29 = 29" in tokenizer.decode(prefix) and tokenizer.decode(prefix).rstrip().endswith("```")
    line = "line_12 = 12  # filler text"
    hover, _ = hover_prompt(fmt, system="sys", budget=1000, text=text, line_start=text.index(line), line=line,
                            position=Pos(12, 1), path="a.py", language="python")
    others = [
        code_prompt(fmt, **common, start=text.index("line_3 ="), end=text.index("line_6 ="), task=Task.FIX),
        code_prompt(fmt, **common, start=text.index("line_20 ="), end=text.index("line_20 ="), task=Task.ASK,
                    question="why " * 150),  # a question longer than QUESTION_ROOM
        hover,
        chat_prompt(fmt, messages=[Message("user", "What is this file?")], **common),
        chat_prompt(fmt, messages=[Message("user", "Why?")], start=5, end=40, **common),
    ]
    for other in others:
        assert other.ids[: len(prefix)] == prefix
    assert hover.whole_file and not build(tokenizer, numbered_file(200), 0, 10, 300).whole_file
    assert document_prefix(fmt, **{**common, "budget": 300}) == []  # the file does not fit whole
    assert document_prefix(fmt, **{**common, "budget": 10}) == []  # nor does anything


@pytest.mark.parametrize("other", [Task.EXPLAIN, Task.OPTIMIZE, "problems", "question"])
def test_every_task_on_one_selection_sees_the_same_lines(tokenizer, other):
    """In a file too long to fit, the window around a selection does not depend on the task
    (nor on a Fix's problems, nor on a short question): the prompts differ only at the end."""
    fmt = format_for(tokenizer)
    text = numbered_file(400)
    common = dict(system="sys", budget=700, text=text, start=text.index("line_200 ="), end=text.index("line_203 ="),
                  path="a.py", language="python")
    fix = code_prompt(fmt, **common, task=Task.FIX)
    if other == "problems":
        second = code_prompt(fmt, **common, task=Task.FIX, problems=["'line_201' is not defined (pyflakes F821)"])
    elif other == "question":
        second = code_prompt(fmt, **common, task=Task.ASK, question="Why is line 201 assigned twice in this file?")
    else:
        second = code_prompt(fmt, **common, task=other)
    assert (second.lines_before, second.lines_after) == (fix.lines_before, fix.lines_after)
    shared = tokenizer.decode(fix.ids[: common_prefix(fix.ids, second.ids)])
    assert "Selected code:\n```python\nline_200 = 200  # filler text\nline_201 = 201  # filler text\nline_202" in shared


def hover_at(fmt, text, n, budget):
    line = f"line_{n} = {n}  # filler text"
    prompt, _ = hover_prompt(fmt, system="sys", budget=budget, text=text, line_start=text.index(line + "\n"), line=line,
                             position=Pos(n, 1), path="a.py", language="python")
    return prompt


def window_lines(prompt) -> list[str]:
    return prompt.messages[-1].content.split("```python\n", 1)[1].split("```", 1)[0].splitlines()


def test_nearby_selections_in_a_long_file_get_windows_that_start_alike(tokenizer):
    """Hovers along a function of a file too long to fit: their windows start on the same line
    (at most one change of start over a dozen lines), so the prompts share all but the window's
    last lines (and the engine its cache); each window still has lines on both sides of the
    hovered one."""
    fmt = format_for(tokenizer)
    text = numbered_file(600)
    prompts = {n: hover_at(fmt, text, n, 2000) for n in range(300, 312)}
    by_start: dict[str, list] = {}
    for n, prompt in prompts.items():
        lines = window_lines(prompt)
        by_start.setdefault(lines[0], []).append(prompt)
        at = lines.index(f"line_{n} = {n}  # filler text")
        assert at >= 10 and len(lines) - at > 10 and len(prompt.ids) <= 2000
    assert len(by_start) <= 2 and max(len(group) for group in by_start.values()) >= 6
    for group in by_start.values():
        shortest = min(len(p.ids) for p in group)
        assert all(common_prefix(group[0].ids, p.ids) > shortest * 3 // 4 for p in group)
    # far away: another window
    assert window_lines(hover_at(fmt, text, 450, 2000))[0] not in by_start


def test_a_chats_next_turn_starts_with_the_last_turns_prompt_and_answer(tokenizer):
    """The document a conversation is about goes into its first user message, so the next
    turn's prompt starts with the previous prompt and answer (the engine's cache holds them);
    when old turns must go, the document moves to the first user message kept."""
    fmt = format_for(tokenizer)
    text = numbered_file(30)
    about = dict(text=text, start=text.index("line_5 ="), end=text.index("line_7 ="), path="a.py", language="python")
    answer = "It assigns numbers to names."
    turns = [Message("user", "What is this?"), Message("assistant", answer), Message("user", "Why?")]
    first = chat_prompt(fmt, system="s", budget=1500, messages=turns[:1], **about)
    follow_up = chat_prompt(fmt, system="s", budget=1500, messages=turns, **about)
    assert follow_up.ids[: len(first.ids)] == first.ids
    assert tokenizer.decode(follow_up.ids[len(first.ids) :]).startswith(answer)
    assert follow_up.messages[-1].content == "Why?" and "Selected code" in follow_up.messages[1].content
    long_ago = [Message("user", "An old question " * 40), Message("assistant", "An old answer " * 40)]
    squeezed = chat_prompt(fmt, system="s", budget=300, messages=long_ago + turns, **about)
    assert squeezed.history_dropped == 1 and squeezed.messages[1].content.endswith("What is this?")
    assert "line_5 = 5" in squeezed.messages[1].content


def test_a_conversation_about_a_long_file_keeps_its_window_while_it_grows(tokenizer):
    """A file too long to fit: every turn's window starts where the first turn's (and an
    Explain's) does; from the second turn it leaves HISTORY_ROOM tokens to the later turns
    (doubled as they outgrow it), so it stays the same from turn to turn, or loses lines at its
    end: each prompt starts with the last one and its answer, or with all of it up to the
    window's end. (Before, the window shrank at every turn and each turn computed the whole
    history again.)"""
    fmt = format_for(tokenizer)
    text = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n\n" for i in range(1500))
    about = dict(text=text, start=text.index("def f700("), end=text.index("def f701("), path="m.py", language="python")
    answer = "This function multiplies x by a constant and adds a small offset; " * 8
    turns = [Message("user", "What does this function do?")]
    prompts = []
    for i in range(6):  # (a 7th turn needs 4096 tokens for the later turns: the window moves then)
        prompts.append(chat_prompt(fmt, system="s", budget=7936, messages=turns, **about))
        turns += [Message("assistant", answer), Message("user", f"And question {i}?" + " Please." * (i % 3))]

    def window(prompt) -> list[str]:  # the file's lines in the message that holds the document
        return prompt.messages[1].content.split("```python\n", 1)[1].split("```", 1)[0].splitlines()

    explain = code_prompt(fmt, system="s", budget=7936, task=Task.EXPLAIN, **about)
    assert window(prompts[0]) == window(explain)
    windows = [window(p) for p in prompts]
    assert len({w[0] for w in windows}) == 1 and len(windows[-1]) > 100  # one start, still a wide window
    kept_whole = 0
    for (earlier, w1), (later, w2) in zip(zip(prompts, windows), zip(prompts[1:], windows[1:])):
        assert len(w2) <= len(w1)
        if w2 == w1:  # the next prompt starts with the last one (all but the closing tokens)
            assert common_prefix(earlier.ids, later.ids) >= len(earlier.ids) - 3
            kept_whole += 1
        else:  # the window lost lines at its end: all up to there is the same
            assert tokenizer.decode(later.ids[: common_prefix(earlier.ids, later.ids)]).count("\n") >= len(w2)
    assert kept_whole >= 3
    assert all(len(p.ids) <= 7936 for p in prompts)
    # once the later turns need more than half the room, the window gets what they leave (it
    # moves again, but never goes while there is room for it)
    small = chat_prompt(fmt, system="s", budget=1500, messages=prompts[2].messages[2:6] + [Message("user", "More?")],
                        **about)
    assert small.lines_before + small.lines_after > 10


def test_past_half_the_room_a_conversations_window_still_moves_only_every_few_turns(tokenizer):
    """Once the later turns of a conversation about a long file need more than half the room,
    the room left to them grows a step at a time: the window stays the same for the turns that
    fit in a step (each prompt then starts with the last one), and it keeps lines until the
    turns leave none. (Before, it moved at every turn past half the room.)"""
    fmt = format_for(tokenizer)
    text = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n\n" for i in range(1500))
    about = dict(text=text, start=text.index("def f700("), end=text.index("def f701("), path="m.py", language="python")
    answer = "It multiplies x by a constant and adds an offset. " * 4
    turns = [Message("user", "What does this function do?")]
    budget = 5000
    past_half = []
    for i in range(24):
        prompt = chat_prompt(fmt, system="s", budget=budget, messages=turns, **about)
        assert len(prompt.ids) <= budget and prompt.history_dropped == 0
        later_turns = len(prompt.ids) - len(fmt.encode_dialogue(prompt.messages[:2]))
        if later_turns > 2048:  # a reserve of 4096 would leave the window less than half the room
            past_half.append(prompt)
        turns += [Message("assistant", answer), Message("user", f"And question {i}?")]
    assert len(past_half) >= 6 and past_half[-1].lines_before + past_half[-1].lines_after > 0, len(past_half)
    same = sum(
        (a.lines_before, a.lines_after) == (b.lines_before, b.lines_after) and common_prefix(a.ids, b.ids) >= len(a.ids) - 3
        for a, b in zip(past_half, past_half[1:])
    )
    assert same >= len(past_half) // 2, [(p.lines_before, p.lines_after) for p in past_half]


def test_attached_files_follow_the_document_whole_when_they_fit(tokenizer):
    """A conversation shows the files the user attached after the document and before the
    selection, each under its path; the prompt starts like a code action's on the same file."""
    fmt = format_for(tokenizer)
    text, other = numbered_file(10), "def helper():\n    return 1\n"
    about = dict(text=text, start=text.index("line_5 ="), end=text.index("line_6 ="), path="a.py", language="python")
    plain = chat_prompt(fmt, system="s", budget=1500, messages=[Message("user", "Why?")], **about)
    refs = [Reference(other, "b.py", "python"), Reference("x = 1\ny = 2\nz = 3\n", "c.py", "python", first_line=7, whole=False)]
    prompt = chat_prompt(fmt, system="s", budget=1500, messages=[Message("user", "Why?")], references=refs, **about)
    turn = prompt.messages[1].content
    assert turn.index("```python\nline_0") < turn.index("File: `b.py` (python)\n\n```python\n" + other + "```") \
        < turn.index("File: `c.py` (python), lines 8-10\n\n```python\nx = 1\n") < turn.index("Selected code:")
    assert prompt.reference_lines == (2, 3) and prompt.whole_file
    assert prompt.ids == fmt.encode_dialogue(prompt.messages)
    action = code_prompt(fmt, system="s", budget=1500, task=Task.EXPLAIN, **about)
    shared = common_prefix(prompt.ids, action.ids)
    assert "line_9 = 9  # filler text\n```" in tokenizer.decode(prompt.ids[:shared])  # through the file
    # and without a document, before the question
    alone = chat_prompt(fmt, system="s", budget=1500, messages=[Message("user", "Why?")], references=refs[:1])
    assert alone.messages[1].content == "File: `b.py` (python)\n\n```python\n" + other + "```\n\nWhy?"
    assert plain.reference_lines == ()


@pytest.mark.parametrize("budget", [300, 600, 1000])
def test_attached_files_are_cut_to_their_first_lines_within_their_share(tokenizer, budget):
    """Beside a document, attached files get half the room the bare prompt leaves (the document's
    window the rest); in order, each whole or its first lines, and the label says which."""
    fmt = format_for(tokenizer)
    text = numbered_file(400)
    about = dict(text=text, start=text.index("line_200 ="), end=text.index("line_201 ="), path="a.py", language="python")
    other = numbered_file(300).replace("line_", "other_")
    question = [Message("user", "Why?")]
    selected = "line_200 = 200  # filler text\n"  # the prompt without the file around it
    bare = chat_prompt(fmt, system="s", budget=budget, messages=question, text=selected, path="a.py", language="python",
                       start=0, end=len(selected))
    prompt = chat_prompt(fmt, system="s", budget=budget, messages=question, references=[Reference(other, "b.py", "python"),
                         Reference("small = 1\n", "c.py", "python")], **about)
    assert len(prompt.ids) <= budget and prompt.ids == fmt.encode_dialogue(prompt.messages)
    shown, small = prompt.reference_lines
    turn = prompt.messages[1].content
    assert 0 < shown < 300 and f"File: `b.py` (python), lines 1-{shown} of 300\n" in turn
    assert f"other_{shown - 1} = " in turn and f"other_{shown} = " not in turn
    assert small == 0 and "c.py" not in turn  # the first file took the whole share
    lines_shown = prompt.lines_before + prompt.lines_after
    assert lines_shown > 0  # the document's window kept the other half
    refs_tokens = len(fmt.encode_text("\n".join(f"other_{i} = {i}  # filler text" for i in range(shown))))
    half = (budget - len(bare.ids) - QUESTION_ROOM) // 2
    assert half - 40 <= refs_tokens <= half
    # without a document they may take all of it
    alone = chat_prompt(fmt, system="s", budget=budget, messages=question, references=[Reference(other, "b.py", "python")])
    assert alone.reference_lines[0] > shown and len(alone.ids) <= budget


@pytest.mark.parametrize("beside", [False, True])
def test_an_attached_file_cut_to_fit_is_cut_the_same_from_turn_to_turn(tokenizer, beside):
    """A file attached to a conversation that fits only in part: from the second turn it gets
    what it got at the first less the room kept for the later turns (HISTORY_ROOM, doubled as
    they grow), so it shows the same lines from turn to turn and each prompt starts with the
    last one and its answer; it loses lines only when the reserve grows. (Before, it lost a few
    lines at every turn, and the engine computed the whole history again each time.)"""
    fmt = format_for(tokenizer)
    other = numbered_file(2000).replace("line_", "other_")
    text = numbered_file(20)
    about = dict(text=text, start=text.index("line_5 ="), end=text.index("line_6 ="), path="a.py", language="python") \
        if beside else {}
    answer = "It assigns a number to each name and keeps a note beside it. " * 6
    turns = [Message("user", "What is in this file?")]
    prompts = []
    for i in range(10):
        prompts.append(chat_prompt(fmt, system="s", budget=6000, messages=turns, references=[Reference(other, "b.py", "python")],
                                   **about))
        turns += [Message("assistant", answer), Message("user", f"And question {i}?" + " Please." * (i % 3))]
    shown = [p.reference_lines[0] for p in prompts]
    assert all(0 < n < 2000 for n in shown) and all(len(p.ids) <= 6000 for p in prompts)
    assert all(later <= earlier for earlier, later in zip(shown, shown[1:]))
    assert len(set(shown[1:])) <= 3, shown  # the first turn's cut, then one per reserve step
    kept_whole = sum(a == b and common_prefix(p.ids, q.ids) >= len(p.ids) - 3
                     for a, b, p, q in zip(shown, shown[1:], prompts, prompts[1:]))
    assert kept_whole >= 6, shown
    assert shown[-1] > shown[0] // 2  # still most of it after ten turns


def test_a_huge_attached_file_costs_only_what_can_fit(tokenizer):
    fmt = format_for(tokenizer)
    huge = numbered_file(200_000)
    prompt = chat_prompt(fmt, system="s", budget=500, messages=[Message("user", "Why?")], references=[Reference(huge, "big.py")])
    assert 0 < prompt.reference_lines[0] < 100 and f"of 200000" in prompt.messages[1].content


@pytest.mark.parametrize("eol", ["\n", "\r\n"])
@pytest.mark.parametrize("budget", [160, 400, 3000])
def test_the_prompt_says_which_lines_of_the_document_it_shows(tokenizer, budget, eol):
    """``context_lines`` names exactly the lines of the file whose text the prompt holds, for
    selections that start and end mid-line or on a line's start, an empty one and none."""
    fmt = format_for(tokenizer)
    text = numbered_file(120, eol)
    line = lambda i: text.index(f"line_{i} =")  # noqa: E731
    cases = {
        "mid-line": (text.index("= 60  #"), text.index("filler", line(62))),
        "whole lines": (line(60), line(63)),
        "empty": (text.index("= 60  #"),) * 2,
        "none": (0, 0),
        "last line": (line(119), len(text)),
    }
    for name, (start, end) in cases.items():
        for history in ([], [Message("user", "What is it?"), Message("assistant", "Numbers " * 30)]):
            prompt = chat_prompt(fmt, system="s", budget=budget, messages=[*history, Message("user", "Why?")],
                                 text=text, start=start, end=end, path="a.py", language="python")
            first, stop = prompt.context_lines
            shown = [i for i in range(120) if f"= {i}  #" in prompt.messages[1].content]
            assert shown == list(range(first, stop)), (name, len(history))
            assert (first, stop) == (0, 120) or not prompt.whole_file
    whole = chat_prompt(fmt, system="s", budget=3000, messages=[Message("user", "Why?")], text=numbered_file(5),
                        start=0, end=0, path="a.py", language="python")
    assert whole.whole_file and whole.context_lines == (0, 5)
    assert chat_prompt(fmt, system="s", budget=300, messages=[Message("user", "Why?")]).context_lines is None
