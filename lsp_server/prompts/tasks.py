"""What each action asks the model (pure)."""

from __future__ import annotations

from enum import Enum
from typing import Sequence


class Task(str, Enum):
    EXPLAIN = "explain"
    FIX = "fix"
    DOCUMENT = "document"
    TESTS = "tests"
    OPTIMIZE = "optimize"
    ASK = "ask"
    HOVER = "hover"

    @property
    def title(self) -> str:
        return _TITLES[self]

    @property
    def edits_code(self) -> bool:
        return self in (Task.FIX, Task.DOCUMENT, Task.TESTS, Task.OPTIMIZE)


_TITLES = {
    Task.EXPLAIN: "Explain",
    Task.FIX: "Fix",
    Task.DOCUMENT: "Document",
    Task.TESTS: "Write tests",
    Task.OPTIMIZE: "Optimize",
    Task.ASK: "Ask",
    Task.HOVER: "Hover",
}

_INSTRUCTIONS = {
    Task.EXPLAIN: "Explain what the selected code does.",
    Task.FIX: "Fix the bugs in the selected code. Reply with the corrected code in one code block.",
    Task.DOCUMENT: (
        "Write a documentation comment for the selected code, in the language's usual style. "
        "Reply with only the comment in one code block."
    ),
    Task.TESTS: "Write unit tests for the selected code. Reply with the test code in one code block.",
    Task.OPTIMIZE: (
        "Make the selected code faster and simpler without changing what it does. "
        "Reply with the new code in one code block."
    ),
    Task.HOVER: "In one or two sentences, explain what `{symbol}` is and does in the selected code.",
}


MAX_PROBLEMS = 5
MAX_PROBLEM_CHARS = 300


def instruction(task: Task, question: str = "", symbol: str = "", problems: Sequence[str] = ()) -> str:
    """What the user turn asks. ``problems`` (Fix only): what the editor reports in the
    selection (its diagnostics), so that the model fixes the error the user sees."""
    if task is Task.ASK:
        if not question.strip():
            raise ValueError("Ask needs a question")
        return question.strip()
    text = _INSTRUCTIONS[task].format(symbol=symbol)
    if task is Task.FIX and problems:
        listed = "\n".join(f"- {_one_line(problem)}" for problem in problems[:MAX_PROBLEMS])
        first, _, rest = text.partition(" Reply")
        text = f"{first}\nThe editor reports:\n{listed}\nReply{rest}"
    return text


def _one_line(problem: str) -> str:
    problem = " ".join(problem.split())
    return problem if len(problem) <= MAX_PROBLEM_CHARS else problem[: MAX_PROBLEM_CHARS - 1] + "…"
