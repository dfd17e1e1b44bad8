"""The generate() engine keeps the KV caches of its last requests and hands the part a new
prompt shares most with back to transformers' ``generate()``: the answers are the ones a fresh
``generate()`` gives, and ``on_prompt`` says how much of the prompt was not computed again.
(On the trained test model, CPU, float32.)"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from lsp_server.config import Settings  # noqa: E402
from lsp_server.engine.base import Sampling  # noqa: E402
from lsp_server.prompts import Message, Task, format_for  # noqa: E402
from lsp_server.prompts.requests import chat_prompt, code_prompt, selection_offsets  # noqa: E402
from lsp_server.testing import scenarios as sc  # noqa: E402

GREEDY = Sampling(max_new_tokens=40, temperature=0.0)


@pytest.fixture(scope="module")
def model(test_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(test_model, dtype=torch.float32).eval()


@pytest.fixture
def engine(model, tokenizer):
    from lsp_server.engine.local import TransformersEngine

    return TransformersEngine(model, tokenizer, "cpu", "test model")


@pytest.fixture(scope="module")
def prompts(tokenizer):
    fmt, system = format_for(tokenizer), Settings().system_prompt

    def code(task, span):
        start, end = selection_offsets(sc.CALC_PY, span)
        return code_prompt(fmt, system=system, budget=1500, text=sc.CALC_PY, start=start, end=end, task=task,
                           path="calc.py", language=sc.LANGUAGE).ids

    def chat(*turns):
        return chat_prompt(fmt, system=system, budget=1500, messages=[Message(r, c) for r, c in turns]).ids

    return {
        "fix": code(Task.FIX, sc.AVERAGE),
        "optimize": code(Task.OPTIMIZE, sc.AREA),
        "chat": chat(("user", sc.CHAT_QUESTION)),
        "follow-up": chat(("user", sc.CHAT_QUESTION), ("assistant", sc.CHAT_ANSWER), ("user", sc.CHAT_FOLLOW_UP)),
    }


def run(engine, prompt, stop_after: int | None = None):
    reused: list[int] = []
    got: list[int] = []
    ids, reason = engine.generate(prompt, GREEDY, lambda: stop_after is not None and len(got) >= stop_after, got.append,
                                  on_prompt=reused.append)
    assert len(reused) == 1
    return ids, reused[0]


def reference(model, engine, prompt) -> list[int]:
    """transformers' generate() alone, greedy, with no cache handed in."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=GREEDY.max_new_tokens, do_sample=False, eos_token_id=engine.stop_ids,
                             pad_token_id=engine.stop_ids[0])
    return [t for t in out[0, len(prompt):].tolist() if t not in engine.stop_ids]


def test_a_prompt_on_the_same_file_computes_only_what_follows_it(engine, model, tokenizer, prompts):
    fix, optimize = prompts["fix"], prompts["optimize"]
    ids, reused = run(engine, fix)
    assert reused == 0 and tokenizer.decode(ids) == sc.FIX_ANSWER
    shared = next(i for i, (a, b) in enumerate(zip(fix, optimize)) if a != b)
    assert "def area" in tokenizer.decode(optimize[:shared])  # the whole file comes before the task
    ids, reused = run(engine, optimize)
    assert reused == shared
    assert ids == reference(model, engine, optimize) and tokenizer.decode(ids) == sc.OPTIMIZE_ANSWER
    # the same prompt again: all but its last token
    assert run(engine, optimize) == (ids, len(optimize) - 1)


def test_a_chats_next_turn_reuses_the_last_turn_and_its_answer(engine, model, tokenizer, prompts):
    ids, reused = run(engine, prompts["chat"])
    assert tokenizer.decode(ids) == sc.CHAT_ANSWER
    ids, reused = run(engine, prompts["follow-up"])
    assert reused >= len(prompts["chat"]) + len(tokenizer(sc.CHAT_ANSWER)["input_ids"])
    assert ids == reference(model, engine, prompts["follow-up"])
    assert tokenizer.decode(ids) == sc.CHAT_FOLLOW_UP_ANSWER


def test_after_a_cancelled_request_the_cache_still_gives_the_right_answer(engine, model, tokenizer, prompts):
    ids, _ = run(engine, prompts["fix"], stop_after=3)
    assert 3 <= len(ids) < len(tokenizer(sc.FIX_ANSWER)["input_ids"])
    ids, reused = run(engine, prompts["fix"])  # the cache holds the prompt and the three tokens
    assert reused == len(prompts["fix"]) - 1
    assert tokenizer.decode(ids) == sc.FIX_ANSWER
    ids, reused = run(engine, prompts["optimize"])
    assert 0 < reused < len(prompts["optimize"]) and ids == reference(model, engine, prompts["optimize"])


def test_a_request_in_between_leaves_the_conversation_its_cache(engine, model, tokenizer, prompts):
    """A hover or a Fix between two chat turns: the next turn still computes only its question."""
    run(engine, prompts["chat"])
    _, reused = run(engine, prompts["fix"])
    assert 0 < reused < len(prompts["chat"])  # the system prompt, from a copy of the chat's cache
    ids, reused = run(engine, prompts["follow-up"])
    assert reused >= len(prompts["chat"]) + len(tokenizer(sc.CHAT_ANSWER)["input_ids"])
    assert ids == reference(model, engine, prompts["follow-up"])


def test_a_cache_shared_in_part_stays_whole_for_its_own_prompt(engine, model, tokenizer, prompts):
    fix, optimize = prompts["fix"], prompts["optimize"]
    run(engine, fix)
    ids, reused = run(engine, optimize)  # the file, from the Fix's cache
    assert 0 < reused < len(fix) - 1 and tokenizer.decode(ids) == sc.OPTIMIZE_ANSWER
    ids, reused = run(engine, fix)
    assert reused == len(fix) - 1 and tokenizer.decode(ids) == sc.FIX_ANSWER
    # the second Fix continued the first one's cache: one cache for both, and the Optimize's
    assert len(engine._kept) == 2


def test_the_oldest_cache_goes_past_the_limit(engine, monkeypatch, prompts):
    from lsp_server.engine import local

    monkeypatch.setattr(local, "KEPT_CACHES", 2)
    fix = prompts["fix"]
    run(engine, fix)
    run(engine, prompts["optimize"])
    assert run(engine, fix)[1] == len(fix) - 1  # still kept
    run(engine, prompts["optimize"])
    run(engine, prompts["chat"])  # the optimize and the chat are now the two kept
    assert len(engine._kept) == 2
    assert run(engine, fix)[1] < len(fix) - 1


def test_older_caches_go_past_the_size_limit(engine, monkeypatch, prompts):
    from lsp_server.engine import local

    run(engine, prompts["fix"])
    size = sum(layer.keys.nbytes + layer.values.nbytes for layer in engine._kept[0][1].layers)
    monkeypatch.setattr(local, "KEPT_BYTES", size + 1)
    run(engine, prompts["chat"])
    assert len(engine._kept) == 1  # the newest stays, whatever its size
    monkeypatch.setattr(local, "KEPT_BYTES", 100 * size)
    run(engine, prompts["fix"])
    assert len(engine._kept) == 2


def test_no_memory_to_copy_a_kept_cache_computes_the_whole_prompt(engine, monkeypatch, tokenizer, prompts):
    from lsp_server.engine.local import TransformersEngine

    run(engine, prompts["fix"])

    def out_of_memory(self, prompt_ids):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(TransformersEngine, "_cache_for", out_of_memory)
    ids, reused = run(engine, prompts["optimize"])
    assert reused == 0 and tokenizer.decode(ids) == sc.OPTIMIZE_ANSWER


def test_out_of_memory_frees_the_kept_caches_and_tries_once_more(engine, monkeypatch, tokenizer, prompts):
    """The kept caches take GPU memory a request may need: when it runs out before its first
    token, they go and the request starts again from scratch, once."""
    from lsp_server.engine.base import EngineError

    run(engine, prompts["fix"])
    real, calls = engine.model.generate, []

    def generate(*args, fail=1, **kwargs):
        calls.append(kwargs.get(engine._cache_name) is not None)
        if len(calls) <= fail:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.model, "generate", generate)
    ids, reused = run(engine, prompts["optimize"])
    assert calls == [True, False] and reused == 0 and tokenizer.decode(ids) == sc.OPTIMIZE_ANSWER
    assert len(engine._kept) == 1 and engine._kept[0][0][: len(prompts["optimize"])] == prompts["optimize"]  # the Fix's went
    calls.clear()
    monkeypatch.setattr(engine.model, "generate", lambda *a, **k: generate(*a, fail=2, **k))
    with pytest.raises(EngineError, match="ran out of memory"):
        run(engine, prompts["fix"])
    assert calls == [True, False] and engine._kept == []


def document_prefix_of(tokenizer):
    from lsp_server.prompts.requests import document_prefix

    return document_prefix(format_for(tokenizer), system=Settings().system_prompt, budget=1500, text=sc.CALC_PY,
                           path="calc.py", language=sc.LANGUAGE)


def test_a_warm_up_computes_the_files_prefix_for_the_requests_on_it(engine, model, tokenizer, prompts, monkeypatch):
    """warm(): the prefix every prompt on the file starts with, computed ahead (in chunks of
    WARM_CHUNK tokens) and kept; the requests on the file compute only what follows it and
    answer as a fresh generate() does. Stopped between chunks, it keeps what it computed."""
    from lsp_server.engine import local

    prefix = document_prefix_of(tokenizer)
    assert prompts["fix"][: len(prefix)] == prefix and prompts["optimize"][: len(prefix)] == prefix
    monkeypatch.setattr(local, "WARM_CHUNK", 16)
    chunks = []
    # stopped before its third chunk (the first look is before any work)
    assert engine.warm(prefix, lambda: len(chunks.append(1) or chunks) > 3) == (32, 32)
    # stopped once it has taken that cache, before computing more: the cache stays kept
    looks = []
    assert engine.warm(prefix, lambda: len(looks.append(1) or looks) > 1) == (32, 0)
    assert engine.warm(prefix, lambda: False) == (len(prefix), len(prefix) - 32)  # from where it stopped
    assert engine.warm(prefix, lambda: False) == (len(prefix), 0)  # held already
    ids, reused = run(engine, prompts["fix"])
    assert reused == len(prefix) and ids == reference(model, engine, prompts["fix"])
    ids, reused = run(engine, prompts["optimize"])
    assert reused >= len(prefix) and ids == reference(model, engine, prompts["optimize"])


def test_a_warm_up_never_takes_the_place_of_a_requests_cache(engine, tokenizer, prompts, monkeypatch):
    """Past the limit, a hover's cache goes before an older explicit request's, and a warm-up's
    before both; a warm-up that would drop an explicit request's cache computes nothing."""
    from lsp_server.engine import local
    from lsp_server.engine.worker import Priority

    monkeypatch.setattr(local, "KEPT_CACHES", 2)
    edited = document_prefix_of(tokenizer)[:-4] + [1, 2, 3]  # the file's prefix after an edit
    run(engine, prompts["chat"])
    run(engine, prompts["optimize"])
    assert engine.warm(edited, lambda: False) == (0, 0) and len(engine._kept) == 2
    engine.generate(prompts["fix"], GREEDY, lambda: False, lambda _: None, priority=int(Priority.HOVER))
    assert [p for _, _, p in engine._kept] == [Priority.HOVER, Priority.USER]  # the older chat went
    assert engine.warm(edited, lambda: False) == (len(edited), 3)  # in place of the hover's
    assert [p for _, _, p in engine._kept] == [Priority.BACKGROUND, Priority.USER]
    run(engine, prompts["chat"])
    assert [p for _, _, p in engine._kept] == [Priority.USER, Priority.USER]  # the warm-up's went first


def test_a_warm_up_that_would_not_fit_beside_the_requests_caches_computes_nothing(engine, tokenizer, prompts, monkeypatch):
    """Room is counted in bytes too (at the kept caches' bytes per token): a warm-up whose
    cache would push an explicit request's out is not computed."""
    from lsp_server.engine import local

    run(engine, prompts["chat"])
    size = local._size(engine._kept[0][1])
    monkeypatch.setattr(local, "KEPT_BYTES", size + size // 4)
    prefix = document_prefix_of(tokenizer)
    assert engine.warm(prefix, lambda: False) == (0, 0) and len(engine._kept) == 1
    monkeypatch.setattr(local, "KEPT_BYTES", 100 * size)
    assert engine.warm(prefix, lambda: False)[1] > 0 and len(engine._kept) == 2


def test_a_warm_up_out_of_memory_keeps_nothing_half_computed(engine, tokenizer, prompts, monkeypatch):
    from lsp_server.engine import local

    monkeypatch.setattr(local, "WARM_CHUNK", 16)
    real, calls = engine.model.forward, []

    def forward(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.model, "forward", forward)
    prefix = document_prefix_of(tokenizer)
    assert engine.warm(prefix, lambda: False) == (0, 0) and engine._kept == []
    monkeypatch.setattr(engine.model, "forward", real)
    ids, reused = run(engine, prompts["fix"])
    assert reused == 0 and tokenizer.decode(ids) == sc.FIX_ANSWER
