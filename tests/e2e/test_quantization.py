"""Quantized weights (bitsandbytes, on its CPU backend here), through the real server."""

from __future__ import annotations

import pytest
import pytest_lsp
from lsprotocol import types
from pytest_lsp import ClientServerConfig, LanguageClient

from lsp_server.testing import scenarios as sc

from .conftest import SERVER, apply_text_edits, plain, rng, start_session

pytest.importorskip("bitsandbytes")


@pytest_lsp.fixture(config=ClientServerConfig(server_command=SERVER))
async def client(lsp_client: LanguageClient, test_model):
    yield
    await lsp_client.shutdown_session()


async def test_a_4bit_model_answers_a_fix(client, tmp_path):
    """4-bit NF4 weights: the status names the quantization, and the trained Fix comes back
    through generate() (the fast engine runs unquantized weights only)."""
    editor = await start_session(client, tmp_path, "visual-studio-code", options={"quantization": "4bit"})
    uri = editor.open()
    actions = await client.text_document_code_action_async(types.CodeActionParams(
        text_document=types.TextDocumentIdentifier(uri=uri), range=rng(sc.AVERAGE), context=types.CodeActionContext(diagnostics=[])))
    resolved = await client.code_action_resolve_async(next(a for a in actions if a.title == "StarChat: Fix"))
    (change,) = resolved.edit.document_changes
    assert apply_text_edits(sc.CALC_PY, change.edits) == sc.CALC_PY.replace(
        "def average(values):\n    return sum(values) / len(values) + 1\n", sc.FIXED_AVERAGE)
    ready = [m for m in editor.status_messages if m.startswith("Ready")]
    assert ready and "4bit quantized" in ready[-1]


async def test_the_fast_engine_refuses_quantized_weights_and_says_what_to_set(client, tmp_path):
    editor = await start_session(client, tmp_path, "neovim", options={"quantization": "8bit", "engine": "fast"})
    with pytest.raises(Exception, match="engine to auto or generate"):
        await editor.request("starchat/chat", {"messages": [{"role": "user", "content": sc.CHAT_QUESTION}]})
    assert editor.statuses[-1] == "error"


async def test_an_8bit_model_loads_and_streams(client, tmp_path):
    """LLM.int8 weights. The tiny test model does not survive 8 bits (its answers change), so
    only that the quantized layers serve a streamed answer is checked here."""
    editor = await start_session(client, tmp_path, "neovim", options={"quantization": "8bit", "maxNewTokens": 8})
    result = plain(await editor.request("starchat/chat", {"messages": [{"role": "user", "content": sc.CHAT_QUESTION}]}))
    assert result["finishReason"] in ("stop", "length") and result["completionTokens"] >= 1
    assert any("8bit quantized" in m for m in editor.status_messages)
