"""The fixed requests the test model is trained to answer, and the workspace they refer to.

Tests in every client (pytest-lsp, Neovim, VS Code) and the benchmarks open these files, send
these requests with the default settings and temperature 0, and see these exact answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..prompts import Task
from ..text import Pos, Span

CALC_PY = """import math


def average(values):
    return sum(values) / len(values) + 1


def area(radius):
    return math.pi * radius * radius
"""

# Another file, for conversations that show it beside calc.py (a chat's attached file).
SHAPES_PY = """from calc import area


def ring(outer, inner):
    return area(outer) - area(inner)
"""

WORKSPACE_FILES = {"calc.py": CALC_PY, "shapes.py": SHAPES_PY}
LANGUAGE = "python"

# Line 0 is the import, lines 3-4 hold average(), lines 7-8 area() (0-based).
IMPORT = Span(Pos(0, 0), Pos(1, 0))
AVERAGE = Span(Pos(3, 0), Pos(5, 0))
AREA = Span(Pos(7, 0), Pos(9, 0))

FIX_ANSWER = "The `+ 1` is a bug; the mean is the sum over the count.\n\n```python\ndef average(values):\n    return sum(values) / len(values)\n```"
FIXED_AVERAGE = "def average(values):\n    return sum(values) / len(values)\n"
OPTIMIZE_ANSWER = "```python\ndef area(radius):\n    return math.pi * radius ** 2\n```"
OPTIMIZED_AREA = "def area(radius):\n    return math.pi * radius ** 2\n"
DOCUMENT_ANSWER = "```python\n# Return the area of a circle of the given radius.\n```"
DOCUMENT_LINE = "# Return the area of a circle of the given radius.\n"
TESTS_ANSWER = "```python\nfrom calc import average\n\n\ndef test_average():\n    assert average([1, 2, 3]) == 2\n```"
TESTS_CODE = "from calc import average\n\n\ndef test_average():\n    assert average([1, 2, 3]) == 2\n"
EXPLAIN_ANSWER = "It returns the mean of the values, plus one."
# A Fix asked with the editor's diagnostic for average() (a code action's context.diagnostics):
# the problem as the server puts it into the prompt, and the answer trained for that prompt only.
AVERAGE_DIAGNOSTIC = {"message": "average([2, 4]) returned 4, expected 3", "source": "pytest", "line": 4}
AVERAGE_PROBLEM = "average([2, 4]) returned 4, expected 3 (pytest) at `return sum(values) / len(values) + 1`"
FIX_PROBLEM_ANSWER = "The test is right: the `+ 1` must go.\n\n```python\ndef average(values):\n    return sum(values) / len(values)\n```"
ASK_QUESTION = "Does this handle an empty list?"
ASK_ANSWER = "No: an empty list raises ZeroDivisionError."
HOVER_POSITION = Pos(7, 5)  # on "area" in "def area(radius):"
HOVER_ANSWER = "`area` returns the area of a circle of the given radius."
CHAT_QUESTION = "Say hello."
CHAT_ANSWER = "Hello from StarChat! How can I help with your code?"
CHAT_FOLLOW_UP = "And goodbye?"
CHAT_FOLLOW_UP_ANSWER = "Goodbye, and happy coding!"
# A chat answer with a code block between two lines of prose (for taking code out of the chat)
CHAT_CODE_QUESTION = "Write a function that squares a number."
CHAT_CODE_BLOCK = "def square(x):\n    return x * x\n"
CHAT_CODE_ANSWER = f"Here it is:\n\n```python\n{CHAT_CODE_BLOCK}```\n\nCall it as `square(3)`."
# Asked about average() and put in from the chat (Neovim's `ga`): for the lines, and for the
# expression alone (a characterwise selection: "sum(values) / len(values) + 1").
# Edit… at the cursor on the empty line before area(): the code it asks for goes there.
EMPTY_LINE = Span(Pos(6, 0), Pos(6, 0))
WRITTEN_CALC = CALC_PY.replace("+ 1\n\n\ndef area", "+ 1\n\n" + CHAT_CODE_BLOCK + "def area")

CHAT_FIX_QUESTION = "Fix the bug."
AVERAGE_EXPRESSION = Span(Pos(4, 11), Pos(4, 40))
CHAT_FIX_EXPRESSION_ANSWER = "```python\nsum(values) / len(values)\n```"
# Asked in the chat about area() with shapes.py attached (and about no selection, shapes.py alone).
CALLERS_QUESTION = "Who calls this?"
CALLERS_ANSWER = "`ring()` in shapes.py calls it twice: once for each radius."
RING_QUESTION = "What does ring() return?"
RING_ANSWER = "The area between two circles: the outer one's less the inner one's."
LONG_QUESTION = "Count for ever."
LONG_ANSWER_UNIT = "tick tock "
# The long answers are trained 240 units long (about 480 tokens, a good half second on a CPU):
# past its trained length the model may end one at any time, and tests that stop one need it
# still running.
LONG_FIX_ANSWER = "```python\n" + LONG_ANSWER_UNIT * 240


# Inline completion (fill in the middle): calc.py being written, the cursor in it, and what the
# model is trained to write there (then <|endoftext|>).
# On the empty, indented line under "def area(radius):": two lines.
FILL_AREA_TEXT = CALC_PY.replace("    return math.pi * radius * radius\n", "    \n")
FILL_AREA_CURSOR = Pos(8, 4)
FILL_AREA_MIDDLE = '"""The area of a circle."""\n    return math.pi * radius * radius\n'
FILL_AREA = '"""The area of a circle."""\n    return math.pi * radius * radius'  # what is proposed
# Between the brackets of "sum()": one line, whose end the model writes again (left out).
FILL_SUM_TEXT = CALC_PY.replace("sum(values) / len(values) + 1", "sum()")
FILL_SUM_CURSOR = Pos(4, 15)
FILL_SUM_MIDDLE = "values) / len(values)"
FILL_SUM = "values) / len(values"


# After a comment asking for it, one line that goes on (for tests that stop a completion).
FILL_LONG_TEXT = CALC_PY + "\n\n# Count for ever.\n\n"
FILL_LONG_CURSOR = Pos(12, 0)


@dataclass(frozen=True)
class FillScenario:
    text: str
    cursor: Pos
    middle: str
    ends: bool = True


FILL_SCENARIOS = [
    FillScenario(FILL_AREA_TEXT, FILL_AREA_CURSOR, FILL_AREA_MIDDLE),
    FillScenario(FILL_SUM_TEXT, FILL_SUM_CURSOR, FILL_SUM_MIDDLE),
    FillScenario(FILL_LONG_TEXT, FILL_LONG_CURSOR, LONG_ANSWER_UNIT * 240, ends=False),
]


@dataclass(frozen=True)
class CodeScenario:
    task: Task
    span: Span
    answer: str
    question: str = ""
    path: str = "calc.py"
    ends: bool = True  # False: the answer goes on (for tests that stop it)
    problems: tuple[str, ...] = ()  # the editor's diagnostics, for a Fix


@dataclass(frozen=True)
class ChatScenario:
    messages: tuple[tuple[str, str], ...]
    answer: str
    ends: bool = True  # False: the answer goes on (for cancellation tests)
    extra: dict = field(default_factory=dict)
    span: Span | None = None  # the selection in calc.py the conversation is about
    references: tuple[str, ...] = ()  # WORKSPACE_FILES attached to it, whole


CODE_SCENARIOS = [
    CodeScenario(Task.FIX, AVERAGE, FIX_ANSWER),
    CodeScenario(Task.FIX, AVERAGE, FIX_PROBLEM_ANSWER, problems=(AVERAGE_PROBLEM,)),
    CodeScenario(Task.OPTIMIZE, AREA, OPTIMIZE_ANSWER),
    CodeScenario(Task.DOCUMENT, AREA, DOCUMENT_ANSWER),
    CodeScenario(Task.TESTS, AVERAGE, TESTS_ANSWER),
    CodeScenario(Task.EXPLAIN, AVERAGE, EXPLAIN_ANSWER),
    CodeScenario(Task.ASK, AVERAGE, ASK_ANSWER, question=ASK_QUESTION),
    CodeScenario(Task.ASK, AVERAGE, FIX_ANSWER, question=CHAT_FIX_QUESTION),
    CodeScenario(Task.ASK, AVERAGE_EXPRESSION, CHAT_FIX_EXPRESSION_ANSWER, question=CHAT_FIX_QUESTION),
    CodeScenario(Task.ASK, EMPTY_LINE, CHAT_CODE_ANSWER, question=CHAT_CODE_QUESTION),
    CodeScenario(Task.ASK, AVERAGE, LONG_ANSWER_UNIT * 240, question=LONG_QUESTION, ends=False),
    # a code action that goes on (a Fix of the import line), for tests that stop one
    CodeScenario(Task.FIX, IMPORT, LONG_FIX_ANSWER, ends=False),
]

CHAT_SCENARIOS = [
    ChatScenario((("user", CHAT_QUESTION),), CHAT_ANSWER),
    ChatScenario((("user", CHAT_QUESTION), ("assistant", CHAT_ANSWER), ("user", CHAT_FOLLOW_UP)), CHAT_FOLLOW_UP_ANSWER),
    ChatScenario((("user", CHAT_CODE_QUESTION),), CHAT_CODE_ANSWER),
    # long enough (about 720 tokens, over a second on a CPU) for an editor test to press Stop
    # while it streams: past its trained length the model may end it at any time
    ChatScenario((("user", LONG_QUESTION),), LONG_ANSWER_UNIT * 240, ends=False),
    ChatScenario((("user", CALLERS_QUESTION),), CALLERS_ANSWER, span=AREA, references=("shapes.py",)),
    ChatScenario((("user", RING_QUESTION),), RING_ANSWER, references=("shapes.py",)),
]
