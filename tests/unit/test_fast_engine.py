"""The fast engine on the tiny test model (CPU, float32): greedy tokens equal transformers
``generate()``, alone and batched; cancellation frees the slot; prefix reuse prefills less and
changes nothing; seeded sampling is reproducible and top-k 1 is greedy; prompt-lookup
speculation gives the tokens plain decoding gives, in fewer steps.

The ``engine`` fixture speculates (the default) whenever a request runs alone, so most tests
here cover the speculative step; ``plain_engine`` never does."""

from __future__ import annotations

import threading
import time

import pytest

torch = pytest.importorskip("torch")

from lsp_server.engine.base import EngineError, Sampling, common_prefix  # noqa: E402
from lsp_server.engine.fast_setup import GEMV_CONFIGS  # noqa: E402
from lsp_server.engine.lookup import KnownAnswer  # noqa: E402
from lsp_server.testing import scenarios as sc  # noqa: E402

NEW = 24
GREEDY = Sampling(max_new_tokens=NEW, temperature=0.0)


@pytest.fixture(scope="module")
def hf_model(test_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(test_model, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def engine(hf_model, tokenizer):
    from lsp_server.engine.fast import FastEngine

    eng = FastEngine(hf_model, tokenizer, max_batch=4)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def plain_engine(hf_model, tokenizer):
    from lsp_server.engine.fast import FastEngine

    eng = FastEngine(hf_model, tokenizer, max_batch=2, speculate=0)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def copying_prompts(tokenizer):
    """Prompts whose trained answers copy from the prompt (Fix, Optimize) or from themselves
    (the endless "tick tock" chat answer)."""
    from lsp_server.testing.tiny_model import training_pairs

    pairs = training_pairs(tokenizer)
    fmt = lambda text: tokenizer.decode(text)  # noqa: E731
    fix = next(p for p, a, _ in pairs if fmt(a).startswith(sc.FIX_ANSWER[:20]))
    optimize = next(p for p, a, _ in pairs if fmt(a).startswith(sc.OPTIMIZE_ANSWER[:20]))
    ticking = next(p for p, _, ends in pairs if not ends)
    # a Fix prompt that does not start with the file ticking's starts with (no path: "Language:"),
    # for tests that need a prompt to be computed, not taken from the cache
    elsewhere = next(p for p, a, _ in pairs if fmt(a).startswith(sc.FIX_ANSWER[:20]) and common_prefix(p, ticking) < 32)
    return {"fix": fix, "optimize": optimize, "ticking": ticking, "fix_elsewhere": elsewhere}


@pytest.fixture(scope="module")
def prompts(tokenizer):
    from lsp_server.testing.tiny_model import training_pairs

    pairs = training_pairs(tokenizer)
    chosen = [pairs[0][0], pairs[3][0], pairs[-1][0], pairs[len(pairs) // 2][0]]
    chosen.append(tokenizer("def add(a, b):\n    return")["input_ids"])
    return chosen


def reference(model, stop_ids, prompt, new=NEW, penalty=1.0):
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
            max_new_tokens=new,
            do_sample=False,
            repetition_penalty=penalty,
            eos_token_id=stop_ids,
            pad_token_id=stop_ids[0],
        )
    return [t for t in out[0, len(prompt) :].tolist() if t not in stop_ids]


def run(engine, prompt, sampling=GREEDY, should_stop=lambda: False, on_token=None):
    streamed = []

    def collect(token):
        streamed.append(token)
        if on_token is not None:
            on_token(token)

    ids, reason = engine.generate(prompt, sampling, should_stop, collect)
    assert streamed == ids  # every token streamed once, stop tokens excluded
    return ids, reason


def wait_idle(engine, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if all(r is None for r in engine._slot_req):
            return True
        time.sleep(0.01)
    return False


def stop_after(n):
    """(should_stop, on_token, got): asks to stop once ``n`` tokens were streamed."""
    stop = threading.Event()
    got: list[int] = []

    def on_token(token):
        got.append(token)
        if len(got) == n:
            stop.set()

    return stop.is_set, on_token, got


def run_together(engine, prompts, sampling=GREEDY):
    """The prompts as concurrent requests, released together; their tokens in order."""
    results: dict[int, list[int]] = {}
    barrier = threading.Barrier(len(prompts))

    def worker(i):
        barrier.wait()
        results[i] = run(engine, prompts[i], sampling)[0]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return [results.get(i) for i in range(len(prompts))]


class Running:
    """A first request on a thread. ``wait()`` returns once it has streamed ``after`` tokens;
    from then on its should_stop (run by the scheduler before each step) holds the scheduler
    until a second request is queued, so that the second one surely arrives while the first
    is decoding. ``join()`` gives its tokens."""

    def __init__(self, engine, prompt, sampling, after=3):
        self.engine, self.after, self.got = engine, after, []
        self.going, self.joined = threading.Event(), threading.Event()
        self.result: list[int] | None = None
        self.thread = threading.Thread(target=self._run, args=(prompt, sampling))
        self.thread.start()

    def _run(self, prompt, sampling):
        self.result = run(self.engine, prompt, sampling, self._hold, self._token)[0]

    def _token(self, token):
        self.got.append(token)
        if len(self.got) >= self.after:
            self.going.set()

    def _hold(self):
        if threading.current_thread() is self.engine._thread and len(self.got) >= self.after and not self.joined.is_set():
            end = time.monotonic() + 10
            while not self.engine._incoming and time.monotonic() < end:
                time.sleep(0.001)
            self.joined.set()
        return False

    def wait(self):
        assert self.going.wait(30)

    def join(self):
        self.thread.join(timeout=60)
        return self.result


def test_greedy_equals_generate(engine, hf_model, prompts):
    for prompt in prompts:
        ids, reason = run(engine, prompt)
        assert ids == reference(hf_model, engine.stop_ids, prompt), prompt
        assert reason in ("stop", "length")


def test_concurrent_requests_share_steps_and_match(engine, hf_model, prompts):
    expected = [reference(hf_model, engine.stop_ids, p) for p in prompts[:4]]
    engine.stats["max_rows"] = 0
    assert run_together(engine, prompts[:4]) == expected
    assert engine.stats["max_rows"] >= 2  # they really were batched together


def test_cancel_leaves_at_once_and_frees_the_slot(engine, hf_model, prompts):
    expected_other = reference(hf_model, engine.stop_ids, prompts[1])
    should_stop, on_token, _ = stop_after(3)
    other: dict[str, list[int]] = {}
    t = threading.Thread(target=lambda: other.setdefault("ids", run(engine, prompts[1])[0]))
    t.start()
    ids, reason = run(engine, prompts[0], Sampling(max_new_tokens=200, temperature=0.0), should_stop, on_token)
    t.join(timeout=60)
    assert reason == "cancelled"
    assert 3 <= len(ids) <= 5  # leaves at the next step boundary (one step may be in flight)
    assert other["ids"] == expected_other  # the batch-mate is unaffected
    assert wait_idle(engine)
    # cancelled before it starts: no token at all
    assert engine.generate(prompts[2], GREEDY, lambda: True, lambda _: None) == ([], "cancelled")


def test_prefix_reuse_prefills_only_the_suffix(engine, hf_model, tokenizer, prompts):
    base = prompts[0]
    first = base[:-5] + tokenizer(" one")["input_ids"]
    second = base[:-5] + tokenizer(" two three")["input_ids"]
    run(engine, first)
    before = dict(engine.stats)
    ids, _ = run(engine, second)
    prefilled = engine.stats["prefill_tokens"] - before["prefill_tokens"]
    reused = engine.stats["reused_tokens"] - before["reused_tokens"]
    assert reused >= len(base) - 5 and prefilled == len(second) - reused
    assert prefilled < len(second) // 4
    assert ids == reference(hf_model, engine.stop_ids, second)
    # the same prompt again: everything but the last token comes from the cache
    before = dict(engine.stats)
    assert run(engine, second)[0] == ids
    assert engine.stats["prefill_tokens"] - before["prefill_tokens"] == 1


def test_a_request_in_between_leaves_a_conversation_its_slot(engine, hf_model, tokenizer, prompts):
    """A prompt that shares only part of a free slot's tokens copies them into another slot:
    the conversation that slot holds goes on from where it was (its next turn after a hover)."""
    chat = prompts[0]
    answer, _ = run(engine, chat)
    run(engine, chat[:-5] + tokenizer(" other")["input_ids"])
    next_turn = chat + answer + tokenizer(" more")["input_ids"]
    before = dict(engine.stats)
    ids, _ = run(engine, next_turn)
    assert engine.stats["reused_tokens"] - before["reused_tokens"] >= len(chat)
    assert ids == reference(hf_model, engine.stop_ids, next_turn)


def test_a_copied_prefix_goes_where_the_least_is_lost(engine):
    """Where a prefix is copied to: a free slot whose tokens another slot holds too (nothing is
    lost there), else one a hover filled (the server keeps hover answers), else the least
    recently used; choosing the source slot takes it over."""
    from lsp_server.engine.worker import Priority

    assert wait_idle(engine)
    saved = list(engine._slot_ids), list(engine._slot_used), list(engine._slot_priority)
    user, hover = int(Priority.USER), int(Priority.HOVER)
    try:
        engine._slot_ids[:] = [[1, 2, 3, 4, 5], [1, 2, 3], [7, 8, 9], [1, 2, 9, 9]]
        engine._slot_used[:] = [1.0, 5.0, 3.0, 4.0]
        engine._slot_priority[:] = [user, user, user, user]
        # slot 3 shares the most ([1, 2, 9]) and keeps its own tail: copied to slot 1, a prefix
        # of slot 0, rather than over slot 0, the least recently used
        assert engine._pick_slot([1, 2, 9, 5, 6]) == (1, 3, 3)
        # a prompt that continues slot 2 whole takes it over
        assert engine._pick_slot([7, 8, 9, 10]) == (2, 3, 2)
        # every slot holds tokens of its own: a hover's slot goes first (here the source itself:
        # a second hover near the first takes its slot over), before the conversation in slot 0
        engine._slot_ids[:] = [[1, 2, 3, 4, 5], [1, 2, 6, 6], [7, 8, 9], [5, 5]]
        engine._slot_priority[:] = [user, hover, user, user]
        assert engine._pick_slot([1, 2, 6, 7, 7]) == (1, 3, 1)
        engine._slot_priority[:] = [user, user, user, user]
        assert engine._pick_slot([1, 2, 6, 7, 7]) == (0, 3, 1)  # all alike: the least recently used
    finally:
        engine._slot_ids[:], engine._slot_used[:], engine._slot_priority[:] = saved


def test_a_warm_up_fills_the_cache_the_next_request_starts_from(hf_model, tokenizer, prompts):
    """warm(): the prompt prefix goes into a free slot, in chunks of prefill_chunk tokens, and
    the slot is free again; the next request with that prefix computes only the rest and gets
    generate()'s tokens. A second warm-up of what a slot holds computes nothing."""
    from lsp_server.engine.fast import FastEngine

    eng = FastEngine(hf_model, tokenizer, max_batch=2, prefill_chunk=8)
    try:
        prompt = prompts[0]
        prefix = prompt[:-6]
        assert eng.warm(prefix, lambda: False) == (len(prefix), len(prefix))
        assert eng.stats["prefill_chunks"] == -(-len(prefix) // 8) and eng.stats["warm_ups"] == 1
        assert eng.stats["requests"] == 0 and wait_idle(eng)
        assert eng.warm(prefix[:-3], lambda: False) == (len(prefix) - 3, 0)  # held already
        before = dict(eng.stats)
        ids, _ = run(eng, prompt)
        assert eng.stats["reused_tokens"] - before["reused_tokens"] == len(prefix)
        assert ids == reference(hf_model, eng.stop_ids, prompt)
    finally:
        eng.close()


def test_a_stopped_warm_up_keeps_what_it_computed(hf_model, tokenizer, prompts):
    from lsp_server.engine.fast import FastEngine

    eng = FastEngine(hf_model, tokenizer, max_batch=2, prefill_chunk=8)
    try:
        prompt = prompts[0]
        chunks = []
        real = eng._prefill
        eng._prefill = lambda *a: chunks.append(1) or real(*a)
        assert eng.warm(prompt[:-2], lambda: len(chunks) >= 2) == (16, 16)  # stopped after its second chunk
        eng._prefill = real
        before = dict(eng.stats)
        ids, _ = run(eng, prompt)
        assert eng.stats["reused_tokens"] - before["reused_tokens"] == 16
        assert ids == reference(hf_model, eng.stop_ids, prompt)
        assert eng.warm([1, 2, 3], lambda: True) == (0, 0)  # stopped before it starts
    finally:
        eng.close()


def test_a_warm_up_never_takes_a_slot_only_an_explicit_request_filled(engine):
    """A warm-up goes into a free slot that holds nothing, or tokens another slot holds too,
    or a hover's or a warm-up's; when every free slot holds an explicit request's own tokens
    it computes nothing."""
    from lsp_server.engine.worker import Priority

    assert wait_idle(engine)
    saved = list(engine._slot_ids), list(engine._slot_used), list(engine._slot_priority)
    user, hover = int(Priority.USER), int(Priority.HOVER)
    try:
        engine._slot_ids[:] = [[1, 2, 3, 4, 5], [6, 6], [7, 8, 9], [1, 2, 9, 9]]
        engine._slot_priority[:] = [user, user, user, user]
        before = dict(engine.stats)
        assert engine.warm([11, 12, 13], lambda: False) == (0, 0)
        assert engine.warm([1, 2, 3], lambda: False) == (3, 0)  # slot 0 holds it
        assert engine._slot_ids == [[1, 2, 3, 4, 5], [6, 6], [7, 8, 9], [1, 2, 9, 9]]
        assert engine.stats["prefill_tokens"] == before["prefill_tokens"]
        # a hover's slot may go
        engine._slot_priority[1] = hover
        assert engine.warm([11, 12, 13], lambda: False) == (3, 3)
        assert engine._slot_ids[1] == [11, 12, 13] and engine._slot_priority[1] == int(Priority.BACKGROUND)
        # a warm-up that continues a slot whole takes it over: nothing is lost there
        assert engine.warm([7, 8, 9, 10, 11], lambda: False) == (5, 2)
        assert engine._slot_ids[2] == [7, 8, 9, 10, 11]
    finally:
        # the warm-ups wrote slots 1 and 2's cache rows: their old token lists no longer say
        # what those rows hold (a later request reusing them got other tokens: the rare
        # failure of test_repetition_penalty_matches_generate), so the slots hold nothing now
        engine._slot_ids[:] = [[] for _ in engine._slot_ids]
        engine._slot_used[:], engine._slot_priority[:] = saved[1:]


def test_prefix_copied_from_a_busy_slot(engine, hf_model, tokenizer, prompts):
    base = prompts[3]
    # the slow request must produce a token (its callback is what holds the slot busy): one of
    # these endings whose answer does not end at once
    endings = (" slow", " busy", " wait", " long", " later", " more")
    slow_prompt = next(p for p in (base[:-3] + tokenizer(w)["input_ids"] for w in endings)
                       if reference(hf_model, engine.stop_ids, p, new=1))
    fast_prompt = base[:-3] + tokenizer(" quick")["input_ids"]
    started = threading.Event()
    release = threading.Event()

    def slow_token(_):
        started.set()
        release.wait(5)

    t = threading.Thread(target=lambda: run(engine, slow_prompt, Sampling(max_new_tokens=6, temperature=0.0), on_token=slow_token))
    t.start()
    assert started.wait(30)
    before = dict(engine.stats)
    ids, _ = run(engine, fast_prompt)
    release.set()
    t.join(timeout=60)
    assert engine.stats["reused_tokens"] - before["reused_tokens"] >= len(base) - 3
    assert ids == reference(hf_model, engine.stop_ids, fast_prompt)


def test_a_decode_step_leaves_idle_rows_seen_masks_alone(plain_engine):
    """A slot whose prompt is still going into the cache (chunked, between decode steps) is an
    idle row of the steps meanwhile: their junk samples must not mark tokens as seen there
    (with a repetition penalty they would change that request's answer)."""
    eng = plain_engine
    wait_idle(eng)
    Lc = eng.length_buckets[0]
    with torch.inference_mode(), eng.live_row(5):  # row 0 decodes, row 1 is idle
        eng.seen[1].zero_()
        eng.seen[1, 7] = True  # e.g. a waiting prompt's token
        eng._decode_step(2, Lc)
        assert int(eng.seen[0].sum()) == 1  # the live row's sample
        assert eng.seen[1].nonzero().flatten().tolist() == [7]
        eng.seen[1].zero_()


def test_a_device_fault_answers_every_caller(hf_model, tokenizer, prompts):
    """A sticky device error (every later device op fails too) during a prefill: the request
    gets its error, not an endless wait, even though freeing its slot fails as well; later
    requests fail at once."""
    from lsp_server.engine.fast import FastEngine

    eng = FastEngine(hf_model, tokenizer, max_batch=2, speculate=0)
    fault = RuntimeError("CUDA error: an illegal memory access was encountered")

    class Broken:  # the device after the fault
        def __init__(self, t):
            self.t = t

        def __getitem__(self, key):
            return self.t[key]

        def __setitem__(self, key, value):
            raise fault

        def zero_(self):
            raise fault

    def faulting_prefill(*args, **kwargs):
        eng.active = Broken(eng.active)
        raise fault

    try:
        eng._prefill = faulting_prefill
        result = {}

        def call():
            try:
                run(eng, prompts[0])
            except Exception as exc:
                result["error"] = str(exc)

        caller = threading.Thread(target=call, daemon=True)
        caller.start()
        caller.join(10)
        assert not caller.is_alive(), "generate() still waiting after the fault"
        assert "illegal memory access" in result["error"]
        with pytest.raises(EngineError, match="illegal memory access"):  # at once: failed, or refused
            run(eng, prompts[1])
    finally:
        eng.close()


def test_repetition_penalty_matches_generate(engine, hf_model, prompts):
    # HF's answer first, the engine idle: generate() never runs beside the engine's thread on
    # the model they share
    sampling = Sampling(max_new_tokens=NEW, temperature=0.0, repetition_penalty=1.3)
    for prompt in prompts[:2]:
        expected = reference(hf_model, engine.stop_ids, prompt, penalty=1.3)
        assert wait_idle(engine)
        assert run(engine, prompt, sampling)[0] == expected


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(engine, hf_model, prompts):
    prompt = prompts[4]
    hot = Sampling(max_new_tokens=NEW, temperature=1.5, top_k=0, top_p=1.0, seed=7)
    a = run(engine, prompt, hot)[0]
    # the same seed while another request shares the batch: same tokens
    other = threading.Thread(target=lambda: run(engine, prompts[0], Sampling(max_new_tokens=NEW, temperature=0.9, seed=1)))
    other.start()
    b = run(engine, prompt, hot)[0]
    other.join(timeout=60)
    assert a == b
    draws = {tuple(run(engine, prompt, Sampling(max_new_tokens=NEW, temperature=1.5, top_k=0, top_p=1.0, seed=s))[0]) for s in range(4)}
    assert len(draws) > 1  # the seed matters
    greedy = reference(hf_model, engine.stop_ids, prompt)
    assert run(engine, prompt, Sampling(max_new_tokens=NEW, temperature=1.0, top_k=1, seed=3))[0] == greedy
    assert run(engine, prompt, Sampling(max_new_tokens=NEW, temperature=0.7, top_p=1e-6, seed=3))[0] == greedy


def test_length_limit_and_long_prompt(engine, prompts):
    ids, reason = run(engine, prompts[0], Sampling(max_new_tokens=3, temperature=0.0))
    assert len(ids) <= 3
    from lsp_server.engine.base import EngineError

    with pytest.raises(EngineError):
        engine.generate([1] * engine.max_len, GREEDY, lambda: False, lambda _: None)


def test_on_token_error_is_raised_and_frees_the_slot(engine, prompts):
    def boom(_):
        raise ValueError("client went away")

    with pytest.raises(ValueError):
        engine.generate(prompts[0], GREEDY, lambda: False, boom)
    assert wait_idle(engine)


def test_load_engine_selects_fast(test_model):
    from lsp_server.config import Settings
    from lsp_server.engine import load_engine
    from lsp_server.engine.fast import FastEngine

    eng = load_engine(Settings(model=str(test_model), device="cpu", engine="fast"), lambda _: None)
    try:
        assert isinstance(eng, FastEngine) and eng.max_batch >= 1
        assert "fast engine" in eng.description
        ids, reason = eng.generate([0, 1, 2, 3], GREEDY, lambda: False, lambda _: None)
        assert reason in ("stop", "length")
    finally:
        eng.close()


def test_triton_attention_kernel_matches_torch():
    pytest.importorskip("triton")
    import os

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    from lsp_server.engine.mqa_triton import TritonMQADecode

    device = "cuda" if torch.cuda.is_available() else "cpu"
    B, H, D, Lc = 3, 6, 32, 512
    kv = torch.randn(B, Lc + 1, 2 * D, device=device)
    q = torch.randn(B, H, D, device=device)
    lengths = torch.tensor([Lc, 130, 1], device=device)
    out = TritonMQADecode(B, Lc, H, D, device, torch.float32)(q, kv[:, :Lc], lengths, D**-0.5)
    for b in range(B):
        n = int(lengths[b])
        k, v = kv[b, :n, :D], kv[b, :n, D:]
        ref = torch.softmax((q[b] @ k.T) * D**-0.5, -1) @ v
        assert torch.allclose(out[b], ref, atol=1e-2 if device == "cuda" else 1e-5)


def _interpreter_or_gpu():
    pytest.importorskip("triton")
    import os

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("Lc", [2048, 8192])
def test_triton_attention_merge_of_many_splits(Lc):
    """32 splits at 8K: the one-tile merge reads only the splits that hold keys."""
    device = _interpreter_or_gpu()
    from lsp_server.engine.mqa_triton import TritonMQADecode

    B, H, D = 3, 4, 16
    kv = torch.randn(B, Lc + 1, 2 * D, device=device)
    q = torch.randn(B, H, D, device=device)
    lengths = torch.tensor([Lc, Lc // 3 + 5, 1], device=device)
    attn = TritonMQADecode(B, Lc, H, D, device, torch.float32)
    assert attn.splits >= 16
    out = attn(q, kv[:, :Lc], lengths, D**-0.5)
    for b in range(B):
        n = int(lengths[b])
        k, v = kv[b, :n, :D], kv[b, :n, D:]
        ref = torch.softmax((q[b] @ k.T) * D**-0.5, -1) @ v
        assert torch.allclose(out[b], ref, atol=1e-2 if device == "cuda" else 1e-5)
    # this step's own K/V from the QKV output, written to the cache by the kernel (at the
    # row's last position, or past the slice: the scratch row of an idle row)
    new = torch.randn(B, 2 * D, device=device)
    wpos = torch.tensor([Lc - 1, int(lengths[1]) - 1, Lc], device=device)
    got_kv = kv.clone()
    out = attn(q, got_kv[:, :Lc], lengths, D**-0.5, new=new, wpos=wpos)
    want_kv = kv.clone()
    want_kv[torch.arange(B, device=device), wpos] = new
    assert torch.equal(got_kv, want_kv)
    for b in range(B):
        n = int(lengths[b])
        keys = torch.cat([kv[b, : n - 1], new[b : b + 1]])
        ref = torch.softmax((q[b] @ keys[:, :D].T) * D**-0.5, -1) @ keys[:, D:]
        assert torch.allclose(out[b], ref, atol=1e-2 if device == "cuda" else 1e-5)
    # the speculative step's layout: every row reads the cache of a slot named per row
    slots = torch.tensor([2, 2, 0], device=device)
    out = attn(q, kv, lengths, D**-0.5, slots=slots)
    for b in range(B):
        n, sl = int(lengths[b]), int(slots[b])
        k, v = kv[sl, :n, :D], kv[sl, :n, D:]
        ref = torch.softmax((q[b] @ k.T) * D**-0.5, -1) @ v
        assert torch.allclose(out[b], ref, atol=1e-2 if device == "cuda" else 1e-5)


def test_l2_prefetch_reads_the_weights_head():
    """The prefetch kernel's load mode reads exactly the first bytes asked for, split over its
    programs (their sums land in its sink); the prefetch-instruction mode needs a GPU."""
    device = _interpreter_or_gpu()
    from lsp_server.engine.mqa_triton import L2Prefetch

    w = torch.randn(300, 1000, device=device, dtype=torch.float16)
    pf = L2Prefetch(device, "load", programs=4)
    pf(w, 100_000)  # 50,000 two-byte elements
    per = -(-50_000 // 4)
    per = -(-per // 8192) * 8192
    flat = w.flatten()[:50_000].float()
    want = torch.stack([flat[i * per : (i + 1) * per].sum() for i in range(4)])
    assert torch.allclose(pf.sink, want, rtol=1e-3, atol=1e-2)
    if device == "cuda":
        L2Prefetch(device, "prefetch")(w, 100_000)  # compiles and runs
        torch.cuda.synchronize()


def test_bias_add_layer_norm_fills_the_next_bias():
    device = _interpreter_or_gpu()
    import torch.nn.functional as F

    from lsp_server.engine.mqa_triton import bias_add_layer_norm

    x = torch.randn(2, 96, device=device)
    b, w, beta = torch.randn(96, device=device), torch.randn(96, device=device), torch.randn(96, device=device)
    y = torch.full((2, 5000), float("nan"), device=device)
    yb = torch.randn(5000, device=device)
    got_x = x.clone()
    h = bias_add_layer_norm(got_x, b, w, beta, 1e-5, fill=(y, yb))
    assert torch.equal(y, yb.expand(2, -1))
    assert torch.allclose(got_x, x + b)
    assert torch.allclose(h, F.layer_norm(x + b, (96,), w, beta, 1e-5), atol=1e-5)


def _check_prefetch_windows(eng, monkeypatch):
    """Each window prefetches the weight of the GEMM that comes next, on the side stream after
    the main stream's work so far, and the side stream joins the step once, at its end (the
    streams are recorded by fakes: the CPU has none)."""
    import contextlib

    events = []

    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            events.append(f"{self.name} waits for {other.name}")

    main = Stream("main")

    @contextlib.contextmanager
    def on(stream):
        events.append(f"on {stream.name}")
        yield
        events.append("back")

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: main)
    monkeypatch.setattr(torch.cuda, "stream", on)
    real = eng._l2
    names = {id(w): f"{i}.{n}" for i, layer in enumerate(eng.layers) for n, w in (("attn_proj", layer[4]), ("fc", layer[8]),
                                                                              ("mlp_proj", layer[10]), ("qkv", layer[2]))}
    names[id(eng.lm_head)] = "lm_head"
    eng._l2, eng._side = (lambda w, n: (events.append(names.get(id(w), "?")), real(w, n))), Stream("side")
    try:
        with torch.inference_mode():
            eng._decode_step(1, 256)  # idle rows only: nothing that a request holds changes
    finally:
        eng._l2, eng._side = real, None
    want = []
    for i in range(len(eng.layers)):
        for target in (f"{i}.attn_proj", f"{i}.fc", f"{i}.mlp_proj", f"{i + 1}.qkv" if i + 1 < len(eng.layers) else "lm_head"):
            want += ["side waits for main", "on side", target, "back"]
    assert events == want + ["main waits for side"]


@pytest.mark.parametrize("gemv,kv_in_attention,prefetch", [(False, True, True), (True, False, False)])
def test_fused_engine_with_triton_attention_matches_generate(hf_model, tokenizer, prompts, gemv, kv_in_attention, prefetch,
                                                             monkeypatch):
    """Triton attention (writing the cache itself, or after a separate write), fused decode ops
    (one-row bias pre-write, or the Triton one-row GEMVs), the L2 prefetch of the next weights
    (inline here; a side stream on a GPU) and the fused prefill give HF's greedy tokens
    (float32, interpreter on the CPU)."""
    _interpreter_or_gpu()
    from lsp_server.engine.fast import FastEngine

    eng = FastEngine(hf_model, tokenizer, max_batch=2, max_len=2048, attention="triton", fused=True, gemv=gemv,
                     kv_in_attention=kv_in_attention, prefetch=prefetch)
    try:
        assert eng.fused and eng.attention == "triton"
        assert eng.kv_in_attention == kv_in_attention
        assert (eng._l2 is not None) == prefetch
        assert eng.kv_in_attention_check["cache_written"] and eng.kv_in_attention_check["rel_err"] < 1e-5
        if prefetch:
            _check_prefetch_windows(eng, monkeypatch)
        assert eng.prebias
        assert sorted(eng._gemv) == (["attn_proj", "fc", "lm_head", "mlp_proj", "qkv"] if gemv else [])
        stop_ids = eng.stop_ids or [0]
        for p in prompts[:2]:
            ids, _ = run(eng, p, Sampling(max_new_tokens=12, temperature=0.0))
            assert ids == reference(hf_model, stop_ids, p, new=12)
        # the speculative step: Triton attention of several query rows over one slot's cache
        fix = prompts[0]
        ids, _ = run(eng, fix, Sampling(max_new_tokens=40, temperature=0.0))
        assert ids == reference(hf_model, stop_ids, fix, new=40)
        assert eng.stats["spec_accepted"] > 0
    finally:
        eng.close()


def test_c_fc_for_sixteen_rows_gives_the_same_tokens(hf_model, tokenizer, prompts, copying_prompts):
    """c_fc run for FC_PAD_ROWS rows in steps of fewer live rows (batch buckets, the speculative
    step), the norm kernel writing the live rows into the padded input: HF's greedy tokens,
    batched and speculating (float32, interpreter on the CPU)."""
    _interpreter_or_gpu()
    from lsp_server.engine.fast import FastEngine
    from lsp_server.engine.fast_math import FC_PAD_ROWS

    eng = FastEngine(hf_model, tokenizer, max_batch=2, max_len=512, attention="triton", fused=True, speculate=3)
    try:
        assert eng.fc_padded == ()  # nothing timed on the CPU
        eng.fc_padded = (2, eng.spec_tokens)
        rows = []
        real = eng._fc_gelu
        eng._fc_gelu = lambda h, w, b: rows.append(h.shape[0]) or real(h, w, b)
        stop_ids = eng.stop_ids or [0]
        expected = [reference(hf_model, stop_ids, p) for p in prompts[:2]]
        assert run_together(eng, prompts[:2]) == expected
        fix = copying_prompts["fix"]
        assert run(eng, fix, Sampling(max_new_tokens=40, temperature=0.0))[0] == reference(hf_model, stop_ids, fix, new=40)
        assert eng.stats["spec_accepted"] > 0 and eng.stats["max_rows"] >= 2
        assert FC_PAD_ROWS in rows  # (prefills run c_fc for their own tokens)
    finally:
        eng.close()


def test_c_fc_is_padded_only_where_sixteen_rows_are_faster(hf_model, tokenizer, monkeypatch):
    """The start-up times c_fc at FC_PAD_ROWS rows and at each step size below it (batch
    buckets, the speculative step's rows) and pads the sizes it serves >= 3 % faster."""
    from lsp_server.engine.fast import FastEngine

    pytest.importorskip("triton")  # fused=True needs it
    eng = FastEngine(hf_model, tokenizer, max_batch=4, speculate=7, fused=True)
    try:
        assert eng.batch_buckets[:3] == [1, 2, 4] and eng.spec_tokens == 8
        times = {16: 75.0, 2: 76.0, 4: 77.5, 8: 83.0}
        timed = []
        real = eng._fc_gelu
        monkeypatch.setattr(eng, "_fc_gelu", lambda h, w, b: timed.append(h.shape[0]) or real(h, w, b))

        def fake_time_us(fn, reps=20):
            fn()
            return times[timed[-1]]

        monkeypatch.setattr(eng, "_time_us", fake_time_us)
        eng._choose_fc_padding(timed=True)
        assert timed == [16, 2, 4, 8]
        assert eng.fc_padded == (4, 8) and eng.fc_padding_us == {"16": 75.0, "2": 76.0, "4": 77.5, "8": 83.0}
    finally:
        eng.close()


def test_sampling_kernels_give_the_torch_paths_tokens(hf_model, tokenizer, prompts, copying_prompts):
    """The three sampling kernels (penalty + greedy, top-k, the draw) against the torch ops:
    the start-up check passes, and whole answers are the same token for token, greedy with a
    repetition penalty (= HF's) and seeded sampling, plain and speculative."""
    _interpreter_or_gpu()
    from lsp_server.engine.fast import FastEngine

    eng = FastEngine(hf_model, tokenizer, max_batch=2, max_len=512, fused_sampling=True, speculate=3)
    try:
        assert eng.sample_kernels
        assert eng.sample_report["greedy_same"] and eng.sample_report["sampled_agree"] >= 0.95
        stop_ids = eng.stop_ids or [0]
        penalized = Sampling(max_new_tokens=12, temperature=0.0, repetition_penalty=1.3)
        assert run(eng, prompts[4], penalized)[0] == reference(hf_model, stop_ids, prompts[4], new=12, penalty=1.3)
        cases = [(prompts[4], Sampling(max_new_tokens=12, temperature=0.8, top_k=20, top_p=0.9, seed=5, repetition_penalty=1.2)),
                 (copying_prompts["fix"], Sampling(max_new_tokens=40, temperature=0.2, seed=3))]
        for prompt, sampling in cases:
            got = run(eng, prompt, sampling)[0]
            eng.sample_kernels = False
            try:
                assert run(eng, prompt, sampling)[0] == got
            finally:
                eng.sample_kernels = True
        assert eng.stats["spec_accepted"] > 0
    finally:
        eng.close()


def test_the_draws_uniform_numbers_stay_inside_0_1():
    """The draw divides by -log(u): u = 1 gave -0 and a NaN score for every candidate of
    probability 0 (argmax took it: a token outside top-k / top-p). Every 32-bit hash, the
    extremes included, maps strictly inside (0, 1), and equal hashes to equal numbers in
    both paths (the kernel's copy of the formula is checked by the sampling tests)."""
    from lsp_server.engine.fast_math import _uniform

    h = torch.tensor([0, 1, 511, 512, 0x7FFFFFFF, 0xFFFFFE00, 0xFFFFFFFF], dtype=torch.long)
    u = _uniform(h)
    assert bool((u > 0).all() and (u < 1).all()), u
    assert float(-torch.log(u).min()) > 0
    probs = torch.tensor([[0.0, 1.0]])
    assert int((probs / -torch.log(_uniform(torch.tensor([[0xFFFFFFFF, 0]])))).argmax()) == 1


def test_score_gives_every_positions_logits(engine, hf_model, prompts):
    """The teacher-forced scoring the bench uses for its near-tie analysis: the prefill path's
    logits at every position equal HF's forward (float32)."""
    assert wait_idle(engine)
    ids = prompts[0]
    got = engine.score(ids)
    with torch.inference_mode():
        ref = hf_model(torch.tensor([ids])).logits[0].float()
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)
    assert engine.prefill_attention == "sdpa_gqa"  # CPU: no timing-based choice


@pytest.mark.parametrize("cfg", GEMV_CONFIGS)
def test_triton_gemv_matches_linear(cfg):
    """Every start-up candidate (block_n, block_k, warps, stages); K = 4096 gives each at least
    two K blocks and N = 100 a partial last block of rows."""
    device = _interpreter_or_gpu()
    import torch.nn.functional as F

    from lsp_server.engine.mqa_triton import TritonGEMV

    W = torch.randn(100, 4096, device=device) * 0.02
    b = torch.randn(100, device=device)
    x = torch.randn(1, 4096, device=device)
    g = TritonGEMV(W, *cfg)
    assert (g.block_n, g.block_k) == cfg[:2]
    ref = F.linear(x, W, b)
    assert torch.allclose(g(x, b), ref, atol=1e-5)
    assert torch.allclose(g(x, b, gelu=True), F.gelu(ref, approximate="tanh"), atol=1e-5)
    y = torch.randn(1, 100, device=device)
    out = y.clone()
    g(x, out=out, accumulate=True)
    assert torch.allclose(out, y + F.linear(x, W), atol=1e-5)


def _spec_stats(engine, before):
    return {k: engine.stats[k] - before[k] for k in ("steps", "tokens", "spec_steps", "spec_accepted")}


def test_plain_engine_greedy_equals_generate(plain_engine, hf_model, prompts):
    for prompt in prompts[:3]:
        assert run(plain_engine, prompt)[0] == reference(hf_model, plain_engine.stop_ids, prompt)
    assert plain_engine.stats["spec_steps"] == 0


def test_speculation_keeps_the_tokens_in_fewer_steps(engine, plain_engine, hf_model, copying_prompts):
    assert wait_idle(engine)
    for name, prompt in copying_prompts.items():
        before = dict(engine.stats)
        ids, _ = run(engine, prompt, Sampling(max_new_tokens=60, temperature=0.0))
        assert ids == reference(hf_model, engine.stop_ids, prompt, new=60), name
        got = _spec_stats(engine, before)
        assert got["spec_accepted"] > 0, (name, got)
        assert got["steps"] < got["tokens"] - 1, (name, got)  # several tokens per step
    # the repetition penalty sees the drafts before each row as seen tokens: as generate() does
    for name, prompt in copying_prompts.items():
        got = run(engine, prompt, Sampling(max_new_tokens=60, temperature=0.0, repetition_penalty=1.5))[0]
        assert got == reference(hf_model, engine.stop_ids, prompt, new=60, penalty=1.5), name
    # sampling (temperature, top-k, top-p, repetition penalty): every position draws as plain
    # decoding would, so the same seed gives the same tokens with or without speculation
    for seed in (1, 2):
        hot = Sampling(max_new_tokens=60, temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.1, seed=seed)
        for prompt in copying_prompts.values():
            assert run(engine, prompt, hot)[0] == run(plain_engine, prompt, hot)[0]


def test_speculation_stops_at_the_token_limit(engine, plain_engine, copying_prompts):
    for limit in (1, 2, 9, 13):
        ids, reason = run(engine, copying_prompts["ticking"], Sampling(max_new_tokens=limit, temperature=0.0))
        assert (len(ids), reason) == (limit, "length")
        assert ids == run(plain_engine, copying_prompts["ticking"], Sampling(max_new_tokens=limit, temperature=0.0))[0]


def test_cancel_during_speculation(engine, plain_engine, copying_prompts):
    """Stopping mid-step: no token reaches the caller after it asked to stop, though the step
    that was running may have produced several."""
    assert wait_idle(engine)
    should_stop, on_token, _ = stop_after(5)
    before = dict(engine.stats)
    ids, reason = run(engine, copying_prompts["ticking"], Sampling(max_new_tokens=300, temperature=0.0), should_stop, on_token)
    assert (len(ids), reason) == (5, "cancelled")
    assert engine.stats["spec_steps"] > before["spec_steps"]
    assert wait_idle(engine)
    expected = run(plain_engine, copying_prompts["fix"], GREEDY)[0]
    assert run(engine, copying_prompts["fix"], GREEDY)[0] == expected


def test_a_request_joining_a_speculating_one(engine, plain_engine, copying_prompts, prompts):
    """A second request arrives while one speculates: they share the speculative steps (each
    row over its own slot's cache) and both get the tokens plain decoding gives them."""
    assert wait_idle(engine)
    long = Sampling(max_new_tokens=150, temperature=0.0)
    expected_long = run(plain_engine, copying_prompts["ticking"], long)[0]
    expected_fix = run(plain_engine, copying_prompts["fix"], long)[0]
    first = Running(engine, copying_prompts["ticking"], long, after=8)
    first.wait()
    before = dict(engine.stats)
    fix = run(engine, copying_prompts["fix"], long)[0]
    assert first.join() == expected_long
    assert fix == expected_fix
    assert before["spec_steps"] > 0  # the first one speculated alone
    assert engine.stats["spec_shared_steps"] > before["spec_shared_steps"]  # then together


def test_plain_and_speculative_batches_agree(engine, plain_engine, copying_prompts, prompts):
    """Three and four requests at once, greedy and sampled: speculative steps carrying several
    requests' drafts give every request the tokens plain batched decoding gives."""
    assert wait_idle(engine)
    group = [copying_prompts["fix"], copying_prompts["optimize"], copying_prompts["ticking"], prompts[1]]
    for sampling in (Sampling(max_new_tokens=80, temperature=0.0),
                     Sampling(max_new_tokens=80, temperature=0.7, top_k=30, repetition_penalty=1.1, seed=3)):
        expected = [run(plain_engine, p, sampling)[0] for p in group]
        for n in (3, 4):
            before = dict(engine.stats)
            assert run_together(engine, group[:n], sampling) == expected[:n]
            assert engine.stats["spec_shared_steps"] > before["spec_shared_steps"]


def test_a_failing_speculative_step_falls_back_to_plain_steps(hf_model, tokenizer, copying_prompts):
    from lsp_server.engine.fast import FastEngine

    eng = FastEngine(hf_model, tokenizer, max_batch=1)
    try:
        expected = reference(hf_model, eng.stop_ids, copying_prompts["fix"])

        def broken(_Lc):
            raise RuntimeError("verify kernel failed")

        eng.run_verify_step = broken
        assert run(eng, copying_prompts["fix"])[0] == expected
        assert eng.speculation is False and eng.spec_error == "verify kernel failed"
        assert eng.stats["spec_steps"] == 0
    finally:
        eng.close()


def test_speculation_is_on_by_default_and_can_be_turned_off(test_model):
    from lsp_server.config import Settings
    from lsp_server.engine import load_engine

    for extra, tokens in (({}, 7), ({"speculative_tokens": 0}, 0), ({"speculative_tokens": 3, "fast_max_batch": 2}, 3)):
        eng = load_engine(Settings(model=str(test_model), device="cpu", engine="fast", **extra), lambda _: None)
        try:
            assert eng.spec_tokens - 1 == tokens and eng.speculation == (tokens > 0)
            assert ("speculation" in eng.description) == (tokens > 0)
            assert eng.max_batch == extra.get("fast_max_batch", 8)
        finally:
            eng.close()


@pytest.mark.parametrize(("texts", "sampling"), [
    (("import", "x", "return", "for"), Sampling(max_new_tokens=60, temperature=0.0, repetition_penalty=3.0)),
    (("x", "for", "math"), Sampling(max_new_tokens=60, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=3.0, seed=1)),
    (("return", "math", "for", "class"), Sampling(max_new_tokens=60, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=3.0, seed=1)),
], ids=["greedy", "sampled", "sampled-2"])
def test_right_drafts_are_all_kept(engine, plain_engine, tokenizer, texts, sampling):
    """With drafts that are the answer plain decoding gives, every speculative step keeps all
    of them and gives that answer: each row's penalty context (the drafts before it count as
    seen) and random draw are exactly those of plain decoding at its position. A one-token
    prompt and a strong penalty, so that the drafts are new tokens and the penalty on them
    decides the next ones (the sampled cases fail if the drafts are left out of it). The
    prompt is the first of ``texts``, then of the one-token prompts, whose answer is long
    enough: the test model's answers to untrained prompts change whenever it is trained again."""
    assert wait_idle(engine)
    candidates = [tokenizer(text)["input_ids"] for text in texts] + [[token] for token in range(len(tokenizer))]
    for prompt in candidates:
        answer = run(plain_engine, prompt, sampling)[0]
        if len(answer) > 10:
            break
    assert len(answer) > 10, "no one-token prompt has an answer of more than 10 tokens"
    with engine.drafts_from(lambda p: KnownAnswer(p, answer)):
        before = dict(engine.stats)
        got = run(engine, prompt, sampling)[0]
    assert got == answer
    steps = engine.stats["spec_steps"] - before["spec_steps"]
    kept = engine.stats["spec_accepted"] - before["spec_accepted"]
    drafted = engine.stats["spec_drafted"] - before["spec_drafted"]
    assert steps > 0 and kept == drafted


def test_speculation_start_up_check(hf_model, tokenizer, engine):
    """At start the engine decodes a fixed prompt plainly, then with that answer as drafts: all
    are kept on a sound step; a step that rejects right drafts turns speculation off."""
    from lsp_server.engine.fast import FastEngine

    assert engine.spec_check["drafted"] > 0
    assert engine.spec_check["kept"] == engine.spec_check["drafted"] and engine.spec_check["same_tokens"]

    class Broken(FastEngine):
        def _verify_step(self, Lc):
            self.spec_in.copy_(torch.where(self.spec_off > 0, (self.spec_in + 1) % self.vocab, self.spec_in))
            super()._verify_step(Lc)  # the drafts it checks are all wrong

    eng = Broken(hf_model, tokenizer, max_batch=2)
    try:
        assert eng.speculation is False
        assert eng.spec_error.startswith("start-up check kept 0 of")
        assert eng.stats["requests"] == 0  # the check's own requests are not counted
        assert run(eng, [5, 6, 7], GREEDY)[0] == reference(hf_model, eng.stop_ids, [5, 6, 7])
    finally:
        eng.close()


def test_the_models_generation_config_does_not_change_our_sampling(test_model, tmp_path, prompts):
    """A generation_config.json shipped with the model (beam search, an n-gram ban) does not
    reach generate(): only our settings decide (beams cannot stream: every request failed)."""
    import json

    from lsp_server.config import Settings
    from lsp_server.engine.local import TransformersEngine

    for item in test_model.iterdir():
        (tmp_path / item.name).symlink_to(item)
    (tmp_path / "generation_config.json").unlink()
    (tmp_path / "generation_config.json").write_text(json.dumps({"num_beams": 2, "no_repeat_ngram_size": 2, "eos_token_id": 0}))
    answers = []
    for folder in (test_model, tmp_path):
        eng = TransformersEngine.load(Settings(model=str(folder), device="cpu"))
        try:
            answers.append([eng.generate(p, GREEDY, lambda: False, lambda _: None) for p in prompts[:2]])
        finally:
            eng.close()
    assert answers[0] == answers[1]


def test_engine_auto_picks_and_falls_back(test_model, monkeypatch):
    """``engine: auto`` (the default): the fast engine for a model wholly on one GPU, else the
    loaded model stays with generate(); a fast engine that fails to start leaves generate()
    in its place, saying why."""
    from lsp_server.config import Settings
    from lsp_server.engine import load_engine
    from lsp_server.engine import fast as fast_module
    from lsp_server.engine.local import TransformersEngine

    assert Settings().engine == "auto"
    settings = Settings(model=str(test_model), device="cpu")
    eng = load_engine(settings, lambda _: None)
    try:  # on the CPU
        assert type(eng) is TransformersEngine and fast_module.unsuitable(eng.model) == "the model is not on a CUDA GPU"
    finally:
        eng.close()
    monkeypatch.setattr(fast_module, "unsuitable", lambda model: None)  # as if on one GPU
    eng = load_engine(settings, lambda _: None)
    try:
        assert isinstance(eng, fast_module.FastEngine)
    finally:
        eng.close()

    def fails(self, *args, **kwargs):
        raise RuntimeError("CUDA error: no kernel image is available")

    monkeypatch.setattr(fast_module.FastEngine, "__init__", fails)
    eng = load_engine(settings, lambda _: None)
    try:
        assert type(eng) is TransformersEngine
        assert "fast engine unavailable: CUDA error: no kernel image" in eng.description
        assert eng.generate([5, 6, 7], GREEDY, lambda: False, lambda _: None)[1] in ("stop", "length")
    finally:
        eng.close()
    with pytest.raises(RuntimeError):  # asked for by name: the failure is the answer
        load_engine(Settings(model=str(test_model), device="cpu", engine="fast"), lambda _: None)


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(hf_model, tokenizer, copying_prompts, prompts):
    from lsp_server.engine.fast import FastEngine

    eng = FastEngine(hf_model, tokenizer, max_batch=2, speculate=0, prefill_chunk=8)
    try:
        long = Sampling(max_new_tokens=120, temperature=0.0)
        expected_long = reference(hf_model, eng.stop_ids, copying_prompts["ticking"], new=120)
        second = copying_prompts["fix_elsewhere"]
        expected_second = reference(hf_model, eng.stop_ids, second)
        first = Running(eng, copying_prompts["ticking"], long)
        first.wait()
        before = dict(eng.stats)
        assert run(eng, second)[0] == expected_second
        assert first.join() == expected_long
        # the second prompt went in 8 tokens at a time, with decode steps of the first between
        prefilled = eng.stats["prefill_tokens"] - before["prefill_tokens"]
        assert prefilled > 64 and eng.stats["prefill_chunks"] - before["prefill_chunks"] >= prefilled // 8
        # cancelled while its prompt goes in: the slot is free at once, and what is in the
        # cache is reused by the next request with that prompt
        assert wait_idle(eng)
        first = Running(eng, copying_prompts["ticking"], long)
        first.wait()
        calls = []
        new = tokenizer("# nothing in the cache starts like this\n" + sc.CALC_PY)["input_ids"]  # 5+ chunks
        cancelled = eng.generate(new, GREEDY, lambda: calls.append(1) or len(calls) > 3, lambda _: None)
        first.join()
        assert cancelled == ([], "cancelled")
        assert wait_idle(eng)
        before = dict(eng.stats)
        assert run(eng, new)[0] == reference(hf_model, eng.stop_ids, new)
        assert eng.stats["reused_tokens"] - before["reused_tokens"] >= 8
    finally:
        eng.close()


def test_explicit_actions_get_the_spare_rows_and_prefill_first(tokenizer):
    """Priorities inside the engine: the spare rows of a speculative step go to an explicit
    action before a hover admitted earlier, and a waiting action's prompt goes in first."""
    from types import SimpleNamespace

    from lsp_server.engine.fast import FastEngine, _Request
    from lsp_server.engine.worker import Priority

    def request(priority, answer):
        req = _Request([1, 2, 3], Sampling(max_new_tokens=50), lambda: False, priority=int(priority))
        req.lookup = KnownAnswer(req.prompt, answer)
        req.produced = [answer[0]]
        return req

    hover, action = request(Priority.HOVER, list(range(10, 30))), request(Priority.USER, list(range(40, 60)))
    state = SimpleNamespace(_running=[hover, action], spec_tokens=4, max_len=100, _prefilling=[hover, action])
    state._draft = lambda req, room: FastEngine._draft(state, req, room)
    plan = dict((id(req), draft) for req, draft in FastEngine._plan(state))
    assert len(plan[id(action)]) == 2 and plan[id(hover)] == []  # 4 rows: 2 last tokens + 2 drafts
    assert FastEngine._next_prefill(state) is action
    state._prefilling = [hover, request(Priority.HOVER, [1])]
    assert FastEngine._next_prefill(state) is hover  # the oldest among equals


def test_gelu_epilogue_is_kept_only_where_it_is_not_slower(hf_model, tokenizer, monkeypatch):
    """The start-up times c_fc with the GELU in cuBLASLt's epilogue against GEMM + GELU kernel,
    for decode-step rows and prefill rows separately, and ``_fc_gelu`` follows each answer."""
    from lsp_server.engine.fast import FastEngine
    from lsp_server.engine.fast_math import FEW_ROWS

    pytest.importorskip("triton")  # fused=True needs it
    eng = FastEngine(hf_model, tokenizer, max_batch=1, speculate=0, fused=True)
    try:
        assert eng.gelu_fused == {"decode": False, "prefill": False}  # CPU: no tanh epilogue to time
        eng.gelu_epilogue = "tanh"  # as if the numerical check on a GPU had accepted it
        times = iter([10.0, 20.0, 30.0, 25.0])  # decode fused, separate; prefill fused, separate
        ran = []

        def fake_time_us(fn, reps=20):
            fn()
            ran.append(reps)
            return next(times)

        monkeypatch.setattr(eng, "_time_us", fake_time_us)
        eng._choose_gelu_fusion(timed=True)
        assert eng.gelu_fused == {"decode": True, "prefill": False}
        assert eng.gelu_fusion_us == {"decode_fused": 10.0, "decode_separate": 20.0, "prefill_fused": 30.0, "prefill_separate": 25.0}
        assert len(ran) == 4

        fused_rows = []
        real = torch._addmm_activation
        monkeypatch.setattr(torch, "_addmm_activation", lambda *a, **k: fused_rows.append(a[1].shape[0]) or real(*a, **k))
        fcw, fcb = eng.layers[0][8], eng.layers[0][9]
        for rows in (1, FEW_ROWS, FEW_ROWS + 1, 300):
            out = eng._fc_gelu(torch.randn(rows, fcw.shape[1]), fcw, fcb)
            assert out.shape == (rows, fcw.shape[0])
        assert fused_rows == [1, FEW_ROWS]  # decode-sized GEMMs fused, prefill-sized ones not
    finally:
        eng.close()


def test_whole_step_choice_keeps_a_path_only_if_not_slower(hf_model, tokenizer, monkeypatch):
    """The batch-1 bias pre-write (like the cache write in the attention) stays on only if a
    batch-1 step timed with it is not > 0.2 % slower than without (off, on, off, on: the faster
    of each pair counts); the answer is remembered."""
    from lsp_server.engine.fast import FastEngine

    pytest.importorskip("triton")  # fused=True needs it
    eng = FastEngine(hf_model, tokenizer, max_batch=1, speculate=0, fused=True)
    try:
        assert eng.prebias  # its numerical check passed; on the CPU nothing is timed
        for times, kept in (([100.0, 100.1, 100.0, 100.1], True),
                            ([103.0, 100.1, 100.0, 104.0], True),  # one slow timing each way does not decide
                            ([100.0, 101.0, 100.0, 101.0], False)):
            eng.prebias = True
            eng.choices.forget("prebias")
            it, flags = iter(times), []
            monkeypatch.setattr(eng, "_step_us", lambda B=1: (flags.append(eng.prebias), next(it))[1])
            eng._choose_prebias(timed=True)
            assert flags == [False, True, False, True]
            assert eng.prebias is kept and eng.prebias_us == {"off": min(times[0::2]), "on": min(times[1::2])}
        eng.prebias = True
        monkeypatch.setattr(eng, "_step_us", lambda B=1: pytest.fail("timed again"))
        eng._choose_prebias(timed=True)  # an earlier start's answer (here: off)
        assert eng.prebias is False
    finally:
        eng.close()


def test_start_up_runs_every_timed_choice_with_the_paths_before_it(hf_model, tokenizer, prompts, monkeypatch):
    """The choices a GPU makes by timing, made here as on a GPU (``time_on_cpu``; a timing
    runs the timed function once and reports 1 µs), in the engine's own start-up order: each
    runs the real step with the paths chosen before it and records no error (a whole-step
    timing once ran before a later chooser had set its flag: an AttributeError, caught and
    reported, on every GPU start), ties keep the path on, and the engine that results gives
    HF's greedy tokens."""
    _interpreter_or_gpu()
    from lsp_server.engine.fast import FastEngine
    from lsp_server.engine.fast_setup import StartUp

    timed = []

    def fake_time_us(self, fn, reps=20):
        fn()
        timed.append(reps)
        return 1.0

    monkeypatch.setattr(StartUp, "time_on_cpu", True)
    monkeypatch.setattr(StartUp, "_time_us", fake_time_us)
    eng = FastEngine(hf_model, tokenizer, max_batch=2, max_len=512, speculate=0, attention="triton", fused=True)
    try:
        assert eng.attention == "triton" and eng.fused
        assert eng.sample_report.get("us_b1") == {"torch": 1.0, "triton": 1.0}, eng.sample_report
        assert not eng.sample_kernels  # not 3 % faster
        names = ("qkv", "attn_proj", "fc", "mlp_proj", "lm_head")
        assert all(eng.gemv_report.get(f"{n}_cublas_us") == 1.0 for n in names), eng.gemv_report
        assert eng.gemv_report["chosen"] == []  # not 3 % faster
        assert eng.prebias and eng.prebias_us == {"off": 1.0, "on": 1.0}, eng.prebias_us
        assert eng.kv_in_attention and eng.kv_in_attention_us == {"off": 1.0, "on": 1.0}, eng.kv_in_attention_us
        assert timed.count(3) == 8  # two whole-step choices, each timed off, on, off, on
        for p in prompts[:2]:
            assert run(eng, p)[0] == reference(hf_model, eng.stop_ids, p)
    finally:
        eng.close()


@pytest.mark.parametrize("config", ["triton_m128_g1", "triton_m64_g2", "triton_m32_g2"])
def test_triton_prefill_attention_matches_torch(config):
    """Causal MQA with the diagonal at the bottom right: a whole prompt (S = T), and a suffix
    after a cached prefix long enough for unmasked key blocks; queries read through the QKV
    output's strides, several query blocks, a partial last one."""
    device = _interpreter_or_gpu()
    from lsp_server.engine.prefill_triton import prefill_attention

    H, D = 4, 32
    torch.manual_seed(11)
    for T, S in ((150, 150), (40, 200), (150, 300)):
        qkv = torch.randn(S, H * D + 2 * D, device=device)
        q = qkv[S - T :, : H * D].view(T, H, D).transpose(0, 1)  # (H, T, D), strided like the engine's
        k, v = qkv[:, H * D : H * D + D], qkv[:, H * D + D :]
        got = prefill_attention(q, k, v, 0.3, config)
        sc = (q @ k.T) * 0.3  # (H, T, S)
        pos = torch.arange(S - T, S, device=device)
        sc = sc.masked_fill(torch.arange(S, device=device)[None, None, :] > pos[None, :, None], float("-inf"))
        ref = (torch.softmax(sc, -1) @ v).transpose(0, 1)  # (T, H, D)
        assert got.shape == (T, H, D) and got.is_contiguous()
        assert torch.allclose(got, ref, atol=2e-5, rtol=1e-4), (T, S, (got - ref).abs().max())


def test_engine_with_triton_prefill_attention_matches_generate(hf_model, tokenizer, prompts, copying_prompts):
    """The Triton MQA prefill attention in the engine: whole prompts, a prompt's suffix after a
    reused prefix, and a prompt put in 8 tokens at a time give HF's greedy tokens."""
    _interpreter_or_gpu()
    from lsp_server.engine.fast import FastEngine

    eng = FastEngine(hf_model, tokenizer, max_batch=2, max_len=512, speculate=0, prefill_attention="triton_m64_g2",
                     prefill_chunk=8)
    try:
        assert eng.prefill_attention == "triton_m64_g2"
        for p in (prompts[1], prompts[0]):
            assert run(eng, p)[0] == reference(hf_model, eng.stop_ids, p)
        base = prompts[0]  # still cached: its suffix goes in after the prefix it shares
        second = base[:-5] + tokenizer(" two three")["input_ids"]
        before = dict(eng.stats)
        assert run(eng, second)[0] == reference(hf_model, eng.stop_ids, second)
        assert eng.stats["reused_tokens"] - before["reused_tokens"] >= len(base) - 5
        # beside a running request a prompt goes in 8 tokens at a time: each chunk a suffix
        long = Sampling(max_new_tokens=60, temperature=0.0)
        expected_long = reference(hf_model, eng.stop_ids, copying_prompts["ticking"], new=60)
        first = Running(eng, copying_prompts["ticking"], long)
        first.wait()
        before = dict(eng.stats)
        fix = copying_prompts["fix_elsewhere"]
        assert run(eng, fix)[0] == reference(hf_model, eng.stop_ids, fix)
        assert first.join() == expected_long
        assert eng.stats["prefill_chunks"] - before["prefill_chunks"] > 4
    finally:
        eng.close()


def test_no_token_when_none_may_be_generated(engine, prompts):
    """max_new_tokens <= 0 is an empty answer cut at its length (the step used to emit one)."""
    for limit in (0, -3):
        assert run(engine, prompts[0], Sampling(max_new_tokens=limit, temperature=0.0)) == ([], "length")
