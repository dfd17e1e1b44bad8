"""create_server(): the one place where every LSP feature is registered."""

from __future__ import annotations

from .config import Settings
from .features import chat, code_actions, commands, hover, lifecycle, warming
from .server import StarChatServer


def create_server(settings: Settings | None = None) -> StarChatServer:
    server = StarChatServer(settings)
    for feature in (lifecycle, code_actions, hover, chat, commands, warming):
        feature.register(server)
    return server
