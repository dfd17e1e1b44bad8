"""The server's features on the fast engine (CPU path: same step function, no CUDA graphs)."""

from __future__ import annotations

import asyncio

import pytest_lsp
from pytest_lsp import ClientServerConfig, LanguageClient

from lsp_server.testing import scenarios as sc

from .conftest import SERVER, plain, start_session
from .test_features import resolve, single_text_edit


@pytest_lsp.fixture(config=ClientServerConfig(server_command=[*SERVER, "--engine", "fast"]))
async def fast(lsp_client: LanguageClient, test_model, tmp_path):
    lsp_client.editor = await start_session(lsp_client, tmp_path, "visual-studio-code")
    yield
    await lsp_client.shutdown_session()


async def chat(editor, question, token, **extra):
    params = {"messages": [{"role": "user", "content": question}], "partialResultToken": token, **extra}
    return plain(await editor.request("starchat/chat", params))


async def test_fix_chat_and_cancel_on_the_fast_engine(fast):
    editor = fast.editor
    uri = editor.open()
    resolved = await resolve(editor, uri, sc.AVERAGE, "StarChat: Fix")
    assert single_text_edit(resolved.edit, uri, 1)[0].new_text == sc.FIXED_AVERAGE
    result = await chat(editor, sc.CHAT_QUESTION, "a")
    assert result["text"] == sc.CHAT_ANSWER == "".join(editor.partials["a"])
    # two conversations at once share decoding steps and both come out right
    both = await asyncio.gather(chat(editor, sc.CHAT_QUESTION, "b"), chat(editor, sc.LONG_QUESTION, "c", maxNewTokens=60))
    assert both[0]["text"] == sc.CHAT_ANSWER and both[1]["text"].startswith("tick tock")
    request = asyncio.ensure_future(chat(editor, sc.LONG_QUESTION, "long", maxNewTokens=1500))
    error = await editor.cancel_mid_stream(request, "long")
    assert getattr(error, "code", None) == -32800
    count = len(editor.partials["long"])
    await asyncio.sleep(0.5)
    assert len(editor.partials["long"]) == count
    assert (await chat(editor, sc.CHAT_QUESTION, "after"))["text"] == sc.CHAT_ANSWER

