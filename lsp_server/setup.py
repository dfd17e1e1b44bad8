"""create_server(): the one place where every LSP feature is registered."""

from __future__ import annotations

from .config import Settings
from .features import chat, code_actions, commands, hover, inline_completion, lifecycle, warming
from .server import StarChatServer


def create_server(settings: Settings | None = None) -> StarChatServer:
    server = StarChatServer(settings)
    for feature in (lifecycle, code_actions, hover, inline_completion, chat, commands, warming):
        feature.register(server)
    return server
