"""A chat about one function of a file too long to fit the prompt, and a chat with such a file
attached (about no document): how many prompt tokens each turn shares with the previous turn's
prompt (an engine that keeps its cache computes only the rest). Pure prompt building, no model.

    python bench/conversation_prompts.py [--tokenizer PATH] [--turns 12] [--budget 7936] [--out FILE]

The tokenizer defaults to the test model's (built if needed); StarChat's own gives the real
counts. Prints a table and writes JSON (bench/results/conversation-prompts-<date>.json by default).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lsp_server.config import Settings  # noqa: E402
from lsp_server.engine.base import common_prefix  # noqa: E402
from lsp_server.prompts import Message, Reference, format_for  # noqa: E402
from lsp_server.prompts.requests import chat_prompt  # noqa: E402

ANSWER = "This function multiplies x by a constant and adds a small offset; " * 8  # about 130 tokens


def measure(tokenizer, turns: int, budget: int, functions: int = 1500, attached: bool = False) -> dict:
    """``turns`` turns about the middle function of a file of ``functions`` small functions
    (``attached``: about that file attached to a chat about no document), each answer
    ``ANSWER``: per turn, its prompt's tokens, how many it shares with the previous prompt, and
    the first line and the number of lines of the file it shows."""
    fmt = format_for(tokenizer)
    text = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n\n" for i in range(functions))
    middle = functions // 2
    if attached:
        about = dict(references=[Reference(text, "module.py", "python")])
    else:
        about = dict(text=text, start=text.index(f"def f{middle}("), end=text.index(f"def f{middle + 1}("), path="module.py",
                     language="python")
    messages = [Message("user", "What does this function do?")]
    rows, previous = [], None
    for turn in range(1, turns + 1):
        prompt = chat_prompt(fmt, system=Settings().system_prompt, budget=budget, messages=messages, **about)
        shared = common_prefix(previous, prompt.ids) if previous is not None else 0
        window = prompt.messages[1].content.split("```python\n", 1)[1].splitlines()
        lines = prompt.reference_lines[0] if attached else prompt.lines_before + prompt.lines_after
        rows.append({"turn": turn, "prompt_tokens": len(prompt.ids), "shared_with_previous": shared,
                     "computed": len(prompt.ids) - shared, "window_first_line": window[0], "window_lines": lines})
        previous = prompt.ids
        messages += [Message("assistant", ANSWER), Message("user", f"And question {turn}?")]
    later = rows[1:]
    return {"budget": budget, "turns": rows, "computed_after_the_first_turn": sum(r["computed"] for r in later)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", help="tokenizer folder or hub id (default: the test model's)")
    parser.add_argument("--turns", type=int, default=12)
    parser.add_argument("--budget", type=int, default=7936, help="prompt tokens (StarChat: 8192 - maxNewTokens 256)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    source = args.tokenizer
    if source is None:
        from lsp_server.testing.tiny_model import build

        source = str(build(REPO / ".test-model"))
    tokenizer = AutoTokenizer.from_pretrained(source)
    figures = measure(tokenizer, args.turns, args.budget)
    figures["attached"] = measure(tokenizer, args.turns, args.budget, attached=True)
    for title, case in (("about the file", figures), ("the file attached", figures["attached"])):
        print(f"{title}:\n{'turn':>4}{'prompt':>8}{'shared':>8}{'computed':>10}  file shown")
        for r in case["turns"]:
            print(f"{r['turn']:>4}{r['prompt_tokens']:>8}{r['shared_with_previous']:>8}{r['computed']:>10}  "
                  f"{r['window_lines']} lines from {r['window_first_line']}")
        print(f"computed in turns 2-{args.turns}: {case['computed_after_the_first_turn']} tokens")
    date = datetime.date.today().isoformat()
    out = args.out or REPO / "bench" / "results" / f"conversation-prompts-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": date, "tokenizer": source, **figures}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
