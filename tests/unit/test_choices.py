"""The fast engine's memory of its start-up timing decisions (engine/choices.py): answers are
reused for the same fingerprint only, a broken file means deciding again, and ``0`` turns the
memory off."""

from __future__ import annotations

import json

from lsp_server.engine.choices import Choices, default_path, fingerprint


def test_answers_are_remembered_per_fingerprint(tmp_path):
    path = tmp_path / "sub" / "choices.json"
    calls = []

    def decide():
        calls.append(1)
        return ["prefetch", 16]

    key = fingerprint({"gpu": "H200", "layers": 40})
    first = Choices(path, key, {"gpu": "H200"})
    assert first.ask("prefetch", decide) == ["prefetch", 16]
    assert first.ask("gemv", lambda: {}) == {}
    first.save()
    assert json.loads(path.read_text())[key]["for"] == {"gpu": "H200"}

    second = Choices(path, key)
    assert second.ask("prefetch", decide) == ["prefetch", 16] and len(calls) == 1
    assert second.recall("gemv") == {} and second.reused == ["prefetch", "gemv"]

    other = Choices(path, fingerprint({"gpu": "H100", "layers": 40}))
    assert other.recall("prefetch") is None
    other.ask("prefetch", decide)
    other.save()
    assert len(calls) == 2 and len(json.loads(path.read_text())) == 2  # both machines kept

    second.forget("prefetch")  # e.g. a remembered path that no longer passes its check
    second.save()
    assert Choices(path, key).recall("prefetch") is None


def test_a_broken_file_means_deciding_again(tmp_path):
    path = tmp_path / "choices.json"
    path.write_text("{not json")
    choices = Choices(path, "k")
    assert choices.ask("sample_kernels", lambda: True) is True
    choices.save()
    assert Choices(path, "k").recall("sample_kernels") is True


def test_where_the_memory_lives(monkeypatch, tmp_path):
    monkeypatch.setenv("STARCHAT_FAST_CHOICES", "0")
    assert default_path() is None
    monkeypatch.setenv("STARCHAT_FAST_CHOICES", str(tmp_path / "x.json"))
    assert default_path() == tmp_path / "x.json"
    monkeypatch.delenv("STARCHAT_FAST_CHOICES")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_path() == tmp_path / "starchat-lsp" / "fast-engine-choices.json"
    Choices(None, "k").save()  # no file: nothing written, nothing raised


def test_the_fingerprint_covers_the_engines_code_and_the_paths_asked_for(monkeypatch):
    """Answers timed by another version of the engine, or with other paths asked for, are
    not applied: the fingerprint holds a hash of the engine's source and the requested paths."""
    from types import SimpleNamespace

    import torch

    from lsp_server.engine import fast

    engine = SimpleNamespace(device=torch.device("cpu"), dtype=torch.bfloat16, n_layer=40, n_embd=6144, n_head=48,
                             vocab=49152, max_batch=8, max_len=8192)
    key, parts = fast._engine_fingerprint(engine, torch, 7, {"gemv": None})
    assert len(parts["code"]) == 12 and parts["requested"] == {"gemv": None}
    assert fast._engine_fingerprint(engine, torch, 7, {"gemv": False})[0] != key
    monkeypatch.setenv("STARCHAT_FAST_PREFETCH", "0")
    assert fast._engine_fingerprint(engine, torch, 7, {"gemv": None})[0] != key
    monkeypatch.delenv("STARCHAT_FAST_PREFETCH")
    monkeypatch.setattr(fast, "_engine_code_hash", lambda: "another")
    assert fast._engine_fingerprint(engine, torch, 7, {"gemv": None})[0] != key


def test_a_failed_graph_capture_turns_off_the_newest_path_and_remembers_the_culprit(monkeypatch):
    """After a failed capture the newest optional path goes first, one at a time; the one
    whose removal let the capture succeed is remembered as off (the next start neither times
    it again nor pays the failed capture), the others are not (they were not at fault)."""
    from types import SimpleNamespace

    from lsp_server.engine.fast_graphs import Graphs

    def paths_on():
        return dict(_l2=object(), kv_in_attention=True, sample_kernels=True, _gemv={"qkv": 1}, _gemv_ops={("qkv", 0): 1},
                    prebias=True)

    eng = SimpleNamespace(**paths_on())
    order = []
    while (off := Graphs._turn_off_newest_path(eng)) is not None:
        order.append(off)
    assert order == [("prefetch", []), ("kv_in_attention", False), ("sample_kernels", False), ("gemv", {}), ("prebias", False)]
    assert eng._l2 is None and not (eng.kv_in_attention or eng.sample_kernels or eng._gemv or eng._gemv_ops or eng.prebias)

    # the sampling kernels cannot be captured: the prefetch and the cache write go first
    eng = SimpleNamespace(**paths_on(), attention="triton", graph_error=None, _graphs={}, choices=Choices(None, "k"),
                          device="cpu", use_graphs=True, _torch=SimpleNamespace(cuda=SimpleNamespace(synchronize=lambda d: None)))
    captures = []

    def capture_all():
        captures.append(eng.sample_kernels)
        if eng.sample_kernels:
            raise RuntimeError("operation not permitted when stream is capturing")

    eng._capture_all = capture_all
    eng._turn_off_newest_path = lambda: Graphs._turn_off_newest_path(eng)
    Graphs._capture_with_fallback(eng)
    assert captures == [True, True, True, False] and eng.use_graphs and eng._gemv and eng.prebias
    assert eng.choices.answers == {"sample_kernels": False}
    assert eng.graph_error.count("operation not permitted") == 3
