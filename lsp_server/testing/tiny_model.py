"""Build the test model: a tiny GPTBigCode with StarChat's special tokens, trained on CPU in
seconds to give the fixed answers of :mod:`lsp_server.testing.scenarios`.

    starchat-lsp-testmodel DIR          (or: python -m lsp_server.testing.tiny_model DIR)

builds it into DIR (a normal transformers folder: config, safetensors weights, tokenizer) unless
DIR already holds a build of the same recipe. Tests, editor tests and benchmarks all use it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path

from ..config import Settings
from ..prompts import Message, Reference, Task, format_for, instruction
from ..prompts.fill import fill_format, fill_prompt
from ..prompts.requests import chat_prompt, code_prompt, hover_prompt, prompt_budget, selection_offsets
from ..text import Pos, Span, offset_at, split_lines, strip_eol
from . import scenarios as sc

log = logging.getLogger(__name__)

RECIPE_VERSION = 4
CONTEXT_WINDOW = 2048
STAMP = "starchat-test-model.json"
SPECIAL_TOKENS = ["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"]
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
EXTRA_CORPUS = """def add(a, b):\n    return a + b\n\nclass Stack:\n    def push(self, item):\n        self.items.append(item)\n
for i in range(10):\n    print(i)\n\nwhile True:\n    break\n\nimport os\nfrom typing import Any\n
Héllo wörld 你好世界 こんにちは 😀 🚀 café naïve\r\n"""


def recipe_fingerprint() -> str:
    """Changes whenever anything that shapes the training prompts or answers changes."""
    package = Path(__file__).resolve().parents[1]
    files = [Path(__file__), Path(sc.__file__), package / "config.py", package / "text.py", *sorted((package / "prompts").glob("*.py"))]
    source = "".join(f.read_text() for f in files)
    return hashlib.sha256(f"{RECIPE_VERSION}\n{source}".encode()).hexdigest()[:16]


def _build_tokenizer(corpus: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=900,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:] + CHAT_TOKENS,
        model_max_length=CONTEXT_WINDOW,
    )
    return tokenizer


def _spans(span: Span) -> list[Span]:
    """The selection as sent by different editors: up to the next line's start, or to the end of
    the last selected line (a cursor: as it is)."""
    if span.start == span.end:
        return [span]
    lines = split_lines(sc.CALC_PY)
    last = span.end.line - 1 if span.end.character == 0 else span.end.line
    return [span, Span(span.start, Pos(last, len(strip_eol(lines[last]))))]


def training_pairs(tokenizer) -> list[tuple[list[int], list[int], bool]]:
    """(prompt ids, answer ids, ends) for every scenario, built by the server's own prompt code."""
    fmt = format_for(tokenizer)
    settings = Settings()
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")

    def encode_answer(text: str, ends: bool) -> list[int]:
        return fmt.encode_text(text) + ([end_id] if ends else [])

    pairs = []
    for scenario in sc.CODE_SCENARIOS:
        for span in _spans(scenario.span):
            for path in (scenario.path, ""):
                start, end = selection_offsets(sc.CALC_PY, span)
                prompt = code_prompt(
                    fmt,
                    system=settings.system_prompt,
                    budget=prompt_budget(0, CONTEXT_WINDOW, settings.max_new_tokens),
                    text=sc.CALC_PY,
                    start=start,
                    end=end,
                    task=scenario.task,
                    question=scenario.question,
                    path=path,
                    language=sc.LANGUAGE,
                    problems=scenario.problems,
                )
                pairs.append((prompt.ids, encode_answer(scenario.answer, scenario.ends), scenario.ends))
    for path in ("calc.py", ""):
        lines = split_lines(sc.CALC_PY)
        hovered = hover_prompt(
            fmt,
            system=settings.system_prompt,
            budget=prompt_budget(0, CONTEXT_WINDOW, settings.hover_max_new_tokens),
            text=sc.CALC_PY,
            line_start=sum(len(line) for line in lines[: sc.HOVER_POSITION.line]),
            line=strip_eol(lines[sc.HOVER_POSITION.line]),
            position=sc.HOVER_POSITION,
            path=path,
            language=sc.LANGUAGE,
        )
        assert hovered is not None
        pairs.append((hovered[0].ids, encode_answer(sc.HOVER_ANSWER, True), True))
    for chat in sc.CHAT_SCENARIOS:
        messages = [Message(role, content) for role, content in chat.messages]  # type: ignore[arg-type]
        references = [Reference(sc.WORKSPACE_FILES[name], name, sc.LANGUAGE) for name in chat.references]
        about = [{}] if chat.span is None else [
            dict(text=sc.CALC_PY, start=start, end=end, path="calc.py", language=sc.LANGUAGE)
            for start, end in (selection_offsets(sc.CALC_PY, span) for span in _spans(chat.span))]
        for context in about:
            prompt = chat_prompt(fmt, system=settings.system_prompt, budget=prompt_budget(0, CONTEXT_WINDOW, settings.max_new_tokens),
                                 messages=messages, references=references, **context)
            pairs.append((prompt.ids, encode_answer(chat.answer, chat.ends), chat.ends))
    fill = fill_format(tokenizer)
    assert fill is not None
    fill_budget = min(prompt_budget(0, CONTEXT_WINDOW, settings.completion_max_new_tokens), settings.completion_context_tokens)
    for scenario in sc.FILL_SCENARIOS:
        offset = offset_at(split_lines(scenario.text), scenario.cursor)
        prompt = fill_prompt(fill, text=scenario.text, offset=offset, budget=fill_budget)
        ends = [tokenizer.eos_token_id] if scenario.ends else []
        pairs.append((prompt.ids, fmt.encode_text(scenario.middle) + ends, scenario.ends))
    return pairs


def _train(model, pairs, steps: int, seed: int = 0, group: int = 16) -> float:
    """Full-batch training, computed in groups of ``group`` pairs of similar length (each padded
    to its own longest, not to the longest of all: a few long answers then cost only their own
    rows). Each group's loss is weighted by its share of the answer tokens, so a step's gradient
    is the whole batch's mean, as if computed at once."""
    import torch

    torch.manual_seed(seed)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    batches = []
    for first in range(0, len(order), group):
        rows = [pairs[i] for i in order[first : first + group]]
        width = max(len(p) + len(a) for p, a, _ in rows)
        inputs = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, (prompt, answer, _) in enumerate(rows):
            seq = prompt + answer
            inputs[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
            labels[row, len(prompt) : len(seq)] = torch.tensor(answer)
        batches.append((inputs, mask, labels, int((labels != -100).sum())))
    total = sum(batch[3] for batch in batches)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    model.train()
    loss_value = float("nan")
    for _ in range(steps):
        optimizer.zero_grad()
        loss_value = 0.0
        for inputs, mask, labels, tokens in batches:
            loss = model(input_ids=inputs, attention_mask=mask, labels=labels).loss * (tokens / total)
            loss.backward()
            loss_value += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    model.eval()
    return loss_value


def _reproduces(model, tokenizer, pairs) -> list[int]:
    """Indices of the pairs whose answer greedy decoding does not reproduce exactly."""
    import torch

    wrong = []
    for index, (prompt, answer, _) in enumerate(pairs):
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
                max_new_tokens=len(answer),
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )
        if out[0, len(prompt) :].tolist() != answer:
            wrong.append(index)
    return wrong


def build(out_dir: Path, steps: int = 140, force: bool = False) -> Path:
    """The test model in ``out_dir``, built unless a build of the same recipe is there. Builds
    are serialised by a lock beside the folder and swapped in whole: processes that build at
    once (test runs in parallel) build once, and none reads a half-written model."""
    import fcntl
    import shutil

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    fingerprint = recipe_fingerprint()

    def built() -> bool:
        stamp = out_dir / STAMP
        return stamp.exists() and json.loads(stamp.read_text()).get("fingerprint") == fingerprint

    if not force and built():
        return out_dir
    with open(out_dir.parent / f"{out_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and built():  # another process built it while this one waited
            return out_dir
        building = out_dir.parent / f"{out_dir.name}.building-{os.getpid()}"
        shutil.rmtree(building, ignore_errors=True)
        _build_into(building, steps, fingerprint)
        old = out_dir.parent / f"{out_dir.name}.old-{os.getpid()}"
        if out_dir.exists():
            out_dir.rename(old)
        building.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    return out_dir


def _build_into(out_dir: Path, steps: int, fingerprint: str) -> None:
    import torch
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    started = time.monotonic()
    torch.manual_seed(0)
    corpus = [*sc.WORKSPACE_FILES.values(), EXTRA_CORPUS, Settings().system_prompt]
    corpus += [s.answer for s in sc.CODE_SCENARIOS] + [c.answer for c in sc.CHAT_SCENARIOS]
    corpus += [s.middle for s in sc.FILL_SCENARIOS]
    corpus += [m for c in sc.CHAT_SCENARIOS for _, m in c.messages]
    corpus += [instruction(task, question=sc.ASK_QUESTION, symbol="area") for task in Task]
    corpus += ["Selected code:", "Language: python", *(f"File: `{name}` (python)" for name in sc.WORKSPACE_FILES)]
    tokenizer = _build_tokenizer(corpus * 4)
    pairs = training_pairs(tokenizer)
    config = GPTBigCodeConfig(
        vocab_size=len(tokenizer),
        n_positions=CONTEXT_WINDOW,
        n_embd=128,
        n_layer=2,
        n_head=4,
        multi_query=True,
        bos_token_id=0,
        eos_token_id=0,
        attn_pdrop=0.0,
        embd_pdrop=0.0,
        resid_pdrop=0.0,
    )
    model = GPTBigCodeForCausalLM(config)
    loss = _train(model, pairs, steps)
    wrong = _reproduces(model, tokenizer, pairs)
    if wrong:
        loss = _train(model, pairs, steps // 2, seed=1)
        wrong = _reproduces(model, tokenizer, pairs)
    if wrong:
        raise RuntimeError(f"the test model did not learn scenarios {wrong} (final loss {loss:.4f})")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / STAMP).write_text(
        json.dumps(
            {"fingerprint": fingerprint, "loss": loss, "pairs": len(pairs), "seconds": round(time.monotonic() - started, 1)}
        )
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="starchat-lsp-testmodel", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder to build the model into")
    parser.add_argument("--force", action="store_true", help="rebuild even if DIR holds this recipe's build")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    started = time.monotonic()
    path = build(args.out_dir, force=args.force)
    print(f"test model ready in {path} ({time.monotonic() - started:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
