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
