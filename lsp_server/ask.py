"""``starchat-lsp ask FILE[:START-END] "question" [--with OTHER[:START-END] ...]``: the server's
prompt builder and engine, from a terminal, streaming the answer to stdout."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from .config import Settings
from .engine import EngineError, Sampling, StreamDecoder, load_engine
from .prompts import Prompt, PromptTooLong, Reference, Task, format_for
from .prompts.requests import code_prompt, prompt_budget, selection_offsets
from .text import Pos, Span, line_count, split_lines

LANGUAGES = {".py": "python", ".js": "javascript", ".ts": "typescript", ".go": "go", ".rs": "rust", ".java": "java",
             ".c": "c", ".h": "c", ".cpp": "cpp", ".cs": "csharp", ".rb": "ruby", ".lua": "lua", ".sh": "shellscript"}


def parse_target(target: str) -> tuple[Path, tuple[int, int] | None]:
    """``file.py`` or ``file.py:3-8`` (1-based, inclusive) or ``file.py:5``."""
    path, _, lines = target.rpartition(":")
    if path and lines and all(part.isdigit() for part in lines.split("-", 1)):
        first, _, last = lines.partition("-")
        return Path(path), (int(first), int(last or first))
    return Path(target), None


def _name(path: Path) -> str:
    """The file's name in the prompt: its path from the current folder when it is under it."""
    try:
        return path.resolve().relative_to(Path.cwd()).as_posix()
    except ValueError:
        return path.name


class _BadTarget(Exception):
    pass


def _read(target: str) -> tuple[Path, str, tuple[int, int] | None]:
    path, lines = parse_target(target)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise _BadTarget(f"starchat-lsp ask: cannot read {path}: {exc.strerror}") from None
    if lines is not None and not 1 <= lines[0] <= lines[1]:
        raise _BadTarget(f"starchat-lsp ask: bad line range {lines[0]}-{lines[1]}")
    return path, text, lines


def _span(text: str, lines: tuple[int, int] | None) -> Span:
    return Span(Pos(lines[0] - 1, 0), Pos(lines[1], 0)) if lines else Span(Pos(0, 0), Pos(len(split_lines(text)), 0))


def _shown_in_part(prompt: Prompt, name: str, text: str, references: list[Reference]) -> str:
    """What the prompt shows of the files too long for it ("calc.py lines 120-360 of 2000"), or ""."""
    parts = []
    if not prompt.whole_file and prompt.context_lines is not None:
        first, stop = prompt.context_lines
        parts.append(f"{name} lines {first + 1}-{stop} of {line_count(text)}")
    for ref, shown in zip(references, prompt.reference_lines):
        total = line_count(ref.text)
        if not shown and total:
            parts.append(f"{ref.path} left out")
        elif shown < total:
            first = ref.first_line + 1
            asked = f"of {total}" if ref.whole else f"of {first}-{first + total - 1}"
            parts.append(f"{ref.path} lines {first}-{first + shown - 1} {asked}")
    return "; ".join(parts)


def run_ask(args: argparse.Namespace, settings: Settings) -> int:
    try:
        path, text, lines = _read(args.target)
        references = []
        for target in args.with_files:
            other, other_text, other_lines = _read(target)
            begin, finish = selection_offsets(other_text, _span(other_text, other_lines))
            references.append(Reference(other_text[begin:finish], _name(other), LANGUAGES.get(other.suffix, ""),
                                        first_line=other_lines[0] - 1 if other_lines else 0, whole=other_lines is None))
    except _BadTarget as exc:
        print(exc, file=sys.stderr)
        return 2
    task = Task(args.task) if args.task else (Task.ASK if args.question else Task.EXPLAIN)
    start, end = selection_offsets(text, _span(text, lines))
    try:
        engine = load_engine(settings, lambda message: print(message, file=sys.stderr))
        prompt = code_prompt(
            format_for(engine.tokenizer),
            system=settings.system_prompt,
            budget=prompt_budget(settings.context_window, engine.context_window, settings.max_new_tokens),
            text=text,
            start=start,
            end=end,
            task=task,
            question=args.question,
            path=_name(path),
            language=LANGUAGES.get(path.suffix, ""),
            references=references,
        )
    except (EngineError, PromptTooLong, ValueError) as exc:
        print(f"starchat-lsp ask: {exc}", file=sys.stderr)
        return 1
    if cut := _shown_in_part(prompt, _name(path), text, references):
        print(f"starchat-lsp ask: too long for the prompt, the model sees {cut}", file=sys.stderr)

    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())  # Ctrl-C stops the decoding loop
    decoder = StreamDecoder(engine.tokenizer)

    def on_token(token: int) -> None:
        sys.stdout.write(decoder.push(token))
        sys.stdout.flush()

    _, reason = engine.generate(prompt.ids, Sampling.from_settings(settings), stop.is_set, on_token)
    sys.stdout.write(decoder.flush() + "\n")
    if reason != "stop":
        print(f"[{reason}]", file=sys.stderr)
    return 0
