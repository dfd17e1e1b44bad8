"""The engine benchmark's tiny CPU configuration runs end to end and writes every key (no timing
is asserted: CI machines differ)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[2]
KEYS = [
    "gpu", "date", "copy_tbps", "floor_tok_s", "seed_b1_tok_s", "seed_b8_tok_s", "engine_b1_tok_s",
    "engine_b1_8k_tok_s", "engine_8streams_tok_s", "ttft_512_ms", "ttft_2048_ms", "ttft_prefix_reused_ms",
    "greedy_match_tokens", "ready_s", "seed_ttft_2048_ms",
    # speculation and the server process's start
    "spec_known_answer_tok_s", "spec_prompt_lookup_tok_s", "spec_plain_tok_s", "spec_no_draft_tok_s", "spec_verify_over_step",
    "spec_verify_bound_tok_s",
    "ready_process_first_s", "ready_engine_s", "server_chat_tok_s", "server_chat_first_piece_ms",
    "server_doc_first_piece_ms", "server_doc_reused_first_piece_ms", "server_doc_prompt_tokens", "server_doc_cached_tokens",
    "server_doc_next_turn_prompt_tokens", "server_doc_next_turn_cached_tokens", "server_doc_next_turn_first_piece_ms",
    "server_doc_warm_up_ms", "server_doc_warmed_prompt_tokens", "server_doc_warmed_cached_tokens",
    "server_doc_warmed_first_piece_ms", "server_fill_first_ms", "server_fill_keystroke_median_ms",
    "server_fill_keystroke_cached_share", "server_fill_typed_through_ms",
]


def test_bench_tiny_writes_every_key(test_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STARCHAT_TEST_MODEL", str(test_model))
    spec = importlib.util.spec_from_file_location("engine_bench", REPO / "bench" / "engine_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "tiny.json"
    assert bench.main(["--tiny", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["errors"] == {}
    for key in KEYS:
        assert result.get(key) is not None, key
    assert result["greedy_match_tokens"] == result["greedy_match_of"] == 64  # float32: exact
    assert result["ttft_prefix_reused_tokens"] > 0
    # through the server: the second chat about the document took the file from the cache
    assert result["server_doc_prompt_tokens"] // 2 < result["server_doc_cached_tokens"] < result["server_doc_prompt_tokens"]
    # the first chat's next turn, after the other chat: all but its new question came from the cache
    assert result["server_doc_next_turn_cached_tokens"] >= result["server_doc_next_turn_prompt_tokens"] - 24
    # the document warmed up while nothing else ran: its first chat took the file from the cache
    assert result["server_doc_warmed_cached_tokens"] >= result["server_doc_warm_up_tokens"] > result["server_doc_warmed_prompt_tokens"] // 2
    # inline completions while typing: each keystroke's prompt took the text before the cursor
    # from the cache (the cursor is mid-file: about half of the prompt); typing the proposal's
    # first character was answered without the model
    assert result["server_fill_keystroke_cached_share"] > 0.3
    assert result["server_fill_typed_through_ran_model"] is False
    # every known-answer draft is right: 7 accepted per speculative step (float32: same tokens)
    assert result["spec_known_answer_same_tokens"] == "16/16"
    assert result["spec_known_answer_accepted_per_spec_step"] >= 6
    assert result["spec_known_answer_steps"] < result["spec_plain_steps"]
    assert result["ready_s"] == result["ready_process_second_s"] > 0
    assert "| engine_b1_tok_s |" in capsys.readouterr().out


def test_conversation_prompts_bench(test_model, tmp_path):
    spec = importlib.util.spec_from_file_location("conversation_prompts", REPO / "bench" / "conversation_prompts.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "conversation.json"
    assert bench.main(["--tokenizer", str(test_model), "--turns", "3", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    for turns in (result["turns"], result["attached"]["turns"]):
        assert [t["turn"] for t in turns] == [1, 2, 3]
        assert turns[2]["shared_with_previous"] >= turns[1]["prompt_tokens"] - 3  # the file stayed: only the new turn


def test_quantized_bench_tiny_runs_the_server(tmp_path):
    """bench/quantized_bench.py's CPU plan: a random model saved with StarChat's special tokens,
    the real server loading it (unquantized: bitsandbytes' 8bit and 4bit need a GPU) and
    answering two chats."""
    spec = importlib.util.spec_from_file_location("quantized_bench", REPO / "bench" / "quantized_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "quantized.json"
    assert bench.main(["--tiny", "--tokens", "8", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["model"]["layers"] == 2 and "error" not in result["none"], result
    assert result["none"]["chat_tokens"] > 0 and result["none"]["ready_message"].startswith("Ready"), result
